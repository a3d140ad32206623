"""Estimated times for queued jobs: a model's mean run time over its latest successful runs,
the jobs running in a queue, and the ETA that a queue position (core/fairness.py) gives.
"""

from __future__ import annotations

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from core.states import JobState
from core.tables import Job

# How many of a model's latest successful runs its mean run time is taken over.
ETA_SAMPLE = 50


_SUCCEEDED = select(Job.started_at, Job.finished_at).where(Job.state == JobState.SUCCEEDED)
_LATEST_RUNS_OF_MODEL = (
    _SUCCEEDED.where(Job.model_id == bindparam("model_id"))
    .order_by(Job.finished_at.desc())
    .limit(ETA_SAMPLE)
)
_LATEST_RUNS_OF_FAMILY = (
    _SUCCEEDED.where(Job.model_id.is_(None), Job.family == bindparam("family"))
    .order_by(Job.finished_at.desc())
    .limit(ETA_SAMPLE)
)
_RUNNING_IN = (
    select(func.count())
    .select_from(Job)
    .where(Job.state.in_([JobState.RUNNING, JobState.CANCELING]), Job.queue == bindparam("queue"))
)


def mean_run_s(session: Session, model_id: str | None, family: str) -> float | None:
    """Mean run time of the model's latest successful jobs (the family's, for training jobs
    that name no model); None without history."""
    if model_id is not None:
        rows = session.execute(_LATEST_RUNS_OF_MODEL, {"model_id": model_id}).all()
    else:
        rows = session.execute(_LATEST_RUNS_OF_FAMILY, {"family": family}).all()
    runs = [(f - s).total_seconds() for s, f in rows if s is not None and f is not None]
    return sum(runs) / len(runs) if runs else None


def running_in(session: Session, queue: str) -> int:
    return int(session.scalar(_RUNNING_IN, {"queue": queue}) or 0)


def estimate_eta_s(
    *, position: int, running: int, slots: int, mean_s: float | None
) -> float | None:
    """Seconds until a queued job is expected to finish: the jobs running and ahead of it
    drain through `slots` slots (each taking the mean run time), then it runs once."""
    if mean_s is None or slots < 1:
        return None
    waves = max(0, running + position + 1 - slots) / slots
    return round(mean_s * (waves + 1), 3)
