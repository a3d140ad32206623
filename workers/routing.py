"""Routing a job to a replica, in the worker process: the model's replicas come from the model
pool (workers/pool.py) at most once per model and `ALIVE_TRUST_S` per process, and each job goes
to the replica with the fewest jobs in hand (this process's own count first, then the pool's
last look), so the per-job path has no pool round trip. Trainers are registered with the pool
here too, so that it makes room for them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError

from workers.actors import until_released
from workers.families.base import Family
from workers.pool import get_pool
from workers.replicas import trust_s
from workers.server import ServingOptions

# The pool's handle for this process's Ray connection: (session name, job id) -> handle.
# Looking it up by name asks Ray's GCS each time; a new connection (tests reconnect) or a pool
# that died gets a fresh lookup.
_pool_handles: dict[tuple[str, str], ActorHandle] = {}
_pool_lock = threading.Lock()


def pool_handle(fresh: bool = False) -> ActorHandle:
    context = ray.get_runtime_context()
    key = (context.get_session_name(), context.get_job_id())
    with _pool_lock:
        handle = None if fresh else _pool_handles.get(key)
        if handle is None:
            _pool_handles.clear()
            handle = _pool_handles[key] = get_pool()
        return handle


def call_pool(method: str, *args: Any) -> Any:
    """Call the pool, finding it again (or starting it) if it was killed or restarted. Ray's
    control store can list a pool that just died for a moment more, so a lookup may hand back
    the dead one: the call is tried again, with a fresh lookup each time (until_released)."""
    try:
        return ray.get(getattr(pool_handle(), method).remote(*args))
    except RayActorError:
        return until_released(
            lambda: ray.get(getattr(pool_handle(fresh=True), method).remote(*args)),
            RayActorError,
            "the model pool is gone; looking it up again",
        )


# Replicas this process got from the pool: model id -> (replicas, when, Ray connection). Within
# the pool's trust window a job takes its replica from here, without a call to the pool: at
# most one call per model and second per process, however many jobs run. The pool's
# least-recently-used order is then a second stale at most.
_recent: dict[str, tuple[list[tuple[ActorHandle, str, int]], float, tuple[str, str]]] = {}
# Jobs this process has sent to each replica and not seen end (by replica name).
_in_flight: dict[str, int] = {}


@dataclass
class ServerChoice:
    """The replica a job runs on; `done()` when the job no longer needs it."""

    handle: ActorHandle
    name: str

    def done(self) -> None:
        with _pool_lock:
            left = _in_flight.get(self.name, 0) - 1
            if left > 0:
                _in_flight[self.name] = left
            else:
                _in_flight.pop(self.name, None)


def choose_server(
    model_id: str,
    family_name: str,
    model_dir: str | None,
    config: dict[str, Any],
    options: ServingOptions,
    *,
    verify: bool = False,
    priority: int = 0,
    dead: str | None = None,
) -> ServerChoice:
    """The replica for one job: of the model's ready replicas, the one with the fewest jobs in
    hand (this process's own count first, then the pool's last look). `verify`: the last
    handle was found dead or unreachable; have the pool check them all. `dead`: the actor id
    of a replica a call found dead (ActorDiedError); the pool drops it whatever Ray's
    control store says yet."""
    context = ray.get_runtime_context()
    connection = (context.get_session_name(), context.get_job_id())
    now = time.monotonic()
    with _pool_lock:
        recent = _recent.get(model_id)
    if (
        verify
        or dead
        or recent is None
        or recent[2] != connection
        or now - recent[1] >= trust_s(options)
    ):
        args = (model_id, family_name, model_dir, config, options, verify, priority, dead)
        replicas = call_pool("acquire", *args)
        recent = (replicas, now, connection)
        with _pool_lock:
            _recent[model_id] = recent
    with _pool_lock:
        handle, name, _ = min(
            recent[0], key=lambda r: (_in_flight.get(r[1], 0) + r[2], _in_flight.get(r[1], 0), r[1])
        )
        _in_flight[name] = _in_flight.get(name, 0) + 1
    return ServerChoice(handle, name)


def acquire_server(
    model_id: str,
    family_name: str,
    model_dir: str | None,
    config: dict[str, Any],
    options: ServingOptions,
    *,
    verify: bool = False,
) -> ActorHandle:
    """A replica of the model, for callers that do not count jobs (tests, tools)."""
    choice = choose_server(model_id, family_name, model_dir, config, options, verify=verify)
    choice.done()
    return choice.handle


def admit_trainer(key: str, actor_id: str, need: dict[str, float], priority: int) -> str:
    """Register a trainer just started; returns what it waits for ("" if it fits)."""
    return str(call_pool("admit", key, actor_id, need, priority))


def get_model_server(
    model_id: str,
    family: Family,
    model_dir: str | None,
    config: dict[str, Any],
    options: ServingOptions | None = None,
    *,
    verify: bool = False,
) -> ActorHandle:
    """The warm server of a registered model, started (and loading) if it does not exist.
    The model pool (workers/pool.py) places new servers and makes room for them (unloading
    idle ones) when they fit nowhere. `verify`: the handle last returned was
    dead; make sure this one is not."""
    return acquire_server(
        model_id, family.name, model_dir, config, options or ServingOptions(), verify=verify
    )
