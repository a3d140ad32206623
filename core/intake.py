"""A new job's rows written with prebuilt Core INSERTs: the job, its first `state` event and,
with a webhook, the event's outbox delivery. `POST /v1/jobs` writes through it.

The ORM's unit of work cost more than everything else in the submit's write transaction, and
on SQLite that transaction holds the one write lock every other submit and claim waits for
(core/db.py). The job returned is the row as written, for the answer; it is not in the session,
so a caller that changes a job after creating it uses `core.jobs.create_job` instead.

`InsertQueue` commits the rows of jobs submitted at about the same time together (a group
commit): the thread that gets the write lock inserts every job that waits for it by then, in
one transaction of four statements, however many jobs it holds. Each submitter returns only
once its own row is committed. A group that fails (a model deleted between the reads and the
insert, say) is tried again one job per transaction, so one bad row fails only its own request.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db import Database
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
    session.execute(_INSERT_EVENT, first_event(row))
    data = first_event(row)["data"]
    job = Job(**row)
    # The webhook message is written in the same transaction as the event (an outbox).
    if job.webhook:
        enqueue_delivery(session, job, "state", data)
    return job, True


def first_event(row: dict[str, Any]) -> dict[str, Any]:
    """The `state` event row of a job row just written."""
    data = without_nul({"from": None, "to": row["state"]})
    return {"job_id": row["id"], "type": "state", "data": data, "created_at": row["created_at"]}


@dataclass
class _Waiting:
    row: dict[str, Any]
    wake: threading.Event = field(default_factory=threading.Event)
    lead: bool = False
    done: bool = False
    error: BaseException | None = None


class InsertQueue:
    """Group commits of new jobs for one process (see the module). Only for jobs without an
    idempotency key or a webhook, of tenants without a submission limit: those are written
    through `insert_job` in a transaction of their own (the key needs a savepoint, the limit a
    count in the same transaction)."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._lock = threading.Lock()
        self._waiting: list[_Waiting] = []
        self._leading = False

    def waiting(self) -> int:
        """How many submitted jobs wait for the next group."""
        with self._lock:
            return len(self._waiting)

    def insert(self, new: NewJob) -> Job:
        """Commit the job's rows, marked as published (see `job_row`); returns the job."""
        assert not new.idempotency_key and not new.webhook
        me = _Waiting(job_row(new, now=utcnow(), published=True))
        with self._lock:
            self._waiting.append(me)
            lead = not self._leading
            self._leading = True
        while not me.done:
            if not lead:
                me.wake.wait()
                with self._lock:
                    me.wake.clear()
                    lead, me.lead = me.lead, False
            if lead:
                self._commit_group()
                lead = False
        if me.error is not None:
            # Its group failed as a whole: alone, it fails only if its own row is the bad one.
            with self.database.write() as conn:
                conn.execute(_INSERT_JOB, me.row)
                conn.execute(_INSERT_EVENT, first_event(me.row))
        return Job(**me.row)

    def _commit_group(self) -> None:
        group: list[_Waiting] = []
        error: BaseException | None = None
        try:
            with self.database.write() as conn:
                # Taken once the write lock is held: whoever queued meanwhile comes along.
                with self._lock:
                    group, self._waiting = self._waiting, []
                conn.execute(_INSERT_JOB, [w.row for w in group])
                conn.execute(_INSERT_EVENT, [first_event(w.row) for w in group])
        except BaseException as exc:
            error = exc
            if not isinstance(exc, Exception):
                raise
        finally:
            # Never leaves a waiting submitter without a leader, whatever happened above.
            with self._lock:
                if not group:  # failed before it took the group
                    group, self._waiting = self._waiting, []
                if self._waiting:  # queued after the group was taken: the first one leads
                    self._waiting[0].lead = True
                    self._waiting[0].wake.set()
                else:
                    self._leading = False
                for waiting in group:
                    waiting.error, waiting.done = error, True
                    waiting.wake.set()
