"""Room on the cluster: what a model server or a trainer needs of a node, which node has it now,
which idle servers to unload when none has, and what a job that still waits is waiting for.

Ray places an actor only where its CPUs, GPU share and GPU memory (the `gpu_memory_gb` custom
resource) are free; an actor that fits nowhere waits, silently, until something frees them. A
warm server holds its share while idle (up to its idle unload), so without this module a job on
a third model could wait fifteen minutes behind two idle servers. The pool (workers/pool.py)
asks `plan_room` for the idle servers to unload, least wanted first, and `waiting_for` names the
resource a still-unplaced actor lacks, for the job's progress message.

Ray reports per-node availability a moment late: what the pool started or unloaded in the last
CLAIM_S is counted by the pool itself (`Claim`), so two acquisitions in one second do not both
take, or both free, the same room. Room made for an actor by unloading servers is its own until
Ray has had the time to hand it over (`is_room_on_its_way`): the servers reported dead, then the
actor's worker process started there, which takes seconds on a loaded machine; only an actor
still unplaced after that gets room made again, so one that is merely starting does not cost a
second server.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray._private import state as ray_state

from workers.families.base import GPU_MEMORY_RESOURCE, Family

EPS = 1e-9
# How long the pool's own record of a start overrides what Ray reports; an unload's record
# holds until Ray says the actor is dead, and REPORT_LAG_S more (its resources show free then).
CLAIM_S = 3.0
REPORT_LAG_S = 1.0
# Once the servers unloaded for an actor are reported dead, Ray starts the actor's worker process
# in their room: an actor still unplaced this long after lost the room (another actor took it)
# and gets room made again. (Ray itself gives a worker process 60 s to register.)
HANDOVER_S = 30.0
# A claim is forgotten after this long, whatever Ray reports.
CLAIM_MAX_S = 120.0
WAITING_FOR = {
    "GPU": "waiting for a GPU",
    GPU_MEMORY_RESOURCE: "waiting for GPU memory",
    "CPU": "waiting for CPU",
}


def server_need(family: Family, num_gpus: float) -> dict[str, float]:
    """What a server of `family` takes from its node (`num_gpus`: 0 on a cluster without)."""
    return {"CPU": family.resources.num_cpus, "GPU": num_gpus}


def trainer_need(placement: dict[str, Any]) -> dict[str, float]:
    """What a trainer started with these Ray options (workers/actors.trainer_resources) takes."""
    need = {"CPU": float(placement.get("num_cpus") or 0), "GPU": float(placement.get("num_gpus"))}
    for name, amount in (placement.get("resources") or {}).items():
        need[name] = float(amount)
    return need


@dataclass
class Claim:
    """Resources the pool took (+) or freed (-) on a node, not yet in Ray's report."""

    node_id: str | None
    need: dict[str, float]
    sign: float
    key: str = ""  # the actor it is for
    at: float = field(default_factory=time.monotonic)
    actor_id: str = ""  # an unload's: the actor being killed
    gone_at: float | None = None  # monotonic: when Ray was seen to report it dead

    def is_current(self, now: float) -> bool:
        if self.sign > 0:
            return now - self.at < CLAIM_S
        return self.gone_at is None or now - self.gone_at < REPORT_LAG_S


@dataclass
class Candidate:
    """An idle server that may be unloaded: `rank` orders them, least wanted first."""

    key: str
    node_id: str | None
    need: dict[str, float]
    memory_gb: float
    rank: tuple[float, ...]


def is_room_on_its_way(room_at: float, unloads: Sequence[Claim], now: float) -> bool:
    """Whether the room made for an actor at `room_at` (by the unloads `unloads`, if any) may
    still be on its way to it, so that making room again would unload one server too many: an
    unloaded server not yet reported dead, or dead less than HANDOVER_S ago (the actor's worker
    process is starting there); room that was free, for CLAIM_S (Ray's report is late)."""
    if not unloads:
        return now - room_at < CLAIM_S
    if any(claim.gone_at is None for claim in unloads):
        return now - room_at < CLAIM_MAX_S  # never seen dead: forgotten as its claim is
    return now - max(claim.gone_at or 0.0 for claim in unloads) < HANDOVER_S


