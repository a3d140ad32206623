"""`/v1/tenants` (a tenant's quotas, retention and what it uses now, disk included; admins
set them),
`POST /v1/admin/purge` (cancel a tenant's or a queue's waiting jobs) and
`GET /v1/admin/dropped-messages` (malformed broker messages the workers dropped).

A tenant's key reads its own tenant; an admin key reads and changes any. Every change is
written to the audit log in the same transaction.
"""

from __future__ import annotations

from typing import cast

from flask import Blueprint, Response, jsonify
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from api import polling
from api import schemas_admin as schemas
from api.auth import principal, tenant_scope
from api.jobs import read_json_body
from api.state import genq
from api.submissions import errors_from, patch_schema
from core.audit import Actor, record_action
from core.deletion import disk_use
from core.errors import ForbiddenError, InvalidInputError, NotFoundError
from core.purge import purge_waiting
from core.quotas import usage
from core.retention import policies
from core.tables import Tenant, utcnow
from core.usage import fair_share_report
from scheduler.enqueue import QUEUES, WEBHOOK_QUEUE, read_dropped

bp = Blueprint("tenants", __name__, url_prefix="/v1")

JOB_QUEUES = tuple(q for q in QUEUES if q != WEBHOOK_QUEUE)


# Fields that may not be null (they have a value whatever the limits).
NOT_NULL = ("weight", "budget_period_s", "over_quota", "preemptible", "may_opt_out")
RETENTION_DAYS_MAX = 36500


class QuotaChange(BaseModel):
    """The body of `PATCH /v1/tenants/{id}`: any of these; null removes a limit."""

    model_config = ConfigDict(
        extra="forbid",
        title="QuotaChange",
        json_schema_extra=patch_schema(*NOT_NULL),
    )

    weight: StrictInt | None = Field(None, ge=1, le=100, description="Share of slots (1-100).")
    max_running: StrictInt | None = Field(None, ge=0, le=100_000)
    max_queued: StrictInt | None = Field(None, ge=0, le=10_000_000)
    gpu_seconds_budget: float | None = Field(None, ge=0, allow_inf_nan=False)
    budget_period_s: StrictInt | None = Field(None, ge=60, le=366 * 86400)
    over_quota: str | None = Field(None, pattern="^(reject|hold)$")
    rate_limit_per_s: float | None = Field(
        None,
        gt=0,
        le=100_000,
        allow_inf_nan=False,
        description="Requests per second of the tenant's keys together; null: the default.",
    )
    rate_limit_burst: StrictInt | None = Field(
        None, ge=1, le=1_000_000, description="Most requests in a burst; null: the default."
    )
    preemptible: StrictBool | None = Field(
        None, description="false: no training job of this tenant is ever preempted."
    )
    may_opt_out: StrictBool | None = Field(
        None, description="Whether this tenant's jobs may be submitted with preemptible: false."
    )
    retain_outputs_days: StrictInt | None = Field(
        None,
        ge=0,
        le=RETENTION_DAYS_MAX,
        description="Days the outputs of finished jobs are kept; 0: forever; null: the default.",
    )
    retain_events_days: StrictInt | None = Field(
        None,
        ge=0,
        le=RETENTION_DAYS_MAX,
        description="Days the events of finished jobs are kept; 0: forever; null: the default.",
    )
    retain_jobs_days: StrictInt | None = Field(
        None,
        ge=0,
        le=RETENTION_DAYS_MAX,
        description="Days finished jobs are kept; 0: forever; null: the default.",
    )


def fair_shares(session: Session) -> dict[str, dict[str, float | None]]:
    """Every tenant's usage-based fair share now (core/usage.py)."""
    weights = {t: w for t, w in session.execute(select(Tenant.id, Tenant.weight))}
    return fair_share_report(session, utcnow(), weights)


def tenant_payload(
    session: Session,
    tenant: Tenant,
    shares: dict[str, dict[str, float | None]] | None = None,
    disk: dict[str, dict[str, int]] | None = None,
) -> schemas.Tenant:
    shares = shares if shares is not None else fair_shares(session)
    disk = disk if disk is not None else disk_use(session, [tenant.id])
    return {
        "id": tenant.id,
        "name": tenant.name,
        "weight": tenant.weight,
        "quotas": {
            "max_running": tenant.max_running,
            "max_queued": tenant.max_queued,
            "gpu_seconds_budget": tenant.gpu_seconds_budget,
            "budget_period_s": tenant.budget_period_s,
            "over_quota": tenant.over_quota,
        },
        "rate_limit": rate_limit_payload(tenant),
        # core.usage and core.deletion build these parts as plain dicts of the shapes named.
        "usage": cast(schemas.TenantUsage, usage(session, tenant.id)),
        # Decayed GPU-seconds and the share they are of everyone's, against its weighted share.
        "fair_share": cast(schemas.FairShare, shares.get(tenant.id)),
        "preemption": {"preemptible": tenant.preemptible, "may_opt_out": tenant.may_opt_out},
        "retention": retention_payload(tenant),
        # Bytes in the artifact store: outputs, uploaded data sets, model weights (measured
        # by the retention pass).
        "disk": cast(
            schemas.DiskUse,
            disk.get(tenant.id, {"outputs_bytes": 0, "datasets_bytes": 0, "models_bytes": 0}),
        ),
    }


def retention_payload(tenant: Tenant) -> schemas.TenantRetention:
    """Days kept in force for each (null: forever), and the tenant's own (null: the default)."""
    settings = genq().settings
    policy = policies(settings, [tenant])[0]
    return {
        "outputs_days": policy.outputs_days,
        "events_days": policy.events_days,
        "jobs_days": policy.jobs_days,
        "own": {
            "outputs_days": tenant.retain_outputs_days,
            "events_days": tenant.retain_events_days,
            "jobs_days": tenant.retain_jobs_days,
        },
    }


