"""What a broker message does besides starting a job. A message on a queue is a token for a
free slot there, not a claim on the job it names (scheduler/runner.py). The runner turns to
these when a token could not be used: the claim's transaction failed (`claim_failed`), nothing
on the queue may start now (`unused_token`), or a job of a tenant with quotas ended and its
held jobs may need a new token (`wake_held`). Each keeps the number of messages in the broker
matched to the queued jobs, with the reconciler (scheduler/periodic.py) as the backstop.
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from core.states import JobState
from core.tables import Job, utcnow
from scheduler.attempt import WorkerParts
from scheduler.enqueue import Publication
from scheduler.outcomes import BROKER_ERRORS

log = logging.getLogger(__name__)


def claim_failed(parts: WorkerParts, job_id: str, queue: str | None, exc: Exception) -> str:
    """The claim's transaction failed (nothing of it was written): the message that
    carried the token is consumed, so the job gets a new one, after the first backoff;
    where that cannot be sent (or the queue is not known) its marker is dropped, and the
    reconciler re-publishes it within GENQ_REPUBLISH_AFTER_S."""
    log.warning("the claim failed; the job stays queued: %s: %s", type(exc).__name__, exc,
                extra={"job_id": job_id})  # fmt: skip
    sent = []
    if queue:
        again = Publication(job_id, queue, countdown_s=parts.settings.retry_backoff_base_s)
        sent = parts.publisher.publish(parts.database, [again], mark=False)
    if not sent:
        try:
            parts.publisher.forget(job_id)
        except BROKER_ERRORS:
            log.exception("could not drop the message marker", extra={"job_id": job_id})
    return "claim-failed"


def unused_token(parts: WorkerParts, job_id: str, queue: str) -> str:
    """A token that found nothing to start: every queued job of the queue waits for its
    backoff or its tenant's quota (or the queue is empty). Its own job, if waiting for a
    backoff, gets its message back when due. Otherwise one queued job (its own, if still
    queued) keeps its marker for only `held_recheck_s`: then the reconciler sends a new
    token, unless the end of a job of a capped tenant has sent one sooner."""
    now = utcnow()
    with parts.database.transaction() as session:
        row = session.get(Job, job_id)
        state = row.state if row is not None else "missing"
        due_in_s = None
        if row is not None and row.state == JobState.QUEUED and row.not_before is not None:
            due_in_s = (row.not_before - now).total_seconds()
        waiting = list(
            session.scalars(
                select(Job.id)
                .where(Job.state == JobState.QUEUED, Job.queue == queue)
                .order_by(Job.id)
                .limit(50)
            )
        )
    if due_in_s is not None and due_in_s > 0:
        assert row is not None
        parts.publisher.publish(
            parts.database, [Publication(job_id, queue, row.priority, countdown_s=due_in_s)]
        )
    else:
        first = [job_id] if state == JobState.QUEUED else []
        if parts.publisher.hold(first + waiting, parts.settings.held_recheck_s) is None and first:
            parts.publisher.forget(job_id)
    log.info("not claimed (state %s)", state, extra={"job_id": job_id})
    return f"skipped:{state}"


def wake_held(parts: WorkerParts, tenant_id: str) -> None:
    """A job of a tenant with quotas ended: its queued jobs' tokens may have been used up
    while it was at its cap, so send one more. It is sent whether or not one is in flight:
    checking would race with a token being turned away right now, and a spare token only
    finds nothing to start (or starts other work)."""
    try:
        with parts.database.transaction() as session:
            first = session.execute(
                select(Job.id, Job.queue, Job.priority)
                .where(Job.state == JobState.QUEUED, Job.tenant_id == tenant_id)
                .order_by(Job.priority.desc(), Job.created_at)
                .limit(1)
            ).first()
        if first is not None:
            parts.publisher.publish(
                parts.database, [Publication(first.id, first.queue, first.priority)]
            )
    except Exception:  # the reconciler covers it
        log.exception("could not wake the held jobs of tenant %s", tenant_id)
