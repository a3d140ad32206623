"""The lease of a running attempt: the claim that starts it, the fence that every later write
about the running job passes, the heartbeat that renews it, and the finish or release that
ends it (with the attempt's cost charged to its tenant's usage). Each takes a session and does
not commit: the caller owns the transaction.

Claiming is one conditional UPDATE that only one caller can win. Every later write about a
running job is fenced by its lease token: the row is locked, and a caller whose token is no
longer the job's gets LeaseLostError and changes nothing.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple, TypeVar, cast

from sqlalchemy import Select, Table, bindparam, inspect, or_, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session, make_transient, make_transient_to_detached
from sqlalchemy.orm.util import identity_key

from core.errors import LeaseLostError
from core.events import without_nul
from core.ids import new_id
from core.jobs import add_event, set_state
from core.statements import Prepared
from core.states import ACTIVE, JobState
from core.tables import Artifact, Job, Model, UTCDateTime, utcnow
from core.usage import charge_attempt, start_attempt


@dataclass(frozen=True)
class Lease:
    """Proof that the holder claimed a job; every write about the running job presents it."""

    job_id: str
    token: str
    attempt: int


def retry_backoff_s(attempt: int, *, base_s: float, cap_s: float) -> float:
    """Delay before attempt `attempt + 1`: exponential in the attempts used, capped, with
    jitter (half to all of it) so that jobs failed by one outage do not return in lockstep."""
    delay = min(cap_s, base_s * 2.0 ** max(0, attempt - 1))
    return delay * (0.5 + random.random() / 2)


def _execute(session: Session, statement: Any) -> CursorResult[Any]:
    """Run an UPDATE and return its cursor result (for rowcount)."""
    return cast(CursorResult[Any], session.execute(statement))


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


class ClaimedModel(NamedTuple):
    """The claimed job's model as the claim read it: what the runner's snapshot of the job
    needs of it (scheduler/attempt.py)."""

    id: str
    path: str | None
    config: dict[str, Any] | None
    parent_id: str | None


# The model's columns come back with the claimed row, by subqueries on the model's key: the
# runner would otherwise read the model row in a statement of its own, for every job.
_MODEL_TABLE = cast(Table, Model.__table__)
_CLAIMED_MODEL = {
    f"model_{name}": select(_MODEL_TABLE.c[name])
    .where(_MODEL_TABLE.c.id == _JOB_TABLE.c.model_id)
    .scalar_subquery()
    .label(f"model_{name}")
    for name in ("path", "config", "parent_id")
}


def _claim_update(job_id: Any) -> Any:
    """The claim's conditional UPDATE of the job whose id `job_id` (a bound parameter or a
    scalar subquery) gives: it moves the job to running only while it is queued, has attempts
    left and its deadline has not passed."""
    return (
        update(_JOB_TABLE)
        .where(
            _JOB_TABLE.c.id == job_id,
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
        .returning(*(_JOB_TABLE.c[name] for name in _CLAIMED_COLUMNS), *_CLAIMED_MODEL.values())
    )


_CLAIM = Prepared(_claim_update(bindparam("job_id")))


def claim_first_statement(first: Select[Any]) -> Prepared:
    """The claim of the job that `first` (a SELECT of at most one job id) names, for
    `claim_first`; build it once."""
    return Prepared(_claim_update(first.scalar_subquery()))


_FENCE = Prepared(
    select(*(_JOB_TABLE.c[name] for name in _FENCE_COLUMNS))
    .where(_JOB_TABLE.c.id == bindparam("job_id"))
    .with_for_update()
)
_LOCKED_JOB = select(Job).where(Job.id == bindparam("job_id")).with_for_update()


def claim_job(
    session: Session, job_id: str, *, lease_ttl_s: float, now: datetime | None = None
) -> Lease | None:
    """Move a queued job to running for the caller, or return None when another caller (or an
    earlier delivery) already has it, it is no longer queued, or its deadline has passed (it
    fails then). `now`: the time of the claim (a simulation's clock; the real one otherwise)."""
    now = now or utcnow()
    if session.identity_map.get(identity_key(Job, job_id)) is not None:
        session.flush()  # the copy's changes go first, as the ORM's autoflush would send them
    params = _claim_params(now, lease_ttl_s)
    row = _CLAIM.run(session.connection(), {"job_id": job_id, **params}).first()
    if row is None:
        _fail_past_deadline(session, job_id, now)
        return None
    return _started(session, row, params["token"])


def claim_first(
    session: Session,
    statement: Prepared,
    first_params: Mapping[str, Any],
    *,
    lease_ttl_s: float,
    now: datetime,
) -> Lease | None:
    """`claim_job` for the job that a `claim_first_statement` names (its SELECT run with
    `first_params`), in one statement where a read and a claim were. None when it names none,
    or one that cannot start now (its deadline passed, another caller won it): the caller then
    looks again with `claim_job`, which says which and fails an expired job."""
    session.flush()  # what the claim's read would see: the transaction's pending changes
    params = _claim_params(now, lease_ttl_s)
    row = statement.run(session.connection(), {**first_params, **params}).first()
    return None if row is None else _started(session, row, params["token"])


def _claim_params(now: datetime, lease_ttl_s: float) -> dict[str, Any]:
    """The bound values of a claim at `now`: its time, a new lease token and the lease's end."""
    return {"now": now, "token": new_id(), "expires_at": now + timedelta(seconds=lease_ttl_s)}


def _started(session: Session, row: Any, token: str) -> Lease:
    """The claim that returned `row` won: the job row joins the session (a copy it held is read
    again when next used), its tenant's running attempts count it, and its history says it
    started."""
    values = row._mapping
    job = session.identity_map.get(identity_key(Job, row.id))
    if job is None:
        job = adopt_row(session, Job, {name: values[name] for name in _CLAIMED_COLUMNS})
    else:
        session.expire(job)
    _held_leases(session)[token] = job
    if row.model_id is not None:
        model = ClaimedModel(row.model_id, *(values[name] for name in _CLAIMED_MODEL))
        _in_transaction(session, "claimed_models")[token] = model
    start_attempt(session, job)
    add_event(session, job, "state", {"from": "queued", "to": "running", "attempt": job.attempt})
    return Lease(row.id, token, job.attempt)


_T = TypeVar("_T", Job, Artifact)


def adopt_row(session: Session, entity: type[_T], values: Mapping[Any, Any]) -> _T:
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
_WRITES: dict[frozenset[str], Prepared] = {}
_WRITES_CAP = 64


def _write_statement(keys: frozenset[str]) -> Prepared | None:
    statement = _WRITES.get(keys)
    if statement is None and len(_WRITES) < _WRITES_CAP:
        statement = Prepared(
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
    statement.run(session.connection(), {"job_id": job.id, **values})
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
        add_event(session, job, "state", {"from": "queued", "to": "failed", "reason": "deadline"})


def _held_leases(session: Session) -> dict[str, Job]:
    """Lease token -> job row, for the leases this transaction has claimed or checked (and so
    holds locked to its end). The session keeps strong references to these rows, so a later
    `session.get` in the transaction finds them without a query."""
    return cast(dict[str, Job], _in_transaction(session, "held_leases"))


def claimed_model(session: Session, lease: Lease) -> ClaimedModel | None:
    """The model of the job `lease` claimed, as the claim read it, in the claim's transaction
    (None after it, or for a job without a model)."""
    return cast(ClaimedModel | None, _in_transaction(session, "claimed_models").get(lease.token))


def _in_transaction(session: Session, key: str) -> dict[str, Any]:
    """A dict kept in `session.info` under `key` for the session's current transaction: a new
    transaction starts with an empty one."""
    transaction = session.get_transaction()
    seen = session.info.get(key)
    if seen is None or seen[0] is not transaction:
        seen = session.info[key] = (transaction, {})
    return cast(dict[str, Any], seen[1])


def fence(session: Session, lease: Lease, *, whole: bool = False) -> Job:
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
            row = _FENCE.run(session.connection(), {"job_id": lease.job_id}).first()
            job = None if row is None else adopt_row(session, Job, row._mapping)
    if job is None or job.lease_token != lease.token or job.state not in ACTIVE:
        raise LeaseLostError(f"job {lease.job_id}: lease {lease.token} is no longer held")
    checked[lease.token] = job
    return job


def held_job(session: Session, lease: Lease) -> Job:
    """The job row `lease` holds, locked (LeaseLostError when it no longer holds it), every
    column read at once (its callers, such as the preemption's requeue, read more than the
    fence's few)."""
    return fence(session, lease, whole=True)


def heartbeat(session: Session, lease: Lease, *, lease_ttl_s: float) -> JobState:
    """Renew the lease; returns the job's state, so the holder learns of a cancel request."""
    job = fence(session, lease)
    job.lease_expires_at = utcnow() + timedelta(seconds=lease_ttl_s)
    return JobState(job.state)


def has_succeeded(session: Session, lease: Lease) -> bool:
    """Whether the attempt of `lease` finished the job as succeeded: what a finishing
    transaction whose commit was lost in flight (the connection died) leaves behind. Only
    the holder of a lease ever marks a job succeeded, so the attempt number tells."""
    job = session.get(Job, lease.job_id)
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
    job = fence(session, lease)
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
    job = fence(session, lease)
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
