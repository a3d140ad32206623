"""Purging waiting work: an admin cancels every queued (and scheduled) job of a tenant, of a
queue, or of a tenant in a queue, at once. Each purged job ends `canceled` through the
transition table, with a state event whose reason says it was purged and by whom; running jobs
are left alone (cancel them one by one). Like `core.jobs`, it takes a session and does not
commit. Their broker messages stay behind as tokens and find nothing, or other work, to start.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import InvalidInputError
from core.jobs import set_state
from core.states import JobState
from core.tables import Job, utcnow

WAITING = (JobState.QUEUED, JobState.SCHEDULED)
# Rows locked and canceled per statement; a purge of more loops.
PURGE_CHUNK = 1000


def purge_waiting(
    session: Session, *, tenant_id: str | None, queue: str | None, reason: str
) -> list[str]:
    """Cancel the waiting jobs that match; returns their ids. At least one filter is needed,
    so that a purge never empties every queue of every tenant by omission."""
    if tenant_id is None and queue is None:
        raise InvalidInputError.one("tenant", "name a tenant or a queue (or both) to purge")
    stmt = select(Job).where(Job.state.in_(list(WAITING)))
    if tenant_id is not None:
        stmt = stmt.where(Job.tenant_id == tenant_id)
    if queue is not None:
        stmt = stmt.where(Job.queue == queue)
    purged: list[str] = []
    now = utcnow()
    while True:
        chunk = session.scalars(
            stmt.order_by(Job.id).limit(PURGE_CHUNK).with_for_update(skip_locked=True)
        ).all()
        if not chunk:
            return purged
        for job in chunk:
            set_state(session, job, JobState.CANCELED, reason=reason)
            job.finished_at = now
            purged.append(job.id)
        session.flush()
