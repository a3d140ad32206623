"""Job services: create, claim, heartbeat, record events and outputs, finish, cancel and
retry (the periodic reaping and republishing are in `core.recovery`). Each takes a session and
does not commit: the caller owns the transaction (and publishes to the broker only after it
commits).

Claiming is one conditional UPDATE that only one caller can win. Every later write about a
running job is fenced by its lease token: the row is locked, and a caller whose token is no
longer the job's gets LeaseLostError and changes nothing.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

from sqlalchemy import Table, bindparam, insert, inspect, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, make_transient, make_transient_to_detached
from sqlalchemy.orm.util import identity_key

from core.artifacts import StoredFile
from core.errors import IllegalTransitionError, InvalidInputError, LeaseLostError, NotFoundError
from core.events import Event, Output, Progress, event_data, event_type, without_nul
from core.ids import new_id
from core.states import ACTIVE, JobKind, JobState, check_transition
from core.tables import Artifact, Job, JobEvent, UTCDateTime, utcnow
from core.usage import charge_attempt, start_attempt
from core.webhooks import enqueue_delivery

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lease:
    """Proof that the holder claimed a job; every write about the running job presents it."""

    job_id: str
    token: str
    attempt: int


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


def retry_backoff_s(attempt: int, *, base_s: float, cap_s: float) -> float:
    """Delay before attempt `attempt + 1`: exponential in the attempts used, capped, with
    jitter (half to all of it) so that jobs failed by one outage do not return in lockstep."""
    delay = min(cap_s, base_s * 2.0 ** max(0, attempt - 1))
    return delay * (0.5 + random.random() / 2)


def _execute(session: Session, statement: Any) -> CursorResult[Any]:
    """Run an UPDATE and return its cursor result (for rowcount)."""
    return cast(CursorResult[Any], session.execute(statement))


def _add_event(session: Session, job: Job, type_: str, data: dict[str, Any]) -> None:
    data = without_nul(data)
    if inspect(job).persistent and not any(isinstance(o, JobEvent) for o in session.new):
        # Nobody reads the event back as an object: a Core INSERT, sent now, costs a fraction
        # of the ORM's flush of one (a unit of work, RETURNING its id, an identity to keep),
        # which the job path paid for each of its events. Ids keep the order of the calls: an
        # event still pending in the session, or a job row not yet written (its INSERT must
        # come first), takes the ORM's way, flushed in order with the rest.
        session.connection().execute(
            _INSERT_EVENT, {"job_id": job.id, "type": type_, "data": data, "created_at": utcnow()}
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


# Statements that run for every job, built once (building one costs SQLAlchemy more than
# running it), as Core statements on the job table: the ORM's handling of a statement (its
# cache key rebuilt per execution, its row processing) cost the claim and the finish more
# than the statements did. Bound parameter names differ from column names, as UPDATE requires.
_JOB_TABLE = cast(Table, Job.__table__)
# The columns that the writes of a running attempt read (progress, events, placement, outputs,
# the finish, a heartbeat, a release): what the fence reads. A job row has 50 columns, and
# reading each (and psycopg's column description of each) cost the finishing transaction
# more than its statements; any other column is loaded on first use, in the same
# transaction (the row is already locked).
_FENCE_COLUMNS = (
    "id",
    "tenant_id",
    "kind",
    "state",
    "attempt",
    "max_attempts",
    "lease_token",
    "metrics",
    "webhook",
    "webhook_events",
    "num_gpus",
    "started_at",
    "waiting_since",
)
# What the claim returns of the row it takes: the fence's columns, what it wrote, and what the
# runner's snapshot of the job reads (scheduler/attempt.py).
_CLAIMED_COLUMNS = (
    *_FENCE_COLUMNS,
    "queue",
    "family",
    "priority",
    "params",
    "target_name",
    "model_id",
    "dataset_id",
    "timeout_s",
    "gpu_memory_gb",
    "request_id",
    "lease_expires_at",
    "updated_at",
    "error_type",
    "error_detail",
    "waiting_for",
)
_CLAIM = (
    update(_JOB_TABLE)
    .where(
        _JOB_TABLE.c.id == bindparam("job_id"),
        _JOB_TABLE.c.state == JobState.QUEUED,
        _JOB_TABLE.c.attempt < _JOB_TABLE.c.max_attempts,
        or_(
            _JOB_TABLE.c.deadline.is_(None),
            _JOB_TABLE.c.deadline > bindparam("now", type_=UTCDateTime()),
        ),
    )
    .values(
        state=JobState.RUNNING,
        attempt=_JOB_TABLE.c.attempt + 1,
        lease_token=bindparam("token"),
        lease_expires_at=bindparam("expires_at", type_=UTCDateTime()),
        started_at=bindparam("now", type_=UTCDateTime()),
        updated_at=bindparam("now", type_=UTCDateTime()),
        error_type=None,
        error_detail=None,
        waiting_for=None,
        waiting_since=bindparam("now", type_=UTCDateTime()),  # not placed yet
    )
    # The claimed row comes back from the UPDATE itself: no second read.
    .returning(*(_JOB_TABLE.c[name] for name in _CLAIMED_COLUMNS))
)
_FENCE = (
    select(*(_JOB_TABLE.c[name] for name in _FENCE_COLUMNS))
    .where(_JOB_TABLE.c.id == bindparam("job_id"))
    .with_for_update()
)
_JOB = select(Job).where(Job.id == bindparam("job_id"))
_INSERT_EVENT = insert(cast(Table, JobEvent.__table__))
_ARTIFACT_TABLE = cast(Table, Artifact.__table__)
# An output's row, unless the job has one of that name already (by dialect: the clause is
# each one's own). Its id comes back when it went in (an INSERT's rowcount is not reliable:
# psycopg's reads -1).
_INSERT_OUTPUT = {
    name: insert_of(_ARTIFACT_TABLE)
    .on_conflict_do_nothing(index_elements=["job_id", "name"])
    .returning(_ARTIFACT_TABLE.c.id)
    for name, insert_of in (("postgresql", pg_insert), ("sqlite", sqlite_insert))
}
_LOCKED_JOB = _JOB.with_for_update()
_OUTPUT_ID_NAMED = select(Artifact.id).where(
    Artifact.job_id == bindparam("job_id"), Artifact.name == bindparam("name")
)


def get_job(session: Session, job_id: str, *, lock: bool = False) -> Job:
    job = session.scalar(_LOCKED_JOB if lock else _JOB, {"job_id": job_id})
    if job is None:
        raise NotFoundError(f"no job {job_id}")
    return job


def claim_job(
    session: Session, job_id: str, *, lease_ttl_s: float, now: datetime | None = None
) -> Lease | None:
    """Move a queued job to running for the caller, or return None when another caller (or an
    earlier delivery) already has it, it is no longer queued, or its deadline has passed (it
    fails then). `now`: the time of the claim (a simulation's clock; the real one otherwise)."""
    now = now or utcnow()
    token = new_id()
    held = session.identity_map.get(identity_key(Job, job_id))
    if held is not None:
        session.flush()  # the copy's changes go first, as the ORM's autoflush would send them
    params = {
        "job_id": job_id,
        "now": now,
        "token": token,
        "expires_at": now + timedelta(seconds=lease_ttl_s),
    }
    row = session.connection().execute(_CLAIM, params).first()
    if row is None:
        _fail_past_deadline(session, job_id, now)
        return None
    if held is None:
        job = _adopt(session, Job, row._mapping)
    else:  # a copy the session held is read again when next used
        session.expire(held)
        job = held
    _held_leases(session)[token] = job
    start_attempt(session, job)
    _add_event(session, job, "state", {"from": "queued", "to": "running", "attempt": job.attempt})
    return Lease(job_id, token, job.attempt)


_T = TypeVar("_T", Job, Artifact)


def _adopt(session: Session, entity: type[_T], values: Mapping[Any, Any]) -> _T:
    """Put a row that a Core statement read or wrote into the session as if the ORM had
    loaded it (the columns not given load when first used); the session holds no copy of
    it. The values go into the new object as loaded ones, without the attribute events of
    its constructor, which cost several times as much."""
    obj = cast(_T, inspect(entity).class_manager.new_instance())
    obj.__dict__.update(values)
    make_transient_to_detached(obj)
    session.add(obj)
    return obj


# UPDATEs of the job row by the set of columns they write, each built once: `_write_job`
# sends the changes of a running attempt's last transaction (its own, the placement's, the
# progress') through one of these. The sets are few (one per path that ends an attempt);
# past the cap an unusual set is left to the ORM's flush.
_WRITES: dict[frozenset[str], Any] = {}
_WRITES_CAP = 64


def _write_statement(keys: frozenset[str]) -> Any:
    statement = _WRITES.get(keys)
    if statement is None and len(_WRITES) < _WRITES_CAP:
        statement = (
            update(_JOB_TABLE)
            .where(_JOB_TABLE.c.id == bindparam("job_id"))
            .values(
                {key: bindparam(f"new_{key}", type_=_JOB_TABLE.c[key].type) for key in sorted(keys)}
            )
        )
        _WRITES[keys] = statement
    return statement


def _write_job(session: Session, job: Job) -> None:
    """Send the job row's changed columns now, in one UPDATE built once per set of columns,
    instead of the ORM's flush of the object (its unit of work cost the finishing transaction
    more than the statement). The session's copy then counts as loaded with these values."""
    state = inspect(job)
    keys = frozenset(state.committed_state)
    if not keys or not state.persistent or not keys <= state.dict.keys():
        return  # nothing changed, or an unusual case: the flush writes it
    statement = _write_statement(keys)
    if statement is None:
        return
    values = {f"new_{key}": state.dict[key] for key in keys}
    session.connection().execute(statement, {"job_id": job.id, **values})
    # Taken out of the session and put back as loaded: its changes are written.
    make_transient(job)
    make_transient_to_detached(job)
    session.add(job)


def _fail_past_deadline(session: Session, job_id: str, now: datetime) -> None:
    """A queued job whose deadline has passed fails instead of starting."""
    expired = _execute(
        session,
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.QUEUED, Job.deadline <= now)
        .values(
            state=JobState.FAILED,
            error_type="deadline",
            error_detail="the job's deadline passed before it could start",
            finished_at=now,
            updated_at=now,
        )
        .execution_options(synchronize_session=False),
    )
    if expired.rowcount:
        job = session.get(Job, job_id, populate_existing=True)
        assert job is not None
        _add_event(session, job, "state", {"from": "queued", "to": "failed", "reason": "deadline"})


