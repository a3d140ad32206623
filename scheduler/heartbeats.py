"""Health heartbeats: each Celery worker says, every few seconds, which queues it consumes and
whether its Ray connection answers; the periodic scheduler says that its rounds run. Both go
to Redis keys with a time to live of three intervals, so a process that dies or hangs drops
out by itself; `GET /v1/health/ready` (api/health.py) reads them, and the API process learns
about Ray and the workers without importing Ray (on a cluster it runs on a machine without a
Ray node).

Keys (JSON values):

    genq:health:worker:<queue>:<hostname>:<pid>   {hostname, node, pid, queues, ray_ok,
                                                   ray_error, ray_ok_at, at}
    genq:health:scheduler:<hostname>:<pid>        {hostname, pid, ok, error, at}
    genq:health:seen                              hash: part -> last time it was seen healthy
    genq:health:workers, genq:health:schedulers   sorted sets: heartbeat key -> expiry time

The last hash never expires (a handful of fields), so readiness can say how long a part has
been down: `queue:<name>` (a worker with Ray consumed it), `ray` (a worker reached Ray) and
`scheduler` (a round of the periodic scheduler succeeded).

A worker's Ray probe (`ray.nodes()`, a call to Ray's GCS) runs in a thread of its own: a probe
that hangs while the head is away cannot hold up the heartbeat, whose `ray_ok_at` then grows
old and the part is reported down.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from typing import Any

import redis

from core.settings import Settings
from scheduler.broker import QUEUES, WEBHOOK_QUEUE

log = logging.getLogger(__name__)

WORKER_KEY = "genq:health:worker:{queue}:{hostname}:{pid}"
SCHEDULER_KEY = "genq:health:scheduler:{hostname}:{pid}"
# Sorted sets of the heartbeat keys, scored by when each expires: readiness reads a handful of
# keys, never a SCAN over a broker that may hold a marker per queued job.
WORKER_INDEX = "genq:health:workers"
SCHEDULER_INDEX = "genq:health:schedulers"
SEEN_KEY = "genq:health:seen"
# Queues whose jobs run on Ray: only a worker that reaches Ray serves them.
RAY_QUEUES = tuple(q for q in QUEUES if q != WEBHOOK_QUEUE)


def heartbeat_ttl_s(settings: Settings) -> int:
    """A heartbeat lives three intervals: one late write is not a death."""
    return max(1, round(settings.health_heartbeat_interval_s * 3))


def probe_ray() -> str | None:
    """None when this process's Ray connection answers, else why not."""
    import ray

    if not ray.is_initialized():
        return "not connected to Ray"
    try:
        nodes = ray.nodes()
    except Exception as exc:  # the GCS is away (the head died or is unreachable)
        return f"{type(exc).__name__}: {exc}"
    if not any(node.get("Alive") for node in nodes):
        return "Ray reports no alive node"
    return None


