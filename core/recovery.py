"""The periodic repairs of the job table: reap jobs whose lease expired (requeue them, or fail
them as `lost` once their attempts are used up), fail waiting jobs whose deadline passed, start
delayed jobs, and find queued jobs whose broker message may be gone. Like `core.jobs`, each
function takes a session and does not commit; several schedulers may run them at once (rows are
locked with SKIP LOCKED).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import nulls_first, or_, select, update
from sqlalchemy.orm import Session

from core.jobs import set_state
from core.states import JobState
from core.tables import Job, utcnow
from core.usage import charge_attempt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reaped:
    job_id: str
    state: JobState
    attempt: int = 0
    # When a requeued job may be claimed again (None: at once).
    not_before: datetime | None = None


def reap_expired(
    session: Session, *, limit: int = 100, backoff_s: Callable[[int], float] | None = None
) -> list[Reaped]:
    """Handle jobs whose lease expired (their worker died or lost contact): requeue them while
    attempts remain, fail them as `lost` when not, and finish canceling ones as canceled.
    A requeued job is not claimed again for `backoff_s(attempt)` seconds (`not_before`)."""
    now = utcnow()
    jobs = session.scalars(
        select(Job)
        .where(Job.state.in_([JobState.RUNNING, JobState.CANCELING]), Job.lease_expires_at < now)
        .order_by(Job.lease_expires_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    reaped = []
    for job in jobs:
        # The attempt held its slot until its lease ran out, at the latest.
        charge_attempt(session, job, min(now, job.lease_expires_at or now))
        job.preempt_requested_at = None
        if job.state == JobState.CANCELING:
            set_state(session, job, JobState.CANCELED, reason="lease expired while canceling")
            job.finished_at = now
        elif job.attempt >= job.max_attempts:
            set_state(session, job, JobState.FAILED, reason="lease expired")
            job.error_type = "lost"
            job.error_detail = (
                f"the worker stopped answering during attempt {job.attempt} of {job.max_attempts}"
            )
            job.finished_at = now
        else:
            set_state(session, job, JobState.QUEUED, reason="lease expired")
            job.published_at = None
            delay_s = backoff_s(job.attempt) if backoff_s is not None else 0.0
            job.not_before = now + timedelta(seconds=delay_s) if delay_s > 0 else None
        job.lease_token = None
        job.lease_expires_at = None
        reaped.append(Reaped(job.id, JobState(job.state), job.attempt, job.not_before))
        log.warning("reaped job", extra={"job_id": job.id, "state": job.state})
    return reaped


def expire_deadlines(session: Session, *, limit: int = 500) -> list[str]:
    """Fail waiting jobs whose deadline passed before they started (no worker needs to pick
    them up for that); returns their ids."""
    now = utcnow()
    jobs = session.scalars(
        select(Job)
        .where(Job.state.in_([JobState.QUEUED, JobState.SCHEDULED]), Job.deadline <= now)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    for job in jobs:
        set_state(session, job, JobState.FAILED, reason="deadline")
        job.error_type = "deadline"
        job.error_detail = "the job's deadline passed before it could start"
        job.finished_at = now
    return [job.id for job in jobs]


def promote_due(session: Session, *, limit: int = 500) -> list[str]:
    """Move scheduled jobs whose run_at has come to queued; returns their ids to publish."""
    now = utcnow()
    jobs = session.scalars(
        select(Job)
        .where(Job.state == JobState.SCHEDULED, Job.run_at <= now)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    for job in jobs:
        set_state(session, job, JobState.QUEUED, reason="run_at reached")
    return [job.id for job in jobs]


def unpublished_jobs(session: Session, *, older_than_s: float, limit: int = 1000) -> list[str]:
    """Queued jobs never published, or whose message was last sent or confirmed more than
    `older_than_s` ago, oldest check first (so that repeated rounds scan the whole queue)."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    return list(
        session.scalars(
            select(Job.id)
            .where(
                Job.state == JobState.QUEUED,
                or_(Job.published_at.is_(None), Job.published_at < cutoff),
            )
            .order_by(nulls_first(Job.published_at.asc()), Job.id)
            .limit(limit)
        ).all()
    )


def mark_published(session: Session, job_ids: Iterable[str]) -> None:
    ids = list(job_ids)
    if ids:
        session.execute(update(Job).where(Job.id.in_(ids)).values(published_at=utcnow()))
