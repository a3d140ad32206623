"""The model pool: one small detached Ray actor that starts the replicas (model servers) of each
model, places them, makes room for servers and trainers that fit nowhere, and unloads idle ones.

Every generate job asks for its model's replicas (`acquire_server`); the pool answers with the
ready ones, or starts one (a model with none starts at once). The worker process sends the job
to the replica with the fewest jobs in hand. A model may run on several replicas: the scaler
(scheduler/scaling.py) sets how many it wants from the jobs its replicas have in hand (`loads`:
each replica's mean over its last report, from the server's own count) and the model's queue
(`scale`), and the pool starts them where there is room, spread over nodes, and unloads replicas
that stayed idle past their policy's delay (a shorter one for the last replica). A loaded
replica that answers no info() call for twice `stall_timeout_s` (paused or hung) is killed and
forgotten, so the next job gets a fresh one.

Room for everyone. A new server, or a trainer the runner registered (`admit`), that fits on no
node (CPU, GPU share, the `gpu_memory_gb` resource, or a node's `gpu_memory_budget_gb` of warm
servers) makes room: idle servers are unloaded, lowest priority of what they served first,
then least recently used, on the node where the fewest must go; a server with a job in hand is
never unloaded. The pool's watcher repeats this every WATCH_S for every actor Ray still holds
back, so a job never waits on a server that has gone idle since, and it keeps the reason (e.g.
"waiting for a GPU") for the job's progress message (workers/room.py).

The pool serialises its decisions (one lock) so two jobs cannot both start, or both evict for,
the same room; it holds no model and needs no CPU of its own.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import replace
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from core.scaling import Policy, resolve_policy
from workers.actors import (
    ACTOR_NAME_RELEASE_S,
    NAMESPACE,
    named_actor,
    num_gpus_for,
    start_model_server,
)
from workers.registry import get_family
from workers.replicas import (
    ALIVE_TRUST_S,
    ModelSpec,
    Replica,
    ScaleLog,
    Waiter,
    free_replica_name,
    is_alive,
    is_idle,
    trust_s,
)
from workers.room import (
    CLAIM_MAX_S,
    Candidate,
    Claim,
    actor_node,
    free_by_node,
    is_dead,
    is_room_on_its_way,
    is_unplaced,
    plan_room,
    server_need,
    waiting_for,
)
from workers.server import ServingOptions

log = logging.getLogger(__name__)

POOL_NAME = "genq-model-pool"  # not `model-...`: the dashboard lists those as servers
# The watcher's period: unplaced actors get room, replicas report, idle ones unload.
WATCH_S = 0.25
# A replica's in-hand count and batch figures are refreshed this often.
INFO_EVERY_S = 1.0


class ModelPool:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._models: dict[str, ModelSpec] = {}
        self._replicas: dict[str, Replica] = {}
        # Names of replicas forgotten (killed or found dead) lately -> when (monotonic). A new
        # replica does not take one for ACTOR_NAME_RELEASE_S: Ray's control store can still
        # list a dead or dying actor under its name for a moment, and a lookup by that name
        # would hand the new replica's caller the old actor.
        self._resting: dict[str, float] = {}
        self._waiters: dict[str, Waiter] = {}
        self._claims: list[Claim] = []
        self._log = ScaleLog()
        self._watcher = threading.Thread(target=self._watch, name="pool-watch", daemon=True)
        self._watcher.start()

    # -- the job side ------------------------------------------------------------------------

    def acquire(
        self,
        model_id: str,
        family_name: str,
        model_dir: str | None,
        config: dict[str, Any],
        options: ServingOptions,
        verify: bool = False,
        priority: int = 0,
        dead: str | None = None,
    ) -> list[tuple[ActorHandle, str, int]]:
        """The model's replicas to send a job to: (handle, name, jobs in hand) of each ready
        one, else of those loading; a model with none gets one now. `verify`: ask Ray whether
        they live (the caller found a handle dead or unreachable). `dead`: the actor id of a
        replica the caller's own call found dead; it goes even while Ray's control store still
        lists it (that lags the death a caller sees by a moment)."""
        with self._lock:
            spec = self._spec(model_id, family_name, model_dir, config, options)
            mine = self._of(model_id)
            if verify or dead:
                for replica in mine:
                    if replica.actor_id == dead:
                        self._forget(replica, "found dead by a job")
                        with contextlib.suppress(Exception):  # dead already, as a rule
                            ray.kill(replica.handle, no_restart=True)
                    elif verify and not is_alive(replica):
                        self._forget(replica, "found dead")
                mine = self._of(model_id)
            if not mine:
                mine = [self._start(spec, reason="a job is waiting")]
            ready = [r for r in mine if r.ready] or mine
            now = time.monotonic()
            for replica in ready:
                replica.last_used = now
                replica.priority = max(replica.priority, priority)
            return [(r.handle, r.key, r.in_hand) for r in ready]

    def admit(self, key: str, actor_id: str, need: dict[str, float], priority: int) -> str:
        """A trainer the runner just started: make room for it now if it fits nowhere, and keep
        making room until Ray places it. Returns what it waits for ("" if it fits)."""
        with self._lock:
            waiter = Waiter(key, actor_id, need, priority, since=time.monotonic())
            self._waiters[key] = waiter
            self._room_for(waiter)
            return waiter.waiting

    def scale(
        self,
        model_id: str,
        family_name: str,
        model_dir: str | None,
        config: dict[str, Any],
        options: ServingOptions,
        policy: Policy,
        desired: int,
    ) -> int:
        """Set the model's policy and the replicas the scaler wants (within the policy's
        bounds); the watcher starts them where there is room. Returns the replicas it has."""
        with self._lock:
            spec = self._spec(model_id, family_name, model_dir, config, options)
            spec.policy = policy
            spec.desired = max(policy.min_replicas, min(policy.max_replicas, desired))
            self._grow(spec)
            return len(self._of(model_id))

    # -- starting and unloading ----------------------------------------------------------------

    def _spec(
        self,
        model_id: str,
        family_name: str,
        model_dir: str | None,
        config: dict[str, Any],
        options: ServingOptions,
    ) -> ModelSpec:
        spec = self._models.get(model_id)
        if spec is None:
            policy = resolve_policy(
                get_family(family_name).scaling.as_dict(),
                None,
                idle_unload_s=options.idle_unload_s,
                last_idle_unload_s=options.last_idle_unload_s,
            )
            spec = ModelSpec(model_id, family_name, model_dir, config, options, policy)
            self._models[model_id] = spec
        else:
            spec.model_dir, spec.config, spec.options = model_dir, config, options
        return spec

    def _of(self, model_id: str) -> list[Replica]:
        return [r for r in self._replicas.values() if r.model_id == model_id]

    def _used_gb(self, node: str) -> float:
        """The GPU memory the warm servers on `node` hold (its `gpu_memory_budget_gb`'s use)."""
        return sum(r.memory_gb for r in self._replicas.values() if r.node_id == node)

    def _start(self, spec: ModelSpec, reason: str, must: bool = True) -> Replica:
        """A new replica of `spec`'s model, after making room for it (`must`: start it even
        where no room can be made; Ray holds it until some frees)."""
        family = get_family(spec.family)
        num_gpus = num_gpus_for(family)
        need = server_need(family, num_gpus)
        memory_gb = family.resources.gpu_memory_gb if num_gpus else 0.0
        mine = self._of(spec.model_id)
        nodes_used = [r.node_id for r in mine]
        key = free_replica_name(spec.model_id, set(self._replicas) | self._resting_names())
        room = self._make_room(
            need,
            memory_gb,
            f"room for a {family.name} server",
            max((r.priority for r in mine), default=0),
            budget_gb=spec.options.gpu_memory_budget_gb,
            prefer=lambda node: (-nodes_used.count(node),),
            key=key,
        )
        plan, unloads = room if room is not None else (None, [])
        strategy = NodeAffinitySchedulingStrategy(plan, soft=True) if plan else None
        # The pool unloads idle replicas itself (per the model's policy), so servers don't.
        options = replace(spec.options, idle_unload_s=None)
        handle = start_model_server(key, family, spec.model_dir, spec.config, options, strategy)
        replica = Replica(
            key=key,
            model_id=spec.model_id,
            family=family.name,
            handle=handle,
            need=need,
            memory_gb=memory_gb,
            node_id=plan,
            started_at=time.time(),
            last_used=time.monotonic(),
            room_at=time.monotonic(),
            unloads=unloads,
        )
        if plan is None:
            replica.waiting = waiting_for(need, free_by_node(self._claims))
        self._claims.append(Claim(plan, need, +1, key))
        self._replicas[key] = replica
        spec.scaled_at = time.monotonic()
        self._log.record(spec.model_id, "scale-up", key, reason, len(self._of(spec.model_id)))
        log.info("started %s on node %s: %s", key, plan, reason)
        return replica

    def _make_room(
        self,
        need: dict[str, float],
        memory_gb: float,
        reason: str,
        priority: int,
        budget_gb: float | None = None,
        prefer: Any = lambda node: (),
        key: str = "",
    ) -> tuple[str, list[Claim]] | None:
        """The node for `need` (of the actor `key`), after unloading what must go there, and the
        unloads' claims; None if none can be made. Idle servers go, lowest priority then least
        recently used first."""
        free = free_by_node(self._claims, without=key)
        room = {"memory_gb": memory_gb, "budget_gb": budget_gb, "used_gb": self._used_gb}
        plan = plan_room(need, free, [], prefer=prefer, **room)
        if plan is None:  # only now ask which servers are idle (a call to each)
            candidates = [
                Candidate(r.key, r.node_id, r.need, r.memory_gb, (r.priority, r.last_used))
                for r in self._replicas.values()
                if r.node_id is not None and self._is_idle(r)
            ]
            plan = plan_room(need, free, candidates, prefer=prefer, **room)
        if plan is None:
            return None
        node, victims = plan
        return node, [
            self._unload(self._replicas[victim.key], reason, eviction=True) for victim in victims
        ]

    def _room_for(
        self,
        actor: Replica | Waiter,
        memory_gb: float = 0.0,
        budget_gb: float | None = None,
        now: float | None = None,
    ) -> None:
        """Make room for an actor Ray has not placed (a replica or a trainer) and claim it, or
        record what it waits for (`now`: when the room was made; after the unloads if None)."""
        plan = self._make_room(
            actor.need,
            memory_gb,
            f"room for {actor.key}",
            actor.priority,
            budget_gb=budget_gb,
            key=actor.key,
        )
        if plan is None:
            actor.waiting = waiting_for(actor.need, free_by_node(self._claims))
        else:
            node, actor.unloads = plan
            actor.waiting = ""
            actor.room_at = time.monotonic() if now is None else now
            self._claims.append(Claim(node, actor.need, +1, actor.key))

    def _unload(self, replica: Replica, reason: str, eviction: bool = False) -> Claim:
        log.info("unloading %s: %s", replica.key, reason)
        claim = self._kill(replica, reason)
        spec = self._models.get(replica.model_id)
        if spec is not None:
            spec.scaled_at = time.monotonic()
        left = len(self._of(replica.model_id))
        self._log.record(
            replica.model_id, "evict" if eviction else "scale-down", replica.key, reason, left
        )
        return claim

    def _kill(self, replica: Replica, reason: str) -> Claim:
        """Kill the replica's actor and forget it; its room counts as free once Ray reports it
        dead (the returned claim, kept until then)."""
        ray.kill(replica.handle, no_restart=True)
        self._forget(replica, reason)
        claim = Claim(replica.node_id, replica.need, -1, replica.key, actor_id=replica.actor_id)
        self._claims.append(claim)
        return claim

    def _forget(self, replica: Replica, reason: str) -> None:
        self._replicas.pop(replica.key, None)
        self._resting[replica.key] = time.monotonic()

    def _resting_names(self) -> set[str]:
        now = time.monotonic()
        self._resting = {
            k: at for k, at in self._resting.items() if now - at < ACTOR_NAME_RELEASE_S
        }
        return set(self._resting)

    def _is_idle(self, replica: Replica) -> bool:
        """Idle, and handed out no job within two trust windows (workers/replicas.is_idle)."""
        spec = self._models.get(replica.model_id)
        return is_idle(replica, 2 * trust_s(spec.options) if spec else 2 * ALIVE_TRUST_S)

    # -- the watcher -------------------------------------------------------------------------

    def _watch(self) -> None:
        while True:
            time.sleep(WATCH_S)
            try:
                with self._lock:
                    self._tick()
            except Exception:  # the next tick tries again
                log.exception("the pool's watcher failed")

    def _tick(self) -> None:
        now = time.monotonic()
        for claim in self._claims:
            if claim.sign < 0 and claim.gone_at is None and is_dead(claim.actor_id):
                claim.gone_at = now
        self._claims = [c for c in self._claims if c.is_current(now) and now - c.at < CLAIM_MAX_S]
        for waiter in list(self._waiters.values()):
            if not is_unplaced(waiter.actor_id):
                self._waiters.pop(waiter.key, None)
            elif now - waiter.since > 2 * WATCH_S and not is_room_on_its_way(
                waiter.room_at, waiter.unloads, now
            ):
                self._room_for(waiter, now=now)
            if now - waiter.since > 3600:
                self._waiters.pop(waiter.key, None)
        for replica in list(self._replicas.values()):
            self._refresh(replica, now)
        for spec in list(self._models.values()):
            self._grow(spec)
            self._shrink(spec, now)

    def _refresh(self, replica: Replica, now: float) -> None:
        """Collect the replica's last info() answer (without waiting) and ask again."""
        actor_id = replica.actor_id
        age_s = time.time() - replica.started_at
        settled = not is_room_on_its_way(replica.room_at, replica.unloads, now)
        if not replica.ready and age_s > 2 * WATCH_S and settled and is_unplaced(actor_id):
            spec = self._models.get(replica.model_id)
            budget_gb = spec.options.gpu_memory_budget_gb if spec else None
            self._room_for(replica, replica.memory_gb, budget_gb, now=now)
        elif not replica.ready:
            replica.node_id = actor_node(actor_id) or replica.node_id
        if replica.info_ref is not None:
            ready, _ = ray.wait([replica.info_ref], timeout=0)
            if not ready:
                spec = self._models.get(replica.model_id)
                stall_s = spec.options.stall_timeout_s if spec else ServingOptions.stall_timeout_s
                # Twice the runners' bound: a job's own runner sees the stall first and says so.
                if replica.ready and now - replica.info_at > 2 * stall_s:
                    self._replace_stalled(replica, now - replica.info_at)
                return
            try:
                info = ray.get(replica.info_ref)
            except RayActorError:
                log.info("%s died", replica.key)
                self._forget(replica, "died")
                return
            if not replica.ready:  # placed and loaded: Ray's own report counts it now
                self._claims = [c for c in self._claims if c.key != replica.key or c.sign < 0]
            replica.take_info(info, now)
        if now - replica.info_at >= INFO_EVERY_S:
            replica.info_ref = replica.handle.info.remote()
            replica.info_at = now

    def _replace_stalled(self, replica: Replica, silent_s: float) -> None:
        """A loaded replica that has not answered info() for the stall timeout (paused, hung):
        kill it; the next job, or the scaler's wish, starts a replacement. Its jobs' runners
        see it die (or stall) and put them back in the queue."""
        log.warning("%s answered nothing for %.0f s: stalled; replacing it", replica.key, silent_s)
        self._kill(replica, "stalled")
        reason = f"stalled: no answer for {silent_s:.0f} s"
        self._log.record(
            replica.model_id, "stalled", replica.key, reason, len(self._of(replica.model_id))
        )

    def _grow(self, spec: ModelSpec) -> None:
        """Start the replicas the scaler wants, all at once, but only into free room (a scale-up
        never unloads another model's server) and not while one still waits for room."""
        family = get_family(spec.family)
        num_gpus = num_gpus_for(family)
        memory_gb = family.resources.gpu_memory_gb if num_gpus else 0.0
        while True:
            mine = self._of(spec.model_id)
            if len(mine) >= spec.desired or any(r.waiting for r in mine):
                return
            plan = plan_room(
                server_need(family, num_gpus),
                free_by_node(self._claims),
                [],
                memory_gb=memory_gb,
                budget_gb=spec.options.gpu_memory_budget_gb,
                used_gb=self._used_gb,
            )
            if plan is None:
                return
            self._start(spec, reason=f"{len(mine)} replicas for the queue; wanted {spec.desired}")

    def _shrink(self, spec: ModelSpec, now: float) -> None:
        """Unload one replica idle past its delay: above the floor and the scaler's wish after
        `idle_unload_s`, the last one (floor 0) after `last_idle_unload_s`."""
        mine = self._of(spec.model_id)
        policy = spec.policy
        if not mine or len(mine) <= max(policy.min_replicas, spec.desired):
            return
        delay = policy.last_idle_unload_s if len(mine) == 1 else policy.idle_unload_s
        if delay is None:
            return
        quiet = [r for r in mine if r.ready and r.in_hand == 0 and now - r.last_used >= delay]
        if not quiet:
            return
        victim = min(quiet, key=lambda r: r.last_used)
        if self._is_idle(victim):
            self._unload(victim, f"idle for {delay:g} s")

    def loads(self) -> dict[str, float]:
        """Model id -> the mean jobs in hand over its loaded replicas' last reports (summed),
        for each model with a loaded replica that has reported twice (the scaler's measure)."""
        with self._lock:
            found: dict[str, float] = {}
            for replica in self._replicas.values():
                if replica.ready and replica.load is not None:
                    found[replica.model_id] = found.get(replica.model_id, 0.0) + replica.load
            return found

    def info(self) -> dict[str, Any]:
        with self._lock:
            now = time.monotonic()
            return {
                "servers": [
                    r.describe(now) for r in sorted(self._replicas.values(), key=lambda r: r.key)
                ],
                "models": {
                    m.model_id: {
                        "policy": vars(m.policy),
                        "desired": m.desired,
                        "replicas": len(self._of(m.model_id)),
                    }
                    for m in self._models.values()
                },
                "waiting": {w.key: w.waiting for w in self._waiters.values()},
                "evictions": list(self._log.evictions),
                "events": list(self._log.events),
            }


_PoolActor = ray.remote(ModelPool)


def get_pool() -> ActorHandle:
    """The cluster's one pool, started by the first caller that finds none."""

    def create() -> ActorHandle:
        return _PoolActor.options(
            name=POOL_NAME,
            namespace=NAMESPACE,
            lifetime="detached",
            num_cpus=0,
            max_concurrency=8,  # decisions are serialised by its lock; info may run beside them
        ).remote()

    return named_actor(POOL_NAME, create)
