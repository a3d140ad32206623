"""The model pool: one small detached Ray actor that starts model servers, decides which node
each goes to, and evicts the least recently used ones when a GPU memory budget would be
exceeded.

Every generate job asks the pool for its model's server (`acquire_server`); the pool answers
with the warm server's handle, or starts one. Because every request passes through it, the pool
knows when each server was last wanted (least-recently-used order) without asking them. A new
server that needs a GPU share goes to a node where both fit: the GPU resource Ray will account
(`num_gpus`, fractional for small models, so several share one GPU) and the node's memory
budget (`gpu_memory_budget_gb`, summed from the families' declared `gpu_memory_gb`). Where no
node has room, idle servers are evicted, least recently used first; servers with jobs running
are never evicted. If even that is not enough, the server is started anyway and Ray holds it
until a GPU share frees up. Servers that unloaded themselves after idling are forgotten at the
next look. On a cluster without GPUs there is nothing to budget and Ray places servers itself.

The pool runs serialised (one acquire at a time) so two jobs cannot both start, or both evict
for, the same room; it holds no model and needs no CPU of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from workers.actors import NAMESPACE, model_server_name, num_gpus_for, start_model_server
from workers.families.base import Family
from workers.registry import get_family
from workers.server import ServingOptions

log = logging.getLogger(__name__)

POOL_NAME = "genq-model-pool"  # not `model-...`: the dashboard lists those as servers
INFO_TIMEOUT_S = 2.0
EPS = 1e-9
# A server handed out less than this long ago is handed out again without asking Ray whether
# it is still alive (a lookup per job costs more than a small job). It cannot have unloaded
# itself for idling in that time (the window is capped at its idle time, counted from its last
# job); it may have crashed, but a server can die just after any check, so that case is
# handled anyway: the job sees ActorDiedError and is retried, and the next acquire looks.
ALIVE_TRUST_S = 1.0


def trust_s(options: ServingOptions) -> float:
    return min(ALIVE_TRUST_S, options.idle_unload_s or ALIVE_TRUST_S)


@dataclass
class ServerRecord:
    model_id: str
    family: str
    handle: ActorHandle
    node_id: str | None
    num_gpus: float
    memory_gb: float
    last_used: float  # monotonic, of the pool's process
    started_at: float


class ModelPool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._servers: dict[str, ServerRecord] = {}
        self.evictions: list[dict[str, Any]] = []

    def acquire(
        self,
        model_id: str,
        family_name: str,
        model_dir: str | None,
        config: dict[str, Any],
        options: ServingOptions,
        verify: bool = False,
    ) -> list[ActorHandle]:
        """[the server's handle] (a list: a handle inside a container is passed as is).
        `verify`: ask Ray whether the server lives even if it was handed out just now (the
        caller found the last handle dead)."""
        with self._lock:
            record = self._servers.get(model_id)
            now = time.monotonic()
            recent = record is not None and not verify and now - record.last_used < trust_s(options)
            if record is not None and (recent or self._is_alive(record)):
                record.last_used = now
                return [record.handle]
            self._servers.pop(model_id, None)
            self._forget_dead()
            family = get_family(family_name)
            node_id = self._place(family, options)
            strategy = NodeAffinitySchedulingStrategy(node_id, soft=False) if node_id else None
            handle = start_model_server(model_id, family, model_dir, config, options, strategy)
            num_gpus = num_gpus_for(family)
            self._servers[model_id] = ServerRecord(
                model_id=model_id,
                family=family.name,
                handle=handle,
                node_id=node_id,
                num_gpus=num_gpus,
                memory_gb=family.resources.gpu_memory_gb if num_gpus else 0.0,
                last_used=time.monotonic(),
                started_at=time.time(),
            )
            log.info("started the server of model %s on node %s", model_id, node_id)
            return [handle]

    # -- placement ---------------------------------------------------------------------------

    def _place(self, family: Family, options: ServingOptions) -> str | None:
        """The node for a new server of `family`, after evicting what must go; None where
        Ray should choose (no GPU needed)."""
        need_gpus = num_gpus_for(family)
        if need_gpus <= 0:
            return None
        need_gb = family.resources.gpu_memory_gb
        budget = options.gpu_memory_budget_gb
        nodes = {
            n["NodeID"]: float(n["Resources"].get("GPU", 0))
            for n in ray.nodes()
            if n.get("Alive") and n.get("Resources", {}).get("GPU", 0) > 0
        }
        if not nodes:
            return None

        def free(node_id: str, without: set[str] = frozenset()) -> tuple[float, float]:
            mine = [
                r
                for r in self._servers.values()
                if r.node_id == node_id and r.model_id not in without
            ]
            gpus = nodes[node_id] - sum(r.num_gpus for r in mine)
            gb = (budget - sum(r.memory_gb for r in mine)) if budget is not None else float("inf")
            return gpus, gb

        def fits(node_id: str, without: set[str] = frozenset()) -> bool:
            gpus, gb = free(node_id, without)
            return gpus + EPS >= need_gpus and gb + EPS >= need_gb

        room = [n for n in nodes if fits(n)]
        if room:
            return max(room, key=lambda n: free(n))
        # Evict idle servers, least recently used first, on the node that needs the fewest.
        plans = []
        for node_id in nodes:
            victims: list[ServerRecord] = []
            for record in sorted(self._servers.values(), key=lambda r: r.last_used):
                if record.node_id != node_id or fits(node_id, {v.model_id for v in victims}):
                    continue
                if self._is_idle(record):
                    victims.append(record)
            if fits(node_id, {v.model_id for v in victims}):
                plans.append(
                    (len(victims), victims[0].last_used if victims else 0.0, node_id, victims)
                )
        if not plans:
            log.warning(
                "no node has room for a %s server (%.2f GPU, %.1f GB), even after evicting idle"
                " servers: Ray starts it when a GPU share frees up",
                family.name,
                need_gpus,
                need_gb,
            )
            return max(nodes, key=lambda n: free(n))
        _, _, node_id, victims = min(plans, key=lambda p: (p[0], p[1]))
        for victim in victims:
            self._evict(victim, reason=f"room for a {family.name} server")
        return node_id

    def _evict(self, record: ServerRecord, reason: str) -> None:
        log.info(
            "evicting the server of model %s (least recently used): %s", record.model_id, reason
        )
        ray.kill(record.handle, no_restart=True)
        self._servers.pop(record.model_id, None)
        self.evictions.append({"model_id": record.model_id, "at": time.time(), "reason": reason})
        del self.evictions[:-100]

    def _is_idle(self, record: ServerRecord) -> bool:
        try:
            info = ray.get(record.handle.info.remote(), timeout=INFO_TIMEOUT_S)
        except Exception:  # still loading (busy) or gone: not a victim to pick now
            return False
        return not info["active_jobs"]

    def _is_alive(self, record: ServerRecord) -> bool:
        try:
            current = ray.get_actor(model_server_name(record.model_id), namespace=NAMESPACE)
        except ValueError:  # no such actor: it unloaded itself or was killed
            return False
        return bool(current._actor_id == record.handle._actor_id)

    def _forget_dead(self) -> None:
        for record in list(self._servers.values()):
            if not self._is_alive(record):
                del self._servers[record.model_id]

    def info(self) -> dict[str, Any]:
        with self._lock:
            self._forget_dead()
            now = time.monotonic()
            return {
                "servers": [
                    {
                        "model_id": r.model_id,
                        "family": r.family,
                        "node_id": r.node_id,
                        "num_gpus": r.num_gpus,
                        "memory_gb": r.memory_gb,
                        "idle_s": now - r.last_used,
                        "started_at": r.started_at,
                    }
                    for r in sorted(self._servers.values(), key=lambda r: r.last_used)
                ],
                "evictions": list(self.evictions),
            }


_PoolActor = ray.remote(ModelPool)


def get_pool() -> ActorHandle:
    return _PoolActor.options(
        name=POOL_NAME,
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        num_cpus=0,
        max_concurrency=8,  # acquire is serialised by its lock; info may run beside it
    ).remote()


# The pool's handle for this process's Ray connection: (session name, job id) -> handle.
# Looking it up by name asks Ray's GCS each time; a new connection (tests reconnect) or a pool
# that died gets a fresh lookup.
_pool_handles: dict[tuple[str, str], ActorHandle] = {}
_pool_lock = threading.Lock()


def _pool_handle(fresh: bool = False) -> ActorHandle:
    context = ray.get_runtime_context()
    key = (context.get_session_name(), context.get_job_id())
    with _pool_lock:
        handle = None if fresh else _pool_handles.get(key)
        if handle is None:
            _pool_handles.clear()
            handle = _pool_handles[key] = get_pool()
        return handle


# Servers this process got from the pool: model id -> (handle, when, Ray connection). Within
# the pool's trust window a job takes its server from here, without a call to the pool: at
# most one call per model and second per process, however many jobs run. The pool's
# least-recently-used order is then a second stale at most.
_recent_servers: dict[str, tuple[ActorHandle, float, tuple[str, str]]] = {}


def acquire_server(
    model_id: str,
    family: Family,
    model_dir: str | None,
    config: dict[str, Any],
    options: ServingOptions,
    *,
    verify: bool = False,
) -> ActorHandle:
    """The model's warm server. `verify`: the last handle was found dead; have the pool check
    and start a new server if so."""
    context = ray.get_runtime_context()
    connection = (context.get_session_name(), context.get_job_id())
    now = time.monotonic()
    with _pool_lock:
        recent = _recent_servers.get(model_id)
    if (
        not verify
        and recent is not None
        and recent[2] == connection
        and now - recent[1] < trust_s(options)
    ):
        return recent[0]
    args = (model_id, family.name, model_dir, config, options, verify)
    try:
        [handle] = ray.get(_pool_handle().acquire.remote(*args))
    except RayActorError:  # the pool was killed or restarted: find (or start) it again
        [handle] = ray.get(_pool_handle(fresh=True).acquire.remote(*args))
    with _pool_lock:
        _recent_servers[model_id] = (handle, now, connection)
    return handle
