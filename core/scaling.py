"""Scaling policies: how many replicas (warm servers) a model version runs, and the decision the
scaler (scheduler/scaling.py) makes from the model's queue.

A policy has `min_replicas` (0: scale to zero), `max_replicas`, `target_jobs_per_replica` (the
queued plus running jobs one replica should have in hand), `idle_unload_s` (a replica above
the last one unloads after this long without a job) and `last_idle_unload_s` (the last one, 1
-> 0; never longer than `idle_unload_s`). Each family has defaults (its spec's `scaling`); a
model version may override any field (`Model.serving`, set by admins with
`PATCH /v1/models/{name}`), and the idle delays default to the deployment's settings.

The jobs a model is sized for are those its replicas have in hand: once a replica is loaded,
the mean jobs in hand the replicas report (workers/pool.py), never more than the queued plus
running jobs; before that (a cold start), the queued plus running jobs. A job queued in SQL
waits for a worker, not a replica, so it asks for no replica of its own once one is warm: a
burst of jobs that one replica answers in a millisecond each keeps one replica, a burst of slow
jobs fills the replicas' hands and grows them. The decision: up at once to ceil(jobs / target)
(0 -> 1 as soon as one job waits), down only once the lower count has held for the whole
cool-down, which is never shorter than the look-back the scaler reads the queue over; the pool
then unloads only replicas idle past their delay, so a burst that pauses briefly keeps its
replicas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt

POLICY_FIELDS = (
    "min_replicas",
    "max_replicas",
    "target_jobs_per_replica",
    "idle_unload_s",
    "last_idle_unload_s",
)
MAX_REPLICAS = 64


class PolicyChange(BaseModel):
    """The body of `PATCH /v1/models/{name}` (every version) or `.../{name}/{version}`: any of
    these; null goes back to the family's default."""

    model_config = ConfigDict(
        extra="forbid", title="ScalingChange", json_schema_extra={"minProperties": 1}
    )

    min_replicas: StrictInt | None = Field(
        None,
        ge=0,
        le=MAX_REPLICAS,
        description="Replicas kept warm without jobs; 0: scale to zero.",
    )
    max_replicas: StrictInt | None = Field(None, ge=1, le=MAX_REPLICAS)
    target_jobs_per_replica: float | None = Field(
        None,
        gt=0,
        le=10_000,
        allow_inf_nan=False,
        description="Jobs in hand per replica (queued plus running before one is loaded).",
    )
    idle_unload_s: float | None = Field(None, ge=1, le=30 * 86400, allow_inf_nan=False)
    last_idle_unload_s: float | None = Field(None, ge=1, le=30 * 86400, allow_inf_nan=False)


@dataclass(frozen=True)
class Policy:
    min_replicas: int
    max_replicas: int
    target_jobs_per_replica: float
    idle_unload_s: float | None
    last_idle_unload_s: float | None

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in POLICY_FIELDS}


def resolve_policy(
    family_defaults: dict[str, Any],
    overrides: dict[str, Any] | None,
    *,
    idle_unload_s: float | None,
    last_idle_unload_s: float | None,
) -> Policy:
    """The policy in force: the model's overrides over its family's defaults over the
    settings' idle delays. The last replica's delay is never longer than the others'."""
    merged: dict[str, Any] = {
        "idle_unload_s": idle_unload_s,
        "last_idle_unload_s": last_idle_unload_s,
        **family_defaults,
    }
    merged.update(
        {k: v for k, v in (overrides or {}).items() if k in POLICY_FIELDS and v is not None}
    )
    if merged["last_idle_unload_s"] is None or (
        merged["idle_unload_s"] is not None
        and merged["last_idle_unload_s"] > merged["idle_unload_s"]
    ):
        merged["last_idle_unload_s"] = merged["idle_unload_s"]
    return Policy(**{name: merged[name] for name in POLICY_FIELDS})


def model_policy(
    family_defaults: dict[str, Any], serving: dict[str, Any] | None, settings: Any
) -> Policy:
    """A model version's policy in force, with the deployment's idle delays (a Settings)."""
    return resolve_policy(
        family_defaults,
        serving,
        idle_unload_s=settings.model_idle_unload_s,
        last_idle_unload_s=settings.model_last_idle_unload_s,
    )


def check_policy(policy: Policy) -> list[dict[str, str]]:
    """What is wrong with a policy once merged (the fields people sent, named)."""
    errors = []
    if policy.min_replicas > policy.max_replicas:
        errors.append(
            {
                "field": "min_replicas",
                "message": f"must not exceed max_replicas ({policy.max_replicas})",
            }
        )
    return errors


@dataclass
class Decision:
    """The scaler's memory of one model: what it last wanted and since when a lower count
    would do."""

    desired: int = 0
    lower_since: float | None = None
    history: list[tuple[float, int]] = field(default_factory=list)


def wanted(jobs: int, policy: Policy, in_hand: float | None = None) -> int:
    """Replicas for `jobs` queued plus running jobs of which the loaded replicas have `in_hand`
    in hand on average (None: no replica has reported yet, so all of them count), within the
    policy's bounds (the floor wins over the ceiling: a family default the API cannot make
    inconsistent). One replica while any job is queued or running."""
    if jobs <= 0:
        raw = 0
    elif in_hand is None:
        raw = math.ceil(jobs / policy.target_jobs_per_replica)
    else:
        raw = max(1, math.ceil(min(in_hand, jobs) / policy.target_jobs_per_replica))
    return max(policy.min_replicas, min(policy.max_replicas, raw))


def decide(
    decision: Decision,
    jobs: int,
    policy: Policy,
    now: float,
    cooldown_s: float,
    in_hand: float | None = None,
) -> int:
    """The replicas to ask for now (`wanted`): more at once, fewer only after `cooldown_s` of
    lower need (hysteresis: a dip shorter than that changes nothing)."""
    target = wanted(jobs, policy, in_hand)
    if target >= decision.desired:
        decision.desired, decision.lower_since = target, None
    elif decision.lower_since is None:
        decision.lower_since = now
    elif now - decision.lower_since >= cooldown_s:
        decision.desired, decision.lower_since = target, None
    decision.history = [*decision.history[-49:], (now, decision.desired)]
    return decision.desired