def _held_leases(session: Session) -> dict[str, Job]:
    """Lease token -> job row, for the leases this transaction has claimed or checked (and so
    holds locked to its end). The session keeps strong references to these rows, so a later
    `session.get` in the transaction finds them without a query."""
    transaction = session.get_transaction()
    seen = session.info.get("held_leases")
    if seen is None or seen[0] is not transaction:
        seen = session.info["held_leases"] = (transaction, {})
    return cast(dict[str, Job], seen[1])


def _fenced(session: Session, lease: Lease, *, whole: bool = False) -> Job:
    """The job row, locked, if `lease` still holds it; otherwise LeaseLostError. The row stays
    locked to the end of the transaction, so a second check in the same transaction reads the
    session's copy (which holds this transaction's own changes) instead of the database.
    Without `whole`, the columns of `_FENCE` are read, the others when first used."""
    checked = _held_leases(session)
    job = checked.get(lease.token)
    if job is None:
        if whole or session.identity_map.get(identity_key(Job, lease.job_id)) is not None:
            # (a copy the session holds keeps its unflushed changes; its other columns load)
            job = session.scalar(_LOCKED_JOB, {"job_id": lease.job_id})
        else:
            row = session.connection().execute(_FENCE, {"job_id": lease.job_id}).first()
            job = None if row is None else _adopt(session, Job, row._mapping)
    if job is None or job.lease_token != lease.token or job.state not in ACTIVE:
        raise LeaseLostError(f"job {lease.job_id}: lease {lease.token} is no longer held")
    checked[lease.token] = job
    return job


