"""Reliability views: a job's webhook delivery log, the dead-letter list of jobs that used up
their attempts, and the tenant's webhook signing secret.

The delivery log shows one entry per message (its `webhook-id`, event, state) with every send
attempt (status, error, duration), so a receiver's owner can see why a message did not arrive.
"""

from __future__ import annotations

from typing import cast

from flask import Blueprint, Response, jsonify, request
from sqlalchemy import select

from api import schemas
from api.auth import principal, tenant_scope
from api.jobs import decode_cursor, encode_cursor, find_job, parse_limit
from api.payloads import iso, render_jobs
from api.state import genq
from core.states import JobState
from core.tables import Job, WebhookDelivery
from core.webhooks import deliveries_of, tenant_secret

bp = Blueprint("deliveries", __name__, url_prefix="/v1")


def delivery_payload(row: WebhookDelivery) -> schemas.Delivery:
    return {
        "id": row.id,
        "event": row.event,
        "type": row.payload.get("type", ""),
        "url": row.url,
        "state": row.state,
        "attempts": row.attempts,
        "next_attempt_at": iso(row.next_attempt_at) if row.state == "pending" else None,
        "created_at": iso(row.created_at),
        "delivered_at": iso(row.delivered_at),
        # Attempts as core.webhooks records them: the DeliveryAttempt shape.
        "log": cast(list[schemas.DeliveryAttempt], row.log or []),
    }


@bp.get("/jobs/<job_id>/deliveries")
def job_deliveries(job_id: str) -> Response:
    """Every webhook message about the job, oldest first, with its attempts."""
    with genq().database.read() as session:
        job = find_job(session, job_id)
        items = [delivery_payload(row) for row in deliveries_of(session, job.id)]
    return jsonify({"items": items})


@bp.get("/dead-letter")
def dead_letter() -> Response:
    """Failed jobs that used up their attempts (lost, transient or timed out on the last
    one), newest first; `POST /v1/jobs/{id}/retry` gives one more attempts."""
    settings = genq().settings
    limit = parse_limit(request.args.get("limit"), settings.page_size_max)
    stmt = select(Job).where(Job.state == JobState.FAILED, Job.attempt >= Job.max_attempts)
    scope = tenant_scope()
    if scope is not None:
        stmt = stmt.where(Job.tenant_id == scope)
    cursor = request.args.get("cursor")
    if cursor is not None:
        stmt = stmt.where(Job.id < decode_cursor(cursor))
    with genq().database.read() as session:
        jobs = list(session.scalars(stmt.order_by(Job.id.desc()).limit(limit + 1)))
        page = jobs[:limit]
        items = render_jobs(session, page)
    next_cursor = encode_cursor(page[-1].id) if len(jobs) > limit else None
    return jsonify({"items": items, "next_cursor": next_cursor})


@bp.get("/webhook-secret")
def webhook_secret() -> Response:
    """The caller's tenant's signing secret (`whsec_...`) for verifying webhook signatures."""
    tenant_id = principal().tenant_id
    secret = tenant_secret(genq().settings.read_secret_key(), tenant_id)
    return jsonify({"tenant_id": tenant_id, "secret": secret})
