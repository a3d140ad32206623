"""Job services: create, get, cancel, retry and reprioritise a job, and record its events
(each state change through the transition table, with its `state` event and webhook). The
life of a running attempt is in `core.leases` (claim, fence, heartbeat, finish, release) and
`core.recording` (what the attempt records while it runs); the periodic reaping and
republishing are in `core.recovery`. Each service takes a session and does not commit: the
caller owns the transaction (and publishes to the broker only after it commits).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, insert, inspect, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.errors import IllegalTransitionError, InvalidInputError, NotFoundError
from core.events import without_nul
from core.ids import new_id
from core.statements import Prepared
from core.states import JobKind, JobState, check_transition
from core.tables import Job, JobEvent, utcnow
from core.webhooks import enqueue_delivery

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewJob:
    """What a validated submission carries into `create_job`."""

    tenant_id: str
    kind: JobKind
    family: str
    queue: str
    params: dict[str, Any]
    model_id: str | None = None
    dataset_id: str | None = None
    target_name: str | None = None
    priority: int = 5
    idempotency_key: str | None = None
    request_hash: str | None = None
    webhook: str | None = None
    webhook_events: list[str] | None = None
    deadline: datetime | None = None
    run_at: datetime | None = None
    max_attempts: int = 3
    timeout_s: float | None = None
    num_gpus: float = 0.0
    gpu_memory_gb: float | None = None
    schedule_id: str | None = None
    slot_at: datetime | None = None
    preemptible: bool = True
    batch_id: str | None = None
    batch_item: str | None = None
    request_id: str | None = None


def _add_event(session: Session, job: Job, type_: str, data: dict[str, Any]) -> None:
    data = without_nul(data)
    if inspect(job).persistent and not any(isinstance(o, JobEvent) for o in session.new):
        # Nobody reads the event back as an object: a Core INSERT, sent now, costs a fraction
        # of the ORM's flush of one (a unit of work, RETURNING its id, an identity to keep),
        # which the job path paid for each of its events. Ids keep the order of the calls: an
        # event still pending in the session, or a job row not yet written (its INSERT must
        # come first), takes the ORM's way, flushed in order with the rest.
        _INSERT_EVENT.run(
            session.connection(),
            {"job_id": job.id, "type": type_, "data": data, "created_at": utcnow()},
        )
    else:
        session.add(JobEvent(job_id=job.id, type=type_, data=data, created_at=utcnow()))
    # The webhook message is written in the same transaction as the event (an outbox).
    if job.webhook:
        enqueue_delivery(session, job, type_, data)


def set_state(session: Session, job: Job, new: JobState, **data: Any) -> None:
    """Move the job to `new` through the transition table (IllegalTransitionError if the table
    has no such move) and record the move as a `state` event; the caller commits."""
    check_transition(job.state, new)
    old = job.state
    job.state = new
    job.updated_at = utcnow()
    _add_event(session, job, "state", {"from": old, "to": str(new), **data})


def find_by_idempotency_key(session: Session, tenant_id: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))


def create_job(session: Session, new: NewJob) -> tuple[Job, bool]:
    """Insert the job row; returns (job, created). With an idempotency key that was already
    used by this tenant, returns the earlier job and False."""
    if new.idempotency_key:
        existing = find_by_idempotency_key(session, new.tenant_id, new.idempotency_key)
        if existing is not None:
            return existing, False
    now = utcnow()
    is_delayed = new.run_at is not None and new.run_at > now
    job = Job(
        id=new_id(),
        tenant_id=new.tenant_id,
        kind=str(new.kind),
        state=str(JobState.SCHEDULED if is_delayed else JobState.QUEUED),
        queue=new.queue,
        family=new.family,
        model_id=new.model_id,
        dataset_id=new.dataset_id,
        target_name=new.target_name,
        params=new.params,
        priority=new.priority,
        idempotency_key=new.idempotency_key,
        request_hash=new.request_hash,
        webhook=new.webhook,
        webhook_events=new.webhook_events,
        deadline=new.deadline,
        run_at=new.run_at,
        max_attempts=new.max_attempts,
        timeout_s=new.timeout_s,
        num_gpus=new.num_gpus,
        gpu_memory_gb=new.gpu_memory_gb,
        schedule_id=new.schedule_id,
        slot_at=new.slot_at,
        preemptible=new.preemptible,
        batch_id=new.batch_id,
        batch_item=new.batch_item,
        request_id=new.request_id,
        created_at=now,
        updated_at=now,
    )
    if not new.idempotency_key:
        # Nothing else can collide with a new id: the row goes in with the transaction's
        # other writes at commit (fields the caller sets before then included).
        session.add(job)
    else:
        try:
            with session.begin_nested():
                session.add(job)
                session.flush()
        except IntegrityError:
            # A concurrent request with the same idempotency key won the insert.
            existing = find_by_idempotency_key(session, new.tenant_id, new.idempotency_key)
            if existing is not None:
                return existing, False
            raise
    _add_event(session, job, "state", {"from": None, "to": job.state})
    return job, True


# Built once: every job's reads and events use them.
_JOB = select(Job).where(Job.id == bindparam("job_id"))
_LOCKED_JOB = _JOB.with_for_update()
_INSERT_EVENT = Prepared(
    insert(cast(Table, JobEvent.__table__)), keys=("job_id", "type", "data", "created_at")
)


def get_job(session: Session, job_id: str, *, lock: bool = False) -> Job:
    job = session.scalar(_LOCKED_JOB if lock else _JOB, {"job_id": job_id})
    if job is None:
        raise NotFoundError(f"no job {job_id}")
    return job


def change_state(session: Session, job: Job, new: JobState, **data: Any) -> None:
    """Change a job's state through the transition table, with its event (and webhook)."""
    set_state(session, job, new, **data)