def held_job(session: Session, lease: Lease) -> Job:
    """The job row `lease` holds, locked (LeaseLostError when it no longer holds it), every
    column read at once (its callers, such as the preemption's requeue, read more than the
    fence's few)."""
    return _fenced(session, lease, whole=True)


def change_state(session: Session, job: Job, new: JobState, **data: Any) -> None:
    """Change a job's state through the transition table, with its event (and webhook)."""
    set_state(session, job, new, **data)


def add_event(session: Session, job: Job, type_: str, data: dict[str, Any]) -> None:
    """Add an event to a job's history (and its webhook, when one wants it)."""
    _add_event(session, job, type_, data)


def heartbeat(session: Session, lease: Lease, *, lease_ttl_s: float) -> JobState:
    """Renew the lease; returns the job's state, so the holder learns of a cancel request."""
    job = _fenced(session, lease)
    job.lease_expires_at = utcnow() + timedelta(seconds=lease_ttl_s)
    return JobState(job.state)


def record_events(session: Session, lease: Lease, events: Sequence[Event]) -> None:
    """Store a batch of non-output events; the last progress event also updates the row."""
    job = _fenced(session, lease)
    for event in events:
        if isinstance(event, Output):
            raise TypeError("outputs go through record_output")
        if isinstance(event, Progress):
            job.progress_step, job.progress_total = event.step, event.total
            job.progress_message = without_nul(event.message)
        _add_event(session, job, event_type(event), event_data(event))


