"""A new job's rows written with prebuilt Core INSERTs: the job, its first `state` event and,
with a webhook, the event's outbox delivery. `POST /v1/jobs` writes through it.

The ORM's unit of work cost more than everything else in the submit's write transaction, and
on SQLite that transaction holds the one write lock every other submit and claim waits for
(core/db.py). The job returned is the row as written, for the answer; it is not in the session,
so a caller that changes a job after creating it uses `core.jobs.create_job` instead.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.events import without_nul
from core.ids import new_id
from core.jobs import NewJob, find_by_idempotency_key
from core.states import JobState
from core.tables import Job, JobEvent, utcnow
from core.webhooks import enqueue_delivery

# Built once: every submission runs them. Core tables, not the mapped classes: an ORM-enabled
# INSERT goes through the session's bulk machinery.
_INSERT_JOB = insert(Job.__table__)  # type: ignore[arg-type]
_INSERT_EVENT = insert(JobEvent.__table__)  # type: ignore[arg-type]


def job_row(new: NewJob, *, now: datetime, published: bool) -> dict[str, Any]:
    """Every column of the new job's row, the defaults the mapping would fill in included.
    `published`: mark a queued job as handed to the broker (`published_at`), in the same
    transaction (api/intake.py `publish_jobs` clears the mark if the broker does not take it)."""
    is_delayed = new.run_at is not None and new.run_at > now
    state = JobState.SCHEDULED if is_delayed else JobState.QUEUED
    return {
        "id": new_id(),
        "tenant_id": new.tenant_id,
        "kind": str(new.kind),
        "state": str(state),
        "queue": new.queue,
        "family": new.family,
        "model_id": new.model_id,
        "dataset_id": new.dataset_id,
        "target_name": new.target_name,
        "params": new.params,
        "priority": new.priority,
        "idempotency_key": new.idempotency_key,
        "request_hash": new.request_hash,
        "attempt": 0,
        "max_attempts": new.max_attempts,
        "progress_step": 0,
        "progress_total": 0,
        "progress_message": "",
        "metrics": {},
        "webhook": new.webhook,
        "webhook_events": new.webhook_events,
        "deadline": new.deadline,
        "run_at": new.run_at,
        "timeout_s": new.timeout_s,
        "num_gpus": new.num_gpus,
        "gpu_memory_gb": new.gpu_memory_gb,
        "schedule_id": new.schedule_id,
        "slot_at": new.slot_at,
        "preemptible": new.preemptible,
        "preempt_count": 0,
        "batch_id": new.batch_id,
        "batch_item": new.batch_item,
        "request_id": new.request_id,
        "created_at": now,
        "published_at": now if published and state == JobState.QUEUED else None,
        "updated_at": now,
    }


def insert_job(session: Session, new: NewJob, *, published: bool) -> tuple[Job, bool]:
    """Insert the job's rows (in the caller's transaction); returns (job, created). With an
    idempotency key this tenant already used, returns the earlier job and False."""
    if new.idempotency_key:
        existing = find_by_idempotency_key(session, new.tenant_id, new.idempotency_key)
        if existing is not None:
            return existing, False
    row = job_row(new, now=utcnow(), published=published)
    if not new.idempotency_key:
        session.execute(_INSERT_JOB, row)
    else:
        try:
            with session.begin_nested():
                session.execute(_INSERT_JOB, row)
        except IntegrityError:
            # A concurrent request with the same idempotency key won the insert.
            existing = find_by_idempotency_key(session, new.tenant_id, new.idempotency_key)
            if existing is not None:
                return existing, False
            raise
    data = without_nul({"from": None, "to": row["state"]})
    session.execute(
        _INSERT_EVENT,
        {"job_id": row["id"], "type": "state", "data": data, "created_at": row["created_at"]},
    )
    job = Job(**row)
    # The webhook message is written in the same transaction as the event (an outbox).
    if job.webhook:
        enqueue_delivery(session, job, "state", data)
    return job, True