def free_by_node(claims: Iterable[Claim] = (), without: str = "") -> dict[str, dict[str, float]]:
    """Each alive node's free CPU, GPU and GPU memory, corrected by the pool's recent claims
    (but the one for `without`: an actor asking whether it fits does not hold what it asks)."""
    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    free = {
        node: {k: float(v) for k, v in resources.items()}
        for node, resources in ray_state.available_resources_per_node().items()
        if node in alive
    }
    now = time.monotonic()
    for claim in claims:
        if (
            claim.node_id in free
            and now - claim.at < CLAIM_S
            and (not without or claim.key != without)
        ):
            for name, amount in claim.need.items():
                free[claim.node_id][name] = free[claim.node_id].get(name, 0.0) - claim.sign * amount
    return free


def fits(free: dict[str, float], need: dict[str, float]) -> bool:
    return all(free.get(name, 0.0) + EPS >= amount for name, amount in need.items() if amount > 0)


def plan_room(
    need: dict[str, float],
    free: dict[str, dict[str, float]],
    candidates: Sequence[Candidate],
    *,
    memory_gb: float = 0.0,
    budget_gb: float | None = None,
    used_gb: Callable[[str], float] = lambda node: 0.0,
    prefer: Callable[[str], tuple[float, ...]] = lambda node: (),
) -> tuple[str, list[Candidate]] | None:
    """The node for `need` and the idle servers to unload there first (none if it fits now);
    None if no node fits even with all its idle servers gone. A node also keeps its GPU memory
    budget (`budget_gb`, the pool's own account `used_gb`) when `memory_gb` is asked. Among
    nodes that fit as they are, `prefer` picks (highest first); else the fewest, least wanted
    victims."""

    def room(node: str, victims: list[Candidate]) -> bool:
        have = dict(free[node])
        for v in victims:
            for name, amount in v.need.items():
                have[name] = have.get(name, 0.0) + amount
        if budget_gb is not None and memory_gb > 0:
            left = budget_gb - used_gb(node) + sum(v.memory_gb for v in victims)
            if left + EPS < memory_gb:
                return False
        return fits(have, need)

    ready = [node for node in free if room(node, [])]
    if ready:
        return max(ready, key=lambda node: (prefer(node), free[node].get("GPU", 0.0))), []
    plans = []
    for node in free:
        victims: list[Candidate] = []
        for candidate in sorted(candidates, key=lambda c: c.rank):
            if candidate.node_id != node:
                continue
            victims.append(candidate)
            if room(node, victims):
                plans.append((len(victims), [v.rank for v in victims], node, victims))
                break
    if not plans:
        return None
    _, _, node, victims = min(plans, key=lambda p: (p[0], p[1]))
    return node, victims


def waiting_for(need: dict[str, float], free: dict[str, dict[str, float]]) -> str:
    """The progress message of a job whose actor fits on no node: the resource it lacks on the
    node closest to holding it."""
    if not free:
        return "waiting for a Ray node"
    best: list[str] = []
    for resources in free.values():
        short = [name for name, amount in need.items() if resources.get(name, 0.0) + EPS < amount]
        if not best or len(short) < len(best):
            best = short
    if not best:
        return "waiting for resources"
    first = next((name for name in WAITING_FOR if name in best), best[0])
    return WAITING_FOR.get(first, f"waiting for {first}")


def resource_of(message: str) -> str | None:
    """The resource a `waiting_for` message names (None for other messages)."""
    return next((name for name, said in WAITING_FOR.items() if said == message), None)


def is_unplaced(actor_id_hex: str) -> bool:
    """True while Ray has not given the actor a worker process: it waits for resources (an actor
    that is loading its model has a process, and a pid)."""
    info: dict[str, Any] = {}
    with contextlib.suppress(Exception):  # the GCS briefly away: say placed, ask again later
        info = ray_state.actors(actor_id=actor_id_hex)
    return info.get("State") == "PENDING_CREATION" and not info.get("Pid")


def is_dead(actor_id_hex: str) -> bool:
    """True once Ray reports the actor dead (or forgot it)."""
    try:
        info = ray_state.actors(actor_id=actor_id_hex)
    except Exception:  # the GCS briefly away: not known dead yet
        return False
    return not info or info.get("State") == "DEAD"


def actor_node(actor_id_hex: str) -> str | None:
    """The node an actor runs on, once it has a process."""
    with contextlib.suppress(Exception):
        info = ray_state.actors(actor_id=actor_id_hex)
        if info.get("Pid"):
            return str(info["Address"]["NodeID"]) or None
    return None