def record_text(
    session: Session, lease: Lease, index: int, text: str, *, again: bool = False
) -> None:
    """Store streamed text (the pieces a worker made since the last write, `index` the first
    one's) as one text_delta event that names the attempt: an attempt that runs again streams
    its text again from the start, and followers tell the attempts apart by it. `again`: the
    write is being tried again after a lost connection; it is skipped when the try before it
    did commit (the job's last text event is this one), so no text is stored twice."""
    job = _fenced(session, lease)
    data = {"index": index, "text": without_nul(text), "attempt": lease.attempt}
    if again:
        last = session.scalar(
            select(JobEvent.data)
            .where(JobEvent.job_id == job.id, JobEvent.type == "text_delta")
            .order_by(JobEvent.id.desc())
            .limit(1)
        )
        if last == data:
            return
    _add_event(session, job, "text_delta", data)


def record_placement(session: Session, lease: Lease, placement: dict[str, Any]) -> None:
    """Where this attempt runs (the node, GPUs and replica that took it), on the job row."""
    job = _fenced(session, lease)
    job.placement = without_nul(placement)
    job.waiting_for = job.waiting_since = None


def record_waiting(
    session: Session, lease: Lease, resource: str | None, now: datetime | None = None
) -> None:
    """This attempt's actor waits for Ray to place it, lacking `resource` (`GPU`,
    `gpu_memory_gb`, `CPU`), or has been placed (None). The wait counts from the claim, which
    sets `waiting_since`, whatever resource it lacks meanwhile."""
    job = _fenced(session, lease)
    if resource is None:
        job.waiting_for = job.waiting_since = None
        return
    if job.waiting_since is None:
        job.waiting_since = now or utcnow()
    job.waiting_for = resource


def record_output(session: Session, lease: Lease, output: Output, stored: StoredFile) -> Artifact:
    """Record one output file once: a second record of the same name returns the first."""
    job = _fenced(session, lease)
    if any(isinstance(pending, Artifact) for pending in session.new):
        session.flush()  # an Artifact some other code added: its row must be there to clash
    values = {
        "id": new_id(),
        "job_id": job.id,
        "tenant_id": job.tenant_id,
        "name": output.name,
        "kind": output.kind,
        "path": stored.path,
        "content_type": output.content_type,
        "size_bytes": stored.size_bytes,
        "sha256": stored.sha256,
        "meta": without_nul(output.meta),
        "created_at": utcnow(),
    }
    # A Core INSERT, sent now, instead of the ORM's flush of a new object (its unit of work
    # cost the finishing transaction more than the statement). The unique (job_id, name)
    # decides whether the name is new, in the INSERT itself: usually it is, and no lookup
    # goes first. (No other transaction can insert one meanwhile: the job row is locked.)
    conn = session.connection()
    if conn.execute(_INSERT_OUTPUT[conn.dialect.name], values).first() is None:
        # An earlier attempt recorded the name (or this one did): that row is the output.
        found = conn.execute(_OUTPUT_ID_NAMED, {"job_id": job.id, "name": output.name})
        with session.no_autoflush:
            existing = session.get(Artifact, found.scalar_one())
        assert existing is not None
        return existing
    # The row is put in the session as loaded, so that a second record of the name returns
    # this very object.
    artifact = _adopt(session, Artifact, values)
    _add_event(
        session,
        job,
        "output",
        {"artifact_id": artifact.id, **event_data(output)},
    )
    return artifact


