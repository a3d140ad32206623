"""`/v1/jobs`: submit, read, list, cancel and retry jobs, and read a job's logs.

A submission reads what it names first, then its rows are written in one transaction (shared
with the submissions waiting for the write lock at the same moment: core/intake.py) and it is
published to the broker only after that commits (and only when it is `queued`: a scheduled job
is published by the periodic scheduler when its `run_at` comes). A failed publish does not fail
the request; the reconciler republishes.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Response, jsonify, request
from sqlalchemy import bindparam, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from werkzeug.exceptions import UnsupportedMediaType

from api import polling
from api.auth import principal, tenant_scope
from api.inputs import refuse_nul
from api.intake import check_outside, publish_jobs
from api.payloads import (
    event_payload,
    job_payload,
    load_context,
    render_job,
    render_jobs,
    submitted_context,
    worker_slots,
)
from api.resolution import resolve_submission
from api.state import genq
from api.submissions import check_idempotency_key, parse_submission, request_hash
from api.waits import prefer_wait_s, wait_for_jobs, wait_slot
from core.audit import Actor, record_action
from core.errors import (
    BadRequestError,
    ConflictError,
    IllegalTransitionError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
)
from core.intake import insert_job
from core.jobs import cancel_job, find_by_idempotency_key, get_job, retry_job, set_priority
from core.numbers import parse_whole
from core.quotas import check_submission, has_submission_limit, tenant_limits
from core.states import JobKind, JobState
from core.tables import SYSTEM_TENANT_ID, Job, JobEvent, Model, utcnow
from scheduler.enqueue import Publication

log = logging.getLogger(__name__)

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")


def read_json_body() -> Any:
    """The request body parsed as JSON: 415 unless it is sent as JSON, 400 if it is not
    strict JSON (413 comes from MAX_CONTENT_LENGTH while reading)."""
    if not request.is_json:
        raise UnsupportedMediaType("send the body as JSON with Content-Type: application/json")
    raw = request.get_data(cache=True)
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(raw) >= limit:
        # A chunked body: werkzeug stops reading at the limit without saying so, and the cut
        # body would be answered as "not valid JSON".
        raise PayloadTooLargeError(f"the body is larger than {limit} bytes")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise BadRequestError("the body is nested too deeply") from None
    except ValueError as exc:  # includes UnicodeDecodeError
        raise BadRequestError(f"the body is not valid JSON: {exc}") from None
    refuse_nul(body)
    return body


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity, which are not JSON and which no column stores.
    raise ValueError(f"{name} is not a JSON number")


_JOB = select(Job).where(Job.id == bindparam("job_id"))
_TENANT_JOB = _JOB.where(Job.tenant_id == bindparam("tenant_id"))
# Built once (every status request runs one): (tenant scoped, locked) -> statement.
_JOB_LOOKUPS = {
    (False, False): _JOB,
    (True, False): _TENANT_JOB,
    (False, True): _JOB.with_for_update(),
    (True, True): _TENANT_JOB.with_for_update(),
}


def find_job(session: Session, job_id: str, *, lock: bool = False) -> Job:
    """The job with `job_id` if the caller may see it; 404 otherwise."""
    scope = tenant_scope()
    stmt = _JOB_LOOKUPS[(scope is not None, lock)]
    job = session.scalar(stmt, {"job_id": job_id, "tenant_id": scope})
    if job is None:
        raise NotFoundError(f"no job {job_id}")
    return job


def publish(job_id: str, queue: str, priority: int) -> None:
    """Hand a committed, queued job to the broker; never fails the request (api.intake)."""
    publish_jobs([Publication(job_id, queue, priority)])


def _job_response(body: Mapping[str, Any], status: int) -> Response:
    response = jsonify(body)
    response.status_code = status
    response.headers["Location"] = f"/v1/jobs/{body['id']}"
    return response


@bp.post("")
def submit() -> Response:
    """Submit a job: 202 with the job and its Location.

    With an `Idempotency-Key` header, a repeat of the same request (same tenant, same key,
    same body) returns the job the first request created, as it is now, with status 200 and
    `Idempotency-Replayed: true`; the same key with a different body is a 409.

    With `Prefer: wait` (60 s) or `Prefer: wait=N` (capped at settings.sync_wait_max_s) the
    call waits for the job: 200 with the finished job if it ends in time, else the usual 202
    with the job as it is then. `Preference-Applied` says how long it waited at most.
    """
    body = read_json_body()
    key = check_idempotency_key(request.headers.get("Idempotency-Key"))
    state = genq()
    wait_s = prefer_wait_s(request.headers.get("Prefer"), state.settings.sync_wait_max_s)
    submission = parse_submission(body)
    digest = request_hash(body)
    tenant_id = principal().tenant_id
    check_outside(submission)
    # Everything that only reads is done first, outside the write transaction: on SQLite that
    # transaction holds the one write lock every other submit and claim waits for, so it does
    # no more than the quota check (for a tenant with a limit) and the inserts. A limit an
    # admin sets meanwhile applies from the next submission on.
    resolved, limited = None, False
    with state.database.read() as session:
        existing = find_by_idempotency_key(session, tenant_id, key) if key else None
        if existing is None:
            limited = has_submission_limit(tenant_limits(session, tenant_id))
            resolved = resolve_submission(
                session,
                submission,
                tenant_id=tenant_id,
                max_attempts=state.settings.max_attempts,
                idempotency_key=key,
                request_digest=digest,
            )
    if resolved is not None:
        # Committed already marked as published: publish() clears the mark if the broker
        # does not take it.
        try:
            if limited or key or resolved.new.webhook:
                with state.database.transaction() as session:
                    if limited:
                        check_submission(session, tenant_id)
                    job, created = insert_job(session, resolved.new, published=True)
            else:
                job, created = state.inserts.insert(resolved.new), True
        except IntegrityError:
            # What it names went away between the read and the insert (a model deleted).
            raise ConflictError(
                "the model or data set this job names changed while it was submitted; send it again"
            ) from None
        committed_at = time.monotonic()
    else:
        assert existing is not None
        job, created, committed_at = existing, False, 0.0
    if not created and job.request_hash != digest:
        raise ConflictError(
            "this Idempotency-Key was used with a different request body",
            field="Idempotency-Key",
        )
    job_id = job.id
    if created and job.state == JobState.QUEUED:
        publish(job_id, job.queue, job.priority)
    finished, applied = False, None
    if wait_s is not None:
        with wait_slot(state.streams) as waiting:
            if waiting:
                applied = wait_s
                finished = wait_for_jobs(
                    state.database, [job_id], timeout_s=wait_s, poll_s=state.stream_poll_s
                )
    # Rendered after the commit and the publish: its queue position and ETA queries must
    # neither hold SQLite's single write lock nor delay the job's start. A job just created is
    # the row as written, with the model it resolved and the process's recent queue figures (as
    # for a poll, api/polling.py; SQL is read only for a figure that is not fresh); an awaited
    # one is read again.
    docs = polling.documents()
    if created and wait_s is None and docs.enabled and resolved is not None:
        ctx = submitted_context(
            state.database.read,
            job,
            model=resolved.model,
            dataset=resolved.dataset,
            slots=worker_slots(),
            figures=docs.figures,
            committed_at=committed_at,
        )
        payload = job_payload(job, ctx)
    else:
        with state.database.read() as session:
            if wait_s is not None:
                job = get_job(session, job_id)
            figures = docs.figures if docs.enabled else None
            payload = job_payload(job, load_context(session, [job], worker_slots(), figures))
    response = _job_response(payload, 202 if created and not finished else 200)
    if not created:
        response.headers["Idempotency-Replayed"] = "true"
    if applied is not None:
        response.headers["Preference-Applied"] = f"wait={applied}"
    return response


@bp.get("/<job_id>")
def get(job_id: str) -> Response:
    """The job, at most settings.status_staleness_s old (api/polling.py), with an ETag."""
    docs = polling.documents()
    if not docs.enabled:
        with genq().database.read() as session:
            return jsonify(render_job(session, find_job(session, job_id)))
    found, epoch = docs.read(job_id)
    if found is not None:
        scope = tenant_scope()
        if scope is not None and found.tenant_id != scope:
            raise NotFoundError(f"no job {job_id}")
        return polling.respond(found)
    began = time.monotonic()
    slots = worker_slots()
    with genq().database.read() as session:
        job = find_job(session, job_id)
        ctx = load_context(session, [job], slots, docs.figures)
        payload = job_payload(job, ctx)
        version, tenant_id = polling.version_of(job.updated_at), job.tenant_id
    document = docs.write(
        job_id,
        version=version,
        tenant_id=tenant_id,
        payload=payload,
        as_of=min(began, ctx.as_of),
        epoch=epoch,
    )
    assert document is not None
    return polling.respond(document)


def _list_param(name: str) -> str | None:
    value = request.args.get(name)
    if value is not None and not value.strip():
        raise InvalidInputError.one(name, "must not be empty")
    return value


def _parse_states(value: str) -> list[str]:
    states = [s.strip() for s in value.split(",")]
    bad = [s for s in states if s not in JobState.__members__.values()]
    if bad:
        allowed = ", ".join(JobState)
        raise InvalidInputError.one("state", f"unknown state {bad[0]!r} (one of: {allowed})")
    return states


def parse_limit(value: str | None, maximum: int) -> int:
    """A list's `limit` query parameter: 50 (or `maximum`) when absent."""
    if value is None:
        return min(50, maximum)
    limit = parse_whole(value, minimum=1, maximum=maximum)
    if limit is None:
        raise InvalidInputError.one("limit", f"must be an integer from 1 to {maximum}")
    return limit


