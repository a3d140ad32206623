"""`/v1/batches`: submit many jobs at once, and read a batch.

A batch's jobs are validated together (one 422 lists each bad item's fields by index:
`jobs.3.params.steps`), created in one transaction and published together after it commits;
each is an ordinary job with its own id, fair-shared, batched and listed like any other
(`GET /v1/jobs?batch=<id>` lists a batch's jobs). With an `Idempotency-Key`, the same batch
sent again returns the first one.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api import schemas
from api.auth import principal, tenant_scope
from api.intake import build_jobs, parse_items, publications, publish_jobs
from api.jobs import read_json_body
from api.payloads import iso, render_jobs
from api.state import genq
from api.submissions import check_idempotency_key, errors_from, request_hash
from core.errors import ConflictError, InvalidInputError, NotFoundError
from core.states import JobState
from core.tables import Job, JobBatch

bp = Blueprint("batches", __name__, url_prefix="/v1/batches")


class BatchSubmission(BaseModel):
    """The body of `POST /v1/batches`: job bodies as `POST /v1/jobs` takes them."""

    model_config = ConfigDict(extra="forbid", title="BatchSubmission")

    jobs: list[Any] = Field(
        ..., min_length=1, description="Job bodies, each as POST /v1/jobs takes it."
    )


def find_batch(session: Session, batch_id: str) -> JobBatch:
    """The batch if the caller may see it; 404 otherwise."""
    batch = session.get(JobBatch, batch_id)
    scope = tenant_scope()
    if batch is None or (scope is not None and batch.tenant_id != scope):
        raise NotFoundError(f"no batch {batch_id}")
    return batch


def batch_counts(session: Session, batch_id: str) -> dict[str, int]:
    """The batch's jobs by state (every state named, 0 when none)."""
    rows = session.execute(
        select(Job.state, func.count()).where(Job.batch_id == batch_id).group_by(Job.state)
    ).all()
    counts = {str(state): 0 for state in JobState}
    counts.update({state: int(n) for state, n in rows})
    return counts


def batch_payload(session: Session, batch: JobBatch) -> schemas.Batch:
    return {
        "id": batch.id,
        "size": batch.size,
        "created_at": iso(batch.created_at),
        "counts": batch_counts(session, batch.id),
        "jobs_url": f"/v1/jobs?batch={batch.id}",
    }


def _parse(body: Any, limit: int) -> BatchSubmission:
    try:
        parsed = BatchSubmission.model_validate(body)
    except ValidationError as exc:
        raise InvalidInputError(errors_from(exc)) from None
    if len(parsed.jobs) > limit:
        raise InvalidInputError.one(
            "jobs", f"holds {len(parsed.jobs)} jobs; a batch holds at most {limit}"
        )
    return parsed


def _replayed(tenant_id: str, key: str, digest: str) -> str | None:
    """The id of the batch this tenant created with `key`, if any (409 for another body)."""
    with genq().database.read() as session:
        found = session.scalar(
            select(JobBatch).where(JobBatch.tenant_id == tenant_id, JobBatch.idempotency_key == key)
        )
        if found is None:
            return None
        if found.request_hash != digest:
            raise ConflictError(
                "this Idempotency-Key was used with a different request body",
                field="Idempotency-Key",
            )
        return found.id


@bp.post("")
def submit() -> Response:
    """202 with the batch and its jobs; 200 with `Idempotency-Replayed: true` on a repeat."""
    body = read_json_body()
    key = check_idempotency_key(request.headers.get("Idempotency-Key"))
    state = genq()
    parsed = _parse(body, state.settings.batch_max_jobs)
    digest = request_hash(body)
    tenant_id = principal().tenant_id
    batch_id = _replayed(tenant_id, key, digest) if key is not None else None
    replayed = batch_id is not None
    if batch_id is None:
        submissions = parse_items(parsed.jobs)
        try:
            with state.database.transaction() as session:
                batch = JobBatch(
                    tenant_id=tenant_id,
                    kind="jobs",
                    size=len(submissions),
                    idempotency_key=key,
                    request_hash=digest,
                    meta={},
                )
                session.add(batch)
                session.flush()
                jobs = build_jobs(
                    session,
                    submissions,
                    tenant_id=tenant_id,
                    digests=[request_hash(b) for b in parsed.jobs],
                    batch_id=batch.id,
                    items=[str(i) for i in range(len(submissions))],
                    as_items=True,
                )
                batch_id, pubs = batch.id, publications(jobs)
        except IntegrityError:
            # The same key, sent twice at once: the other request created the batch.
            batch_id = _replayed(tenant_id, key, digest) if key is not None else None
            if batch_id is None:
                raise
            replayed, pubs = True, []
        publish_jobs(pubs)
    with state.database.read() as session:
        batch = find_batch(session, batch_id)
        members = list(
            session.scalars(select(Job).where(Job.batch_id == batch_id).order_by(Job.created_at))
        )
        members.sort(key=lambda job: int(job.batch_item or 0))
        payload: schemas.BatchWithJobs = {
            **batch_payload(session, batch),
            "jobs": render_jobs(session, members),
        }
    response = jsonify(payload)
    response.status_code = 200 if replayed else 202
    response.headers["Location"] = f"/v1/batches/{batch_id}"
    if replayed:
        response.headers["Idempotency-Replayed"] = "true"
    return response


@bp.get("/<batch_id>")
def get(batch_id: str) -> Response:
    """The batch with its jobs counted by state; `GET /v1/jobs?batch=<id>` lists them."""
    with genq().database.read() as session:
        return jsonify(batch_payload(session, find_batch(session, batch_id)))
