"""Creating jobs for the views that take submissions (`POST /v1/jobs`, `POST /v1/batches`, the
OpenAI-compatible calls): the checks made before the transaction, the rows written in one
transaction, and the publish to the broker after it commits.

A batch is admitted whole or not at all: every item is checked, and one 422 lists each bad
item's fields under `jobs.<index>.`; the tenant's quota counts all of its jobs at once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from api.resolution import check_fits_cluster, check_webhook_target, resolve_submission
from api.state import genq
from api.submissions import JobSubmission, parse_submission
from core.errors import ConflictError, GenqError, InvalidInputError, NotFoundError
from core.jobs import NewJob, create_job
from core.quotas import check_submission
from core.states import JobState
from core.tables import Job, utcnow
from scheduler.enqueue import Publication

log = logging.getLogger(__name__)


def cluster_nodes() -> list[dict[str, float]]:
    """The Ray nodes the workers last reported (empty when unknown or Redis is away)."""
    from scheduler.enqueue import node_resources

    try:
        return node_resources(genq().publisher.redis)
    except Exception:  # unknown: the trainer's placement refuses what cannot fit
        log.warning("no cluster snapshot to check a job's resources against", exc_info=True)
        return []


def check_outside(submission: JobSubmission) -> None:
    """The checks that need no transaction: the webhook's target and the cluster's size."""
    check_webhook_target(submission, allow_private=genq().settings.webhook_allow_private)
    if submission.resources is not None:
        check_fits_cluster(submission.resources, cluster_nodes())


def _item_errors(index: int, error: GenqError) -> list[dict[str, str]]:
    """`error` of batch item `index` as 422 entries under `jobs.<index>.`."""
    prefix = f"jobs.{index}"
    if isinstance(error, InvalidInputError):
        return [{"field": f"{prefix}.{e['field']}", "message": e["message"]} for e in error.errors]
    field = "model" if isinstance(error, NotFoundError | ConflictError) else "body"
    return [{"field": f"{prefix}.{field}", "message": error.detail}]


def parse_items(bodies: Sequence[Any]) -> list[JobSubmission]:
    """Each body parsed and checked outside the transaction; one 422 for all bad items."""
    errors: list[dict[str, str]] = []
    submissions: list[JobSubmission] = []
    for index, body in enumerate(bodies):
        try:
            submission = parse_submission(body)
            check_outside(submission)
        except (InvalidInputError, NotFoundError, ConflictError) as exc:
            errors.extend(_item_errors(index, exc))
            continue
        submissions.append(submission)
    if errors:
        raise InvalidInputError(errors)
    return submissions


def build_jobs(
    session: Session,
    submissions: Sequence[JobSubmission],
    *,
    tenant_id: str,
    digests: Sequence[str | None],
    batch_id: str | None = None,
    items: Sequence[str] | None = None,
    as_items: bool = False,
) -> list[Job]:
    """Resolve, check and insert the jobs (in the caller's transaction), marked as published:
    `publish_jobs` clears the mark of any the broker does not take. `as_items`: report errors
    under `jobs.<index>.` (a batch), all of them at once."""
    state = genq()
    check_submission(session, tenant_id, count=len(submissions))
    news: list[NewJob] = []
    errors: list[dict[str, str]] = []
    for index, submission in enumerate(submissions):
        try:
            new = resolve_submission(
                session,
                submission,
                tenant_id=tenant_id,
                max_attempts=state.settings.max_attempts,
                idempotency_key=None,
                request_digest=digests[index] or "",
            ).new
        except (InvalidInputError, NotFoundError, ConflictError) as exc:
            if not as_items:
                raise
            errors.extend(_item_errors(index, exc))
            continue
        item = items[index] if items is not None else None
        news.append(replace(new, request_hash=digests[index], batch_id=batch_id, batch_item=item))
    if errors:
        raise InvalidInputError(errors)
    jobs = [create_job(session, new)[0] for new in news]
    now = utcnow()
    for job in jobs:
        if job.state == JobState.QUEUED:
            job.published_at = now  # optimistic: cleared again if the publish fails
    return jobs


def publications(jobs: Sequence[Job]) -> list[Publication]:
    """What to publish after the commit: the queued jobs (a scheduled one waits for run_at)."""
    return [Publication(j.id, j.queue, j.priority) for j in jobs if j.state == JobState.QUEUED]


def publish_jobs(pubs: Sequence[Publication]) -> None:
    """Hand committed, queued jobs to the broker; never fails the request. The jobs were
    committed already marked as published (one transaction fewer per submit); those the
    broker did not take have the mark cleared so that the reconciler publishes them on its
    next round. Were that clearing to fail too, the reconciler still finds them once the mark
    is older than `republish_after_s` and their Redis marker is missing."""
    if not pubs:
        return
    state = genq()
    sent: list[str] = []
    try:
        sent = state.publisher.publish(state.database, list(pubs), mark=False)
    except Exception:
        log.exception("publish failed after commit", extra={"job_id": pubs[0].job_id})
    missed = [p.job_id for p in pubs if p.job_id not in set(sent)]
    if not missed:
        return
    try:
        with state.database.transaction() as session:
            session.execute(
                update(Job)
                .where(Job.id.in_(missed), Job.state == JobState.QUEUED)
                .values(published_at=None)
            )
    except Exception:
        log.exception("could not clear the publish mark", extra={"job_id": missed[0]})