def rate_limit_payload(tenant: Tenant) -> schemas.TenantRateLimit:
    """The tenant's rate limit in force: its own, or the defaults from settings."""
    settings = genq().settings
    return {
        "per_s": tenant.rate_limit_per_s or settings.tenant_rate_limit_per_s,
        "burst": tenant.rate_limit_burst or settings.tenant_rate_limit_burst,
        "is_default": tenant.rate_limit_per_s is None and tenant.rate_limit_burst is None,
    }


def _require_admin() -> None:
    if not principal().is_admin:
        raise ForbiddenError("this needs an admin key")


def find_tenant(session: Session, ref: str, *, lock: bool = False) -> Tenant:
    """A tenant by id or name that the caller may see; 404 otherwise."""
    stmt = select(Tenant).where(or_(Tenant.id == ref, Tenant.name == ref))
    scope = tenant_scope()
    if scope is not None:
        stmt = stmt.where(Tenant.id == scope)
    if lock:
        stmt = stmt.with_for_update()
    found = session.scalar(stmt)
    if found is None:
        raise NotFoundError(f"no tenant {ref}")
    return found


@bp.get("/tenants")
def list_tenants() -> Response:
    """Every tenant (admin), or the caller's own."""
    scope = tenant_scope()
    with genq().database.transaction() as session:
        stmt = select(Tenant).order_by(Tenant.name)
        if scope is not None:
            stmt = stmt.where(Tenant.id == scope)
        shares = fair_shares(session)
        disk = disk_use(session, None if scope is None else [scope])
        items = [tenant_payload(session, t, shares, disk) for t in session.scalars(stmt)]
    return jsonify({"items": items})


@bp.get("/tenants/<ref>")
def get_tenant(ref: str) -> Response:
    with genq().database.transaction() as session:
        return jsonify(tenant_payload(session, find_tenant(session, ref)))


@bp.patch("/tenants/<ref>")
def change_tenant(ref: str) -> Response:
    """Set a tenant's weight and quotas (admin). Only the fields sent change."""
    _require_admin()
    body = read_json_body()
    try:
        change = QuotaChange.model_validate(body)
    except ValidationError as exc:
        raise InvalidInputError(errors_from(exc)) from None
    sent = change.model_dump(exclude_unset=True)
    if not sent:
        raise InvalidInputError.one(
            "body", "send at least one of: " + ", ".join(QuotaChange.model_fields)
        )
    for name in NOT_NULL:
        if name in sent and sent[name] is None:
            raise InvalidInputError.one(name, "must not be null")
    with genq().database.transaction() as session:
        tenant = find_tenant(session, ref, lock=True)
        before = {name: getattr(tenant, name) for name in sent}
        for name, value in sent.items():
            setattr(tenant, name, value)
        limit = rate_limit_payload(tenant)
        if limit["burst"] / limit["per_s"] > 3600:
            raise InvalidInputError.one(
                "rate_limit_burst", "burst / rate_limit_per_s must be at most 3600 seconds"
            )
        record_action(
            session,
            Actor.of_key(session, principal().key_id),
            "tenant.quotas",
            "tenant",
            tenant.id,
            {"from": before, "to": sent, "via": "api"},
        )
        session.flush()
        payload = tenant_payload(session, tenant)
    return jsonify(payload)


class PurgeRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        title="PurgeRequest",
        # One of the two, or both (null is the same as leaving it out).
        json_schema_extra={
            "anyOf": [
                {"required": [field], "properties": {field: {"type": "string"}}}
                for field in ("tenant", "queue")
            ]
        },
    )

    tenant: str | None = Field(None, min_length=1, max_length=128, description="Id or name.")
    queue: str | None = Field(
        None, description="generate or train.", json_schema_extra={"enum": [*JOB_QUEUES, None]}
    )


@bp.post("/admin/purge")
def purge() -> Response:
    """Cancel every waiting (queued or scheduled) job of a tenant, of a queue, or both (admin);
    returns how many, and their ids."""
    _require_admin()
    body = read_json_body()
    try:
        request = PurgeRequest.model_validate(body)
    except ValidationError as exc:
        raise InvalidInputError(errors_from(exc)) from None
    if request.queue is not None and request.queue not in JOB_QUEUES:
        raise InvalidInputError.one("queue", f"must be one of {', '.join(JOB_QUEUES)}")
    with genq().database.transaction() as session:
        tenant_id = find_tenant(session, request.tenant).id if request.tenant else None
        actor = Actor.of_key(session, principal().key_id)
        ids = purge_waiting(
            session,
            tenant_id=tenant_id,
            queue=request.queue,
            reason=f"purged by admin key {actor.key_prefix}",
        )
        record_action(
            session,
            actor,
            "purge",
            "tenant" if tenant_id else "queue",
            tenant_id or str(request.queue),
            {"tenant": tenant_id, "queue": request.queue, "count": len(ids), "via": "api"},
        )
    polling.many_changed()  # their polls show them canceled at once
    return jsonify({"purged": len(ids), "job_ids": ids})


@bp.get("/admin/dropped-messages")
def dropped_messages() -> Response:
    """Broker messages that workers dropped as malformed (admin): counts by reason since the
    broker's Redis started, and the latest ones with an excerpt (scheduler/intake.py)."""
    _require_admin()
    return jsonify(read_dropped(genq().publisher.redis))