def encode_cursor(job_id: str) -> str:
    return base64.urlsafe_b64encode(job_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        return str(uuid.UUID(raw))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidInputError.one("cursor", "is not a cursor this API returned") from None


@bp.get("")
def list_jobs() -> Response:
    """Newest first. `next_cursor` is null on the last page."""
    settings = genq().settings
    limit = parse_limit(request.args.get("limit"), settings.page_size_max)
    stmt = select(Job)
    scope = tenant_scope()
    if scope is not None:
        stmt = stmt.where(Job.tenant_id == scope)
    if (states := _list_param("state")) is not None:
        stmt = stmt.where(Job.state.in_(_parse_states(states)))
    if (kind := _list_param("kind")) is not None:
        if kind not in JobKind.__members__.values():
            allowed = ", ".join(JobKind)
            raise InvalidInputError.one("kind", f"unknown kind {kind!r} (one of: {allowed})")
        stmt = stmt.where(Job.kind == kind)
    if (batch := _list_param("batch")) is not None:
        stmt = stmt.where(Job.batch_id == batch)
    if (cursor := _list_param("cursor")) is not None:
        stmt = stmt.where(Job.id < decode_cursor(cursor))
    model_name = _list_param("model")
    with genq().database.read() as session:
        if model_name is not None:
            models = select(Model.id).where(Model.name == model_name)
            if scope is not None:
                models = models.where(Model.tenant_id.in_([scope, SYSTEM_TENANT_ID]))
            stmt = stmt.where(Job.model_id.in_(models))
        jobs = list(session.scalars(stmt.order_by(Job.id.desc()).limit(limit + 1)))
        page = jobs[:limit]
        items = render_jobs(session, page)
    next_cursor = encode_cursor(page[-1].id) if len(jobs) > limit else None
    return jsonify({"items": items, "next_cursor": next_cursor})


@bp.post("/<job_id>/cancel")
def cancel(job_id: str) -> tuple[Response, int]:
    """Queued and scheduled jobs become canceled at once, running ones canceling (their
    worker stops at its next heartbeat). A finished job is a 409."""
    with genq().database.transaction() as session:
        job = find_job(session, job_id, lock=True)
        cancel_job(session, job)
        payload = render_job(session, job)
        version, tenant_id = polling.version_of(job.updated_at), job.tenant_id
    polling.changed(job_id, version=version, tenant_id=tenant_id, payload=payload)
    return jsonify(payload), 202


@bp.post("/<job_id>/retry")
def retry(job_id: str) -> tuple[Response, int]:
    """Queue a failed or canceled job again, with settings.max_attempts more attempts."""
    state = genq()
    with state.database.transaction() as session:
        job = find_job(session, job_id, lock=True)
        if job.state not in (JobState.FAILED, JobState.CANCELED):
            raise IllegalTransitionError(
                f"only a failed or canceled job can be retried; this one is {job.state}"
            )
        retry_job(session, job, extra_attempts=state.settings.max_attempts)
        job.published_at = utcnow()  # see publish()
        payload = render_job(session, job)
        queue, priority = job.queue, job.priority
        version, tenant_id = polling.version_of(job.updated_at), job.tenant_id
    polling.changed(job_id, version=version, tenant_id=tenant_id, payload=payload)
    publish(job_id, queue, priority)
    return jsonify(payload), 202


@bp.patch("/<job_id>")
def change(job_id: str) -> Response:
    """Change a queued or scheduled job's priority: `{"priority": n}` (0-9, or interactive,
    normal, batch). Any other field, or a job that has started, is refused. Nothing is
    republished: the scheduler reads the new priority at its next claim."""
    body = read_json_body()
    if not isinstance(body, dict) or set(body) != {"priority"}:
        raise InvalidInputError.one(
            "priority", 'send exactly {"priority": <0-9, interactive, normal or batch>}'
        )
    state = genq()
    with state.database.transaction() as session:
        job = find_job(session, job_id, lock=True)
        old = set_priority(session, job, body["priority"])
        record_action(
            session,
            Actor.of_key(session, principal().key_id),
            "job.priority",
            "job",
            job.id,
            {"from": old, "to": job.priority, "via": "api"},
        )
        payload = render_job(session, job)
        version, tenant_id = polling.version_of(job.updated_at), job.tenant_id
    polling.changed(job_id, version=version, tenant_id=tenant_id, payload=payload)
    return jsonify(payload)


@bp.get("/<job_id>/logs")
def logs(job_id: str) -> Response:
    """The job's log lines, oldest first."""
    with genq().database.read() as session:
        job = find_job(session, job_id)
        events = session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job.id, JobEvent.type == "log")
            .order_by(JobEvent.id)
        )
        items = [event_payload(e) for e in events]
    return jsonify({"items": items})
