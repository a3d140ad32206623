"""The dashboard's scheduling pages and actions: the schedules page (every tenant's schedules,
with pause and resume), a tenant's weight and quotas (a form on the tenants page), and purging
a tenant's or a queue's waiting jobs. Each action goes through the same core services and
checks as `/v1` (`api.tenants`, `core.schedules`, `core.purge`), writes its audit row in the
same transaction, and is a POST the session guard has checked for a CSRF token.
"""

from __future__ import annotations

from typing import Any

from flask import redirect, render_template, request, url_for
from pydantic import ValidationError
from sqlalchemy import select
from werkzeug.wrappers import Response as BaseResponse

from api import polling
from api.dashboard import bp
from api.dashboard.session import admin
from api.state import genq
from api.submissions import errors_from
from api.tenants import JOB_QUEUES, NOT_NULL, QuotaChange
from core.audit import record_action
from core.errors import InvalidInputError, NotFoundError
from core.numbers import parse_whole
from core.purge import purge_waiting
from core.schedules import resume
from core.tables import Schedule, Tenant, utcnow

QUOTA_FIELDS = tuple(QuotaChange.model_fields)
INT_FIELDS = (
    "weight",
    "max_running",
    "max_queued",
    "budget_period_s",
    "retain_outputs_days",
    "retain_events_days",
    "retain_jobs_days",
)
BOOL_FIELDS = ("preemptible", "may_opt_out")


@bp.get("/schedules")
def schedules() -> str:
    with genq().database.transaction() as db:
        rows = db.scalars(select(Schedule).order_by(Schedule.name, Schedule.id)).all()
        tenants = dict(db.execute(select(Tenant.id, Tenant.name)).all())
    return render_template("dashboard/schedules.html", schedules=rows, tenants=tenants)


def _schedule(db: Any, schedule_id: str) -> Schedule:
    found = db.scalar(select(Schedule).where(Schedule.id == schedule_id).with_for_update())
    if found is None:
        raise NotFoundError(f"no schedule {schedule_id}")
    return found


@bp.post("/schedules/<schedule_id>/pause")
def pause_schedule(schedule_id: str) -> BaseResponse:
    with genq().database.transaction() as db:
        schedule = _schedule(db, schedule_id)
        schedule.paused = True
        schedule.updated_at = utcnow()
        record_action(
            db, admin().actor, "schedule.pause", "schedule", schedule.id, {"via": "dashboard"}
        )
    return redirect(url_for("dashboard.schedules"))


@bp.post("/schedules/<schedule_id>/resume")
def resume_schedule(schedule_id: str) -> BaseResponse:
    with genq().database.transaction() as db:
        schedule = _schedule(db, schedule_id)
        resume(schedule, utcnow())
        schedule.updated_at = utcnow()
        record_action(
            db, admin().actor, "schedule.resume", "schedule", schedule.id, {"via": "dashboard"}
        )
    return redirect(url_for("dashboard.schedules"))


def _quota_form() -> dict[str, Any]:
    """The quota form as a QuotaChange: an empty limit field removes that limit; an empty
    weight, period or policy leaves it as it is."""
    raw: dict[str, Any] = {}
    for name in QUOTA_FIELDS:
        value = request.form.get(name, "").strip()
        if not value:
            if name not in NOT_NULL:
                raw[name] = None
            continue
        if name in INT_FIELDS:
            number = parse_whole(value)
            if number is None:
                raise InvalidInputError.one(name, "must be a whole number")
            raw[name] = number
        elif name in BOOL_FIELDS:
            if value not in ("yes", "no"):
                raise InvalidInputError.one(name, "must be yes or no")
            raw[name] = value == "yes"
        elif name == "gpu_seconds_budget":
            try:
                raw[name] = float(value)
            except ValueError:
                raise InvalidInputError.one(name, "must be a number") from None
        else:
            raw[name] = value
    try:
        return QuotaChange.model_validate(raw).model_dump(exclude_unset=True)
    except ValidationError as exc:
        raise InvalidInputError(errors_from(exc)) from None


@bp.post("/tenants/<tenant_id>/quotas")
def tenant_quotas(tenant_id: str) -> BaseResponse:
    sent = _quota_form()
    with genq().database.transaction() as db:
        tenant = db.scalar(select(Tenant).where(Tenant.id == tenant_id).with_for_update())
        if tenant is None:
            raise NotFoundError(f"no tenant {tenant_id}")
        before = {name: getattr(tenant, name) for name in sent}
        for name, value in sent.items():
            setattr(tenant, name, value)
        record_action(
            db,
            admin().actor,
            "tenant.quotas",
            "tenant",
            tenant.id,
            {"from": before, "to": sent, "via": "dashboard"},
        )
    return redirect(url_for("dashboard.tenants"))


@bp.post("/purge")
def purge() -> BaseResponse:
    tenant_id = request.form.get("tenant_id", "").strip() or None
    queue = request.form.get("queue", "").strip() or None
    if queue is not None and queue not in JOB_QUEUES:
        raise InvalidInputError.one("queue", f"must be one of {', '.join(JOB_QUEUES)}")
    with genq().database.transaction() as db:
        if tenant_id is not None and db.get(Tenant, tenant_id) is None:
            raise NotFoundError(f"no tenant {tenant_id}")
        actor = admin().actor
        ids = purge_waiting(
            db, tenant_id=tenant_id, queue=queue, reason=f"purged by admin key {actor.key_prefix}"
        )
        record_action(
            db,
            actor,
            "purge",
            "tenant" if tenant_id else "queue",
            tenant_id or str(queue),
            {"tenant": tenant_id, "queue": queue, "count": len(ids), "via": "dashboard"},
        )
    polling.many_changed()  # their polls show them canceled at once
    return redirect(url_for("dashboard.tenants"))
