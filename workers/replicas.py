"""The model pool's records: what it knows of each model (`ModelSpec`: its family, serving
options, scaling policy and the scaler's wish), of each replica it started (`Replica`: where it
runs, its need, its last info() answer and the load from it) and of each trainer it watches
until Ray places it (`Waiter`), with the questions the pool asks one replica (is it alive, is it
idle) and the row of the pool's info() that describes it. The pool (workers/pool.py) owns the
decisions; these records only hold what it decided and what the replicas reported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.actor import ActorHandle

from core.scaling import Policy
from workers.actors import NAMESPACE, model_server_name
from workers.room import Claim
from workers.server import ServingOptions

INFO_TIMEOUT_S = 2.0
# A server handed out less than this long ago is handed out again without asking Ray whether
# it is still alive (a lookup per job costs more than a small job). It may have crashed since,
# but a server can die just after any check, so that case is handled anyway: the job sees
# ActorDiedError and is retried, and the next acquire looks.
ALIVE_TRUST_S = 1.0


def mean_in_hand(earlier: dict[str, Any], later: dict[str, Any]) -> float | None:
    """A server's mean jobs in hand between two of its info() answers (its job-seconds in hand
    over the seconds between them, both on its own clock); None without two answers."""
    if "in_hand_job_s" not in earlier or "in_hand_job_s" not in later:
        return None
    elapsed_s = later["clock_s"] - earlier["clock_s"]
    if elapsed_s <= 0:
        return None
    return max(0.0, later["in_hand_job_s"] - earlier["in_hand_job_s"]) / elapsed_s


def trust_s(options: ServingOptions) -> float:
    return min(ALIVE_TRUST_S, options.idle_unload_s or ALIVE_TRUST_S)


def free_replica_name(model_id: str, taken: set[str]) -> str:
    """The actor name of a new replica of `model_id`: the lowest index no replica holds."""
    index = next(i for i in range(1, len(taken) + 2) if model_server_name(model_id, i) not in taken)
    return model_server_name(model_id, index)


@dataclass
class ModelSpec:
    model_id: str
    family: str
    model_dir: str | None
    config: dict[str, Any]
    options: ServingOptions
    policy: Policy
    desired: int = 0  # the scaler's wish; 0: one replica is started when a job comes
    scaled_at: float = 0.0  # monotonic: the last replica started or unloaded


@dataclass
class Replica:
    key: str  # the actor's name
    model_id: str
    family: str
    handle: ActorHandle
    need: dict[str, float]
    memory_gb: float
    node_id: str | None
    started_at: float  # wall clock
    last_used: float  # monotonic: handed out, or seen with a job in hand
    priority: int = 0
    ready: bool = False  # loaded: its info() answered
    waiting: str = ""  # why Ray has not placed it yet
    in_hand: int = 0
    # Mean jobs in hand between its last two info() answers (None until two have come): the
    # load the scaler sizes the model by.
    load: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    info_ref: Any = None
    info_at: float = 0.0
    room_at: float = 0.0  # monotonic: when room was last made for it
    unloads: list[Claim] = field(default_factory=list)  # the unloads that made it

    @property
    def actor_id(self) -> str:
        return str(self.handle._actor_id.hex())

    def take_info(self, info: dict[str, Any], now: float) -> None:
        """Its info() answered (`now`: monotonic): it is loaded, placed, and has jobs in hand."""
        self.info_ref = None
        self.load = mean_in_hand(self.info, info)
        self.info = info
        self.ready = True
        self.waiting = ""
        self.node_id = info.get("node_id") or self.node_id
        self.in_hand = len(info["active_jobs"])
        if self.in_hand:
            self.last_used = now

    def describe(self, now: float) -> dict[str, Any]:
        """Its row of the pool's info() (`now`: monotonic)."""
        return {
            "model_id": self.model_id,
            "replica": self.key,
            "family": self.family,
            "node_id": self.node_id,
            "num_gpus": self.need.get("GPU", 0.0),
            "memory_gb": self.memory_gb,
            "idle_s": now - self.last_used,
            "started_at": self.started_at,
            "ready": self.ready,
            "waiting": self.waiting,
            "in_hand": self.in_hand,
            "mean_in_hand": self.load,
            "load_s": self.info.get("load_s"),
            "gpu_ids": self.info.get("gpu_ids", []),
            "node_ip": self.info.get("node_ip"),
            "batching": self.info.get("batching", {}),
        }


@dataclass
class Waiter:
    """A trainer the runner started: watched until Ray places it."""

    key: str
    actor_id: str
    need: dict[str, float]
    priority: int
    since: float
    waiting: str = ""
    room_at: float = 0.0  # monotonic: when room was last made for it
    unloads: list[Claim] = field(default_factory=list)  # the unloads that made it


def is_idle(replica: Replica, window_s: float) -> bool:
    """No job in hand now (asked), and none handed out within `window_s` (a worker process may
    still send it one it took from its cache)."""
    if not replica.ready or time.monotonic() - replica.last_used < window_s:
        return False
    try:
        info = ray.get(replica.handle.info.remote(), timeout=INFO_TIMEOUT_S)
    except Exception:  # busy loading, or gone: not a victim to pick now
        return False
    return not info["active_jobs"]


def is_alive(replica: Replica) -> bool:
    """Ray still holds the very actor this record started (not a namesake started since)."""
    try:
        current = ray.get_actor(replica.key, namespace=NAMESPACE)
    except ValueError:  # no such actor: it was killed or died
        return False
    return bool(current._actor_id == replica.handle._actor_id)


class ScaleLog:
    """The pool's last MAX_EVENTS scale events (a replica started, unloaded, evicted for room,
    or replaced when stalled) and evictions, for the dashboard and the snapshots."""

    MAX_EVENTS = 200

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.evictions: list[dict[str, Any]] = []

    def record(self, model_id: str, kind: str, replica: str, reason: str, replicas: int) -> None:
        """`kind` happened to `replica` of `model_id` for `reason`; `replicas` are left."""
        at = time.time()
        self.events.append(
            {
                "model_id": model_id,
                "event": kind,
                "replica": replica,
                "reason": reason,
                "replicas": replicas,
                "at": at,
            }
        )
        del self.events[: -self.MAX_EVENTS]
        if kind == "evict":
            self.evictions.append(
                {"model_id": model_id, "replica": replica, "at": at, "reason": reason}
            )
            del self.evictions[: -self.MAX_EVENTS]