def has_succeeded(session: Session, lease: Lease) -> bool:
    """Whether the attempt of `lease` finished the job as succeeded: what a finishing
    transaction whose commit was lost in flight (the connection died) leaves behind. Only
    the holder of a lease ever marks a job succeeded, so the attempt number tells."""
    job = session.scalar(_JOB, {"job_id": lease.job_id})
    return job is not None and job.state == JobState.SUCCEEDED and job.attempt == lease.attempt


def finish_job(
    session: Session,
    lease: Lease,
    state: JobState,
    *,
    error_type: str | None = None,
    error_detail: str | None = None,
    metrics: dict[str, Any] | None = None,
    result_model_id: str | None = None,
    now: datetime | None = None,
) -> JobState:
    """End the attempt held by `lease` (at `now`, the real time unless a simulation gives
    one). A job whose cancel was requested ends canceled whatever the attempt's outcome.
    The attempt's cost is charged to its tenant's usage. Returns the state written."""
    job = _fenced(session, lease)
    if job.state == JobState.CANCELING:
        state = JobState.CANCELED
    set_state(session, job, state, attempt=job.attempt, error_type=error_type)
    now = now or utcnow()
    job.finished_at = now
    job.preempt_requested_at = None
    job.lease_token = None
    job.lease_expires_at = None
    if state != JobState.CANCELED:
        job.error_type, job.error_detail = error_type, without_nul(error_detail)
    if metrics:
        job.metrics = {**(job.metrics or {}), **without_nul(metrics)}
    if result_model_id:
        job.result_model_id = result_model_id
    # The transaction's writes go out before the tenant's usage row is locked: the claims of
    # the tenant's next jobs wait for that lock, so it is held only for the usage write and
    # the commit. (The job row is not written again after this.)
    _write_job(session, job)
    session.flush()
    charge_attempt(session, job, now)
    return state


def release_job(
    session: Session,
    lease: Lease,
    *,
    reason: str,
    params: dict[str, Any] | None = None,
    backoff_s: float = 0.0,
    counted: bool = True,
) -> JobState:
    """Give a running job back to the queue (a transient failure) while attempts remain; a
    job whose cancel was requested ends canceled instead. Returns the state written.
    `params`, when given, replaces the job's parameters for the next attempt (the
    smaller-batch policy after an out-of-memory error); the change is in the state event.
    The job is not claimed again for `backoff_s` seconds (`not_before`). `counted=False`: the
    failure was not the job's (a database or broker error), so the attempt does not use up
    one of its `max_attempts` (the cap grows by one; the state event says so)."""
    job = _fenced(session, lease)
    if job.state == JobState.CANCELING:
        return finish_job(session, lease, JobState.CANCELED)
    if counted and job.attempt >= job.max_attempts:
        return finish_job(
            session, lease, JobState.FAILED, error_type="transient", error_detail=reason
        )
    data: dict[str, Any] = {"reason": reason}
    if not counted:
        job.max_attempts = max(job.max_attempts, job.attempt) + 1
        data["counted"] = False
    if params is not None:
        set_state(session, job, JobState.QUEUED, **data, params=params)
        job.params = params
    else:
        set_state(session, job, JobState.QUEUED, **data)
    charge_attempt(session, job, utcnow())
    job.preempt_requested_at = None
    job.lease_token = None
    job.lease_expires_at = None
    job.published_at = None
    job.not_before = utcnow() + timedelta(seconds=backoff_s) if backoff_s > 0 else None
    return JobState.QUEUED


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
