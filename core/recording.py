"""What a running attempt records, each write fenced by its lease (`core.leases.fence`):
its events (logs, metrics, progress, streamed text), where it runs and what it waits for, and
its output files, each name recorded once per job. Each takes a session and does not commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from core.artifacts import StoredFile
from core.events import Event, Output, Progress, event_data, event_type, without_nul
from core.ids import new_id
from core.jobs import add_event
from core.leases import Lease, adopt_row, fence
from core.statements import Prepared
from core.tables import Artifact, JobEvent, utcnow

_ARTIFACT_TABLE = cast(Table, Artifact.__table__)
# An output's row, unless the job has one of that name already (by dialect: the clause is
# each one's own). Its id comes back when it went in (an INSERT's rowcount is not reliable:
# psycopg's reads -1).
_OUTPUT_COLUMNS = (
    "id",
    "job_id",
    "tenant_id",
    "name",
    "kind",
    "path",
    "content_type",
    "size_bytes",
    "sha256",
    "meta",
    "created_at",
)
_INSERT_OUTPUT = {
    name: Prepared(
        insert_of(_ARTIFACT_TABLE)
        .on_conflict_do_nothing(index_elements=["job_id", "name"])
        .returning(_ARTIFACT_TABLE.c.id),
        keys=_OUTPUT_COLUMNS,
    )
    for name, insert_of in (("postgresql", pg_insert), ("sqlite", sqlite_insert))
}
_OUTPUT_ID_NAMED = Prepared(
    select(Artifact.id).where(
        Artifact.job_id == bindparam("job_id"), Artifact.name == bindparam("name")
    )
)


def record_events(session: Session, lease: Lease, events: Sequence[Event]) -> None:
    """Store a batch of non-output events; the last progress event also updates the row."""
    job = fence(session, lease)
    for event in events:
        if isinstance(event, Output):
            raise TypeError("outputs go through record_output")
        if isinstance(event, Progress):
            job.progress_step, job.progress_total = event.step, event.total
            job.progress_message = without_nul(event.message)
        add_event(session, job, event_type(event), event_data(event))


def record_text(
    session: Session, lease: Lease, index: int, text: str, *, again: bool = False
) -> None:
    """Store streamed text (the pieces a worker made since the last write, `index` the first
    one's) as one text_delta event that names the attempt: an attempt that runs again streams
    its text again from the start, and followers tell the attempts apart by it. `again`: the
    write is being tried again after a lost connection; it is skipped when the try before it
    did commit (the job's last text event is this one), so no text is stored twice."""
    job = fence(session, lease)
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
    add_event(session, job, "text_delta", data)


def record_placement(session: Session, lease: Lease, placement: dict[str, Any]) -> None:
    """Where this attempt runs (the node, GPUs and replica that took it), on the job row."""
    job = fence(session, lease)
    job.placement = without_nul(placement)
    job.waiting_for = job.waiting_since = None


def record_waiting(
    session: Session, lease: Lease, resource: str | None, now: datetime | None = None
) -> None:
    """This attempt's actor waits for Ray to place it, lacking `resource` (`GPU`,
    `gpu_memory_gb`, `CPU`), or has been placed (None). The wait counts from the claim, which
    sets `waiting_since`, whatever resource it lacks meanwhile."""
    job = fence(session, lease)
    if resource is None:
        job.waiting_for = job.waiting_since = None
        return
    if job.waiting_since is None:
        job.waiting_since = now or utcnow()
    job.waiting_for = resource


def record_output(session: Session, lease: Lease, output: Output, stored: StoredFile) -> Artifact:
    """Record one output file once: a second record of the same name returns the first."""
    job = fence(session, lease)
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
    if _INSERT_OUTPUT[conn.dialect.name].run(conn, values).first() is None:
        # An earlier attempt recorded the name (or this one did): that row is the output.
        found = _OUTPUT_ID_NAMED.run(conn, {"job_id": job.id, "name": output.name})
        with session.no_autoflush:
            existing = session.get(Artifact, found.scalar_one())
        assert existing is not None
        return existing
    # The row is put in the session as loaded, so that a second record of the name returns
    # this very object.
    artifact = adopt_row(session, Artifact, values)
    add_event(
        session,
        job,
        "output",
        {"artifact_id": artifact.id, **event_data(output)},
    )
    return artifact