class WorkerHeartbeat:
    """One Celery worker's heartbeats, one key per queue it consumes. `start` once the worker
    consumes (Celery's worker_ready), `stop` when it stops consuming (the keys go at once)."""

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        hostname: str,
        queues: tuple[str, ...],
    ) -> None:
        self.settings, self.client = settings, client
        self.hostname = hostname or f"celery@{socket.gethostname()}"
        self.queues = queues
        self.node = socket.gethostname()
        self.stopped = threading.Event()
        self.ray_ok_at: float | None = None
        self.ray_error: str | None = "not probed yet"
        self._prober: threading.Thread | None = None
        self._writer: threading.Thread | None = None

    def keys(self) -> list[str]:
        pid = os.getpid()
        return [WORKER_KEY.format(queue=q, hostname=self.hostname, pid=pid) for q in self.queues]

    def probe_once(self) -> None:
        error = probe_ray()
        self.ray_error = error
        if error is None:
            self.ray_ok_at = time.time()

    def write_once(self) -> dict[str, Any]:
        now = time.time()
        ttl_s = heartbeat_ttl_s(self.settings)
        ray_ok = self.ray_ok_at is not None and now - self.ray_ok_at < ttl_s
        beat = {
            "hostname": self.hostname,
            "node": self.node,
            "pid": os.getpid(),
            "queues": list(self.queues),
            "ray_ok": ray_ok,
            "ray_error": None if ray_ok else (self.ray_error or "the Ray probe does not answer"),
            "ray_ok_at": self.ray_ok_at,
            "at": now,
        }
        raw = json.dumps(beat)
        pipe = self.client.pipeline(transaction=False)
        for key in self.keys():
            pipe.set(key, raw, ex=ttl_s)
            _index(pipe, WORKER_INDEX, key, now + ttl_s)
        seen = {f"queue:{q}": now for q in self.queues if ray_ok or q not in RAY_QUEUES}
        if ray_ok:
            seen["ray"] = self.ray_ok_at or now
        for part, at in seen.items():
            pipe.hset(SEEN_KEY, part, at)
        pipe.execute()
        return beat

    def _loop(self, step: Any, what: str) -> None:
        while True:
            try:
                step()
            except Exception:  # Redis briefly away: the key expires, the next round rewrites it
                log.exception("health heartbeat: %s failed", what)
            if self.stopped.wait(self.settings.health_heartbeat_interval_s):
                return

    def start(self) -> None:
        self._prober = threading.Thread(
            target=self._loop, args=(self.probe_once, "the Ray probe"), daemon=True
        )
        self._writer = threading.Thread(
            target=self._loop, args=(self.write_once, "write"), daemon=True
        )
        self._prober.start()
        self._writer.start()

    def stop(self) -> None:
        """Stop writing and delete the keys (a probe stuck in Ray is left to its daemon
        thread)."""
        self.stopped.set()
        if self._writer is not None:
            self._writer.join(timeout=10)
        with contextlib.suppress(redis.RedisError):
            self.client.delete(*self.keys())
            self.client.zrem(WORKER_INDEX, *self.keys())


class SchedulerHeartbeat:
    """The periodic scheduler's heartbeat, written after each round: whether it succeeded."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings, self.client = settings, client
        self.key = SCHEDULER_KEY.format(hostname=socket.gethostname(), pid=os.getpid())
        self._last_write = 0.0

    def beat(self, error: str | None = None) -> None:
        """Record a round (`error`: why it failed). Written at most once a second."""
        now = time.time()
        if error is None and now - self._last_write < 1.0:
            return
        beat = {
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "ok": error is None,
            "error": error,
            "at": now,
        }
        try:
            pipe = self.client.pipeline(transaction=False)
            ttl_s = heartbeat_ttl_s(self.settings)
            pipe.set(self.key, json.dumps(beat), ex=ttl_s)
            _index(pipe, SCHEDULER_INDEX, self.key, now + ttl_s)
            if error is None:
                pipe.hset(SEEN_KEY, "scheduler", now)
            pipe.execute()
            self._last_write = now
        except redis.RedisError:  # the broker is away: readiness says so on its own
            log.warning("health heartbeat: could not write the scheduler's heartbeat")

    def stop(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self.client.delete(self.key)
            self.client.zrem(SCHEDULER_INDEX, self.key)


def _index(pipe: Any, index: str, key: str, expires_at: float) -> None:
    """List `key` in `index` until `expires_at`; drop entries that expired an hour ago (their
    processes died without deleting them)."""
    pipe.zadd(index, {key: expires_at})
    pipe.zremrangebyscore(index, "-inf", expires_at - 3600)


def read_heartbeats(client: redis.Redis, index: str) -> list[dict[str, Any]]:
    """Every live heartbeat listed in `index` (WORKER_INDEX or SCHEDULER_INDEX), with its
    key; expired ones are gone."""
    keys = [
        k.decode() if isinstance(k, bytes) else str(k)
        for k in client.zrangebyscore(index, time.time(), "+inf")
    ]
    found = []
    for key, raw in zip(keys, client.mget(keys) if keys else [], strict=True):
        if raw is not None:
            found.append({**json.loads(raw), "key": key})
    return found


def read_seen(client: redis.Redis) -> dict[str, float]:
    """When each part was last seen healthy (seconds since the epoch)."""
    raw = client.hgetall(SEEN_KEY)
    return {(k.decode() if isinstance(k, bytes) else str(k)): float(v) for k, v in raw.items()}
