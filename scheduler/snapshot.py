"""The cluster snapshot: each Celery worker writes, every few seconds, what it is and what Ray
looks like from it to a Redis key with a time to live. The dashboard reads these keys, so the API
process shows workers, nodes, GPUs and warm models without importing Ray; a worker whose key has
expired is no longer alive.

The snapshot holds the worker's hostname, pid, concurrency and the ids of the jobs it is running,
Ray's nodes with their declared and available resources, the genq model servers (named
`model-<model id>`, or `model-<model id>@<n>` for further replicas, in the `genq` namespace)
with the device and resources each one holds, and the model pool's view: replicas per model
(node, GPU, jobs in hand, batch sizes, load time), policies, and scale events. Only
what Ray reports is shown: a cluster without GPUs reports none, and no figure is made up.
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

log = logging.getLogger(__name__)

# One key per worker; the dashboard lists them with SCAN.
SNAPSHOT_KEY = "genq:cluster:worker:{hostname}"
SNAPSHOT_PATTERN = "genq:cluster:worker:*"
MODEL_SERVER_PREFIX = "model-"
# A model server busy loading may not answer info() at once; it is shown without details.
INFO_TIMEOUT_S = 2.0


def _active_job_ids() -> list[str]:
    # Celery keeps the requests this worker process is executing in a module-level set.
    from celery.worker import state

    ids = []
    for request in list(state.active_requests):
        args = getattr(request, "args", None) or []
        if args:
            ids.append(str(args[0]))
    return sorted(ids)


def _ray_view() -> dict[str, Any]:
    import ray

    if not ray.is_initialized():
        return {"connected": False}
    nodes = [
        {
            "node_id": node.get("NodeID"),
            "address": node.get("NodeManagerAddress"),
            "alive": bool(node.get("Alive")),
            "resources": {
                k: v for k, v in (node.get("Resources") or {}).items() if "_group_" not in k
            },
        }
        for node in ray.nodes()
    ]
    servers = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") != "genq" or not entry["name"].startswith(MODEL_SERVER_PREFIX):
            continue
        # `model-<id>` is a model's first replica, `model-<id>@<n>` its n-th.
        model_id = entry["name"][len(MODEL_SERVER_PREFIX) :].split("@")[0]
        server: dict[str, Any] = {"model_id": model_id, "replica": entry["name"]}
        try:
            actor = ray.get_actor(entry["name"], namespace="genq")
            server.update(ray.get(actor.info.remote(), timeout=INFO_TIMEOUT_S))
        except Exception as exc:  # loading, or died between the listing and the call
            server["unavailable"] = type(exc).__name__
        servers.append(server)
    return {
        "connected": True,
        "pool": _pool_view(),
        "nodes": nodes,
        "cluster_resources": ray.cluster_resources(),
        "available_resources": ray.available_resources(),
        "model_servers": servers,
    }


def _pool_view() -> dict[str, Any]:
    """The model pool's replicas, policies and scale events (workers/pool.py); empty while no
    pool runs (no job has asked for a server yet)."""
    import ray

    from workers.pool import POOL_NAME

    try:
        pool = ray.get_actor(POOL_NAME, namespace="genq")
    except ValueError:
        return {}
    return dict(ray.get(pool.info.remote(), timeout=INFO_TIMEOUT_S))


def take_snapshot(hostname: str, concurrency: int) -> dict[str, Any]:
    try:
        ray_view = _ray_view()
    except Exception as exc:
        ray_view = {"connected": False, "error": f"{type(exc).__name__}: {exc}"}
    return {
        "hostname": hostname,
        "pid": os.getpid(),
        "concurrency": concurrency,
        "active_job_ids": _active_job_ids(),
        "ray": ray_view,
        "taken_at": time.time(),
    }


class SnapshotWriter(threading.Thread):
    """Writes this worker's snapshot every `interval_s`, with a TTL of three intervals."""

    def __init__(self, settings: Settings, client: redis.Redis, hostname: str = "") -> None:
        super().__init__(name="cluster-snapshot", daemon=True)
        self.settings = settings
        self.client = client
        self.hostname = hostname or f"celery@{socket.gethostname()}"
        self.stopped = threading.Event()

    def write_once(self) -> dict[str, Any]:
        snapshot = take_snapshot(self.hostname, self.settings.worker_concurrency)
        ttl_s = max(1, round(self.settings.cluster_snapshot_interval_s * 3))
        self.client.set(
            SNAPSHOT_KEY.format(hostname=self.hostname), json.dumps(snapshot, default=str), ex=ttl_s
        )
        return snapshot

    def run(self) -> None:
        while True:
            try:
                self.write_once()
            except Exception:  # Redis briefly away: the key expires, the next round rewrites it
                log.exception("could not write the cluster snapshot")
            if self.stopped.wait(self.settings.cluster_snapshot_interval_s):
                return

    def stop(self) -> None:
        self.stopped.set()
        # A worker that stops cleanly is gone at once, not after the TTL.
        with contextlib.suppress(redis.RedisError):
            self.client.delete(SNAPSHOT_KEY.format(hostname=self.hostname))


def read_snapshots(client: redis.Redis) -> list[dict[str, Any]]:
    """Every live worker's snapshot (expired ones are gone), sorted by hostname."""
    found = []
    for key in client.scan_iter(match=SNAPSHOT_PATTERN, count=100):
        raw = client.get(key)
        if raw is not None:
            found.append(json.loads(raw))
    return sorted(found, key=lambda s: str(s.get("hostname")))


def node_resources(client: redis.Redis) -> list[dict[str, float]]:
    """The declared resources of each alive Ray node, as the freshest snapshot that reached
    Ray reports them; empty when no worker has reported (nothing is known)."""
    for snap in sorted(read_snapshots(client), key=lambda s: -float(s.get("taken_at", 0))):
        view = snap.get("ray") or {}
        if view.get("connected"):
            return [
                {k: float(v) for k, v in (node.get("resources") or {}).items()}
                for node in view.get("nodes", [])
                if node.get("alive")
            ]
    return []
