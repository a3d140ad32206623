"""The dashboard's actions: cancel, retry and re-prioritise a job; create and revoke API keys.
Each goes through the same core service as `/v1`, writes its audit row in the same transaction,
and publishes to the broker only after the commit. Each is a POST that the session guard has
already checked for a CSRF token.
"""

from __future__ import annotations

from typing import Any

from flask import Response, redirect, render_template, request, url_for
from sqlalchemy import select
from werkzeug.wrappers import Response as BaseResponse

from api import polling
from api.auth import forget_key
from api.dashboard import bp
from api.dashboard.session import admin
from api.jobs import publish
from api.state import genq
from core.audit import record_action
from core.errors import IllegalTransitionError, InvalidInputError, NotFoundError
from core.jobs import PRIORITY_CLASSES, cancel_job, retry_job, set_priority
from core.keys import create_key, get_or_create_tenant, revoke_key
from core.numbers import parse_whole
from core.states import JobState
from core.tables import ApiKey, Job, utcnow


def _locked_job(db: Any, job_id: str) -> Job:
    found = db.scalar(select(Job).where(Job.id == job_id).with_for_update())
    if found is None:
        raise NotFoundError(f"no job {job_id}")
    return found


def _back_to_job(job_id: str) -> BaseResponse:
    return redirect(url_for("dashboard.job", job_id=job_id))


def _changed(job_id: str, version: int, tenant_id: str) -> None:
    # A poll of the job (GET /v1/jobs/{id}) reads it afresh from now on (api/polling.py).
    polling.changed(job_id, version=version, tenant_id=tenant_id, payload=None)


@bp.post("/jobs/<job_id>/cancel")
def cancel(job_id: str) -> BaseResponse:
    with genq().database.transaction() as db:
        job = _locked_job(db, job_id)
        old = job.state
        new = cancel_job(db, job)
        record_action(db, admin().actor, "job.cancel", "job", job.id, {"from": old, "to": new})
        change = polling.version_of(job.updated_at), job.tenant_id
    _changed(job_id, *change)
    return _back_to_job(job_id)


@bp.post("/jobs/<job_id>/retry")
def retry(job_id: str) -> BaseResponse:
    state = genq()
    with state.database.transaction() as db:
        job = _locked_job(db, job_id)
        if job.state not in (JobState.FAILED, JobState.CANCELED):
            raise IllegalTransitionError(
                f"only a failed or canceled job can be retried; this one is {job.state}"
            )
        old = job.state
        retry_job(db, job, extra_attempts=state.settings.max_attempts)
        job.published_at = utcnow()  # optimistic, as api.jobs.publish expects
        record_action(db, admin().actor, "job.retry", "job", job.id, {"from": old})
        queue, priority = job.queue, job.priority
        change = polling.version_of(job.updated_at), job.tenant_id
    _changed(job_id, *change)
    publish(job_id, queue, priority)
    return _back_to_job(job_id)


@bp.post("/jobs/<job_id>/priority")
def priority(job_id: str) -> BaseResponse:
    raw = request.form.get("priority", "").strip()
    number = parse_whole(raw, maximum=9)
    if number is None and raw not in PRIORITY_CLASSES:
        raise InvalidInputError.one(
            "priority", "must be an integer from 0 to 9 or interactive, normal, batch"
        )
    with genq().database.transaction() as db:
        job = _locked_job(db, job_id)
        old = set_priority(db, job, raw if number is None else number)
        record_action(
            db,
            admin().actor,
            "job.priority",
            "job",
            job.id,
            {"from": old, "to": job.priority, "via": "dashboard"},
        )
        change = polling.version_of(job.updated_at), job.tenant_id
    _changed(job_id, *change)
    # Nothing to republish: the next claim reads the new priority (core/fairness.py).
    return _back_to_job(job_id)


@bp.post("/keys")
def create() -> Any:
    """Create a key and show it once, on this response only (never stored, never cached)."""
    tenant_name = request.form.get("tenant", "").strip()
    label = request.form.get("label", "").strip()
    if len(label) > 128:
        raise InvalidInputError.one("label", "must be at most 128 characters")
    is_admin = request.form.get("is_admin") == "on"
    with genq().database.transaction() as db:
        tenant = get_or_create_tenant(db, tenant_name)
        key, raw = create_key(db, tenant, is_admin=is_admin, label=label)
        record_action(
            db,
            admin().actor,
            "key.create",
            "key",
            key.id,
            {"prefix": key.prefix, "tenant": tenant.name, "is_admin": is_admin, "label": label},
        )
        prefix, tenant_shown = key.prefix, tenant.name
    page = render_template(
        "dashboard/key_created.html",
        raw=raw,
        prefix=prefix,
        tenant=tenant_shown,
        is_admin=is_admin,
        label=label,
    )
    response = Response(page, status=201)
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.post("/keys/<key_id>/revoke")
def revoke(key_id: str) -> BaseResponse:
    with genq().database.transaction() as db:
        key = db.get(ApiKey, key_id)
        if key is None:
            raise NotFoundError(f"no key {key_id}")
        was_revoked = key.revoked_at is not None
        revoke_key(db, key)
        if not was_revoked:
            record_action(db, admin().actor, "key.revoke", "key", key.id, {"prefix": key.prefix})
        key_hash = key.key_hash
    forget_key(key_hash)
    return redirect(url_for("dashboard.tenants"))