def add_event(session: Session, job: Job, type_: str, data: dict[str, Any]) -> None:
    """Add an event to a job's history (and its webhook, when one wants it)."""
    _add_event(session, job, type_, data)


def cancel_job(session: Session, job: Job) -> JobState:
    """Queued and scheduled jobs are canceled at once; a running job becomes canceling and its
    runner stops it at the next heartbeat. Canceling again is a no-op."""
    if job.state == JobState.CANCELING:
        return JobState.CANCELING
    if job.state in (JobState.QUEUED, JobState.SCHEDULED):
        set_state(session, job, JobState.CANCELED, reason="canceled by request")
        job.finished_at = utcnow()
        return JobState.CANCELED
    set_state(session, job, JobState.CANCELING, reason="canceled by request")
    return JobState.CANCELING


def retry_job(session: Session, job: Job, *, extra_attempts: int) -> None:
    """Queue a failed or canceled job again, with `extra_attempts` more attempts."""
    set_state(session, job, JobState.QUEUED, reason="retry requested")
    job.max_attempts = job.attempt + extra_attempts
    job.error_type = job.error_detail = None
    job.finished_at = None
    job.published_at = None
    job.not_before = None
    job.outputs_purged_at = None  # its new outputs are kept again, from its new end
    job.progress_step = job.progress_total = 0
    job.progress_message = ""


PRIORITY_RANGE = range(0, 10)
# The named priority classes, onto the 0-9 scale (9 most urgent).
PRIORITY_CLASSES = {"interactive": 8, "normal": 5, "batch": 2}


def parse_priority(value: Any) -> int:
    """An integer 0-9 or a class name (interactive, normal, batch) -> the integer."""
    if isinstance(value, str) and value in PRIORITY_CLASSES:
        return PRIORITY_CLASSES[value]
    if isinstance(value, bool) or not isinstance(value, int) or value not in PRIORITY_RANGE:
        raise InvalidInputError.one(
            "priority", "must be an integer from 0 to 9 or one of interactive, normal, batch"
        )
    return value


def priority_class(priority: int) -> str:
    """The class a 0-9 priority falls in: 7-9 interactive, 4-6 normal, 0-3 batch."""
    return "interactive" if priority >= 7 else "normal" if priority >= 4 else "batch"


def set_priority(session: Session, job: Job, priority: int | str) -> int:
    """Change the priority of a job that has not started (queued or scheduled); returns the
    old one. Nothing is republished: a broker message only says that a slot is free, and the
    claim reads priorities from SQL (core/fairness.py)."""
    priority = parse_priority(priority)
    if job.state not in (JobState.QUEUED, JobState.SCHEDULED):
        raise IllegalTransitionError(
            f"only a queued or scheduled job's priority can change; this one is {job.state}"
        )
    old = job.priority
    job.priority = priority
    job.updated_at = utcnow()
    return old
