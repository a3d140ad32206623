"""`/v1/schedules`: recurring jobs. A schedule has a name, a cron expression, an IANA time
zone and a job template (the body of `POST /v1/jobs`, checked the same way, without `run_at`
and `deadline`); the periodic scheduler submits its job at each slot (core/schedules.py).

A tenant sees and changes only its own schedules (another's id answers 404); admins see all.
The template's model and data set are resolved when the schedule is written, so every firing
runs the same model version until the schedule is changed.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api import schemas_admin as schemas
from api.auth import principal, tenant_scope
from api.jobs import read_json_body
from api.payloads import iso
from api.resolution import resolve_submission
from api.state import genq
from api.submissions import errors_from, parse_submission, patch_schema, request_hash
from core.audit import Actor, record_action
from core.errors import ConflictError, InvalidInputError, NotFoundError
from core.schedules import check_cron, check_timezone, next_slot, resume, template_of
from core.tables import Schedule, utcnow

bp = Blueprint("schedules", __name__, url_prefix="/v1/schedules")

NOT_IN_TEMPLATE = ("run_at", "deadline")


# For the OpenAPI document: five or six fields apart by spaces; what each field may say is
# croniter's to check (core.schedules.check_cron, whose message is clearer than a pattern's).
CRON_FIELDS = r"^\s*\S+(\s+\S+){4,5}\s*$"


class ScheduleBody(BaseModel):
    """The body of `POST /v1/schedules` (all fields) and `PATCH` (any of them)."""

    model_config = ConfigDict(extra="forbid", title="Schedule")

    name: str = Field(pattern=r"^[A-Za-z0-9._ -]{1,128}$")
    cron: str = Field(
        min_length=1,
        max_length=128,
        json_schema_extra={"pattern": CRON_FIELDS},
        description="5 fields (minute hour day month weekday), or 6 with seconds last.",
    )
    timezone: str = Field(
        "UTC", min_length=1, max_length=64, description="IANA, e.g. Europe/Paris."
    )
    job: dict[str, Any] = Field(description="A POST /v1/jobs body, without run_at and deadline.")
    paused: bool = False


class ScheduleChange(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        title="ScheduleChange",
        json_schema_extra=patch_schema("name", "cron", "timezone", "job", "paused"),
    )

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9._ -]{1,128}$")
    cron: str | None = Field(
        None, min_length=1, max_length=128, json_schema_extra={"pattern": CRON_FIELDS}
    )
    timezone: str | None = Field(None, min_length=1, max_length=64)
    job: dict[str, Any] | None = None
    paused: bool | None = None


def schedule_payload(schedule: Schedule) -> schemas.ScheduleOut:
    return {
        "id": schedule.id,
        "name": schedule.name,
        "cron": schedule.cron,
        "timezone": schedule.timezone,
        "job": schedule.template.get("request", {}),
        "paused": schedule.paused,
        "next_run_at": None if schedule.paused else iso(schedule.next_run_at),
        "last_run_at": iso(schedule.last_run_at),
        "last_job_id": schedule.last_job_id,
        "last_error": schedule.last_error,
        "fired_count": schedule.fired_count,
        "created_at": iso(schedule.created_at),
        "updated_at": iso(schedule.updated_at),
    }


def _template(session: Session, tenant_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """The job template checked like a submission; 422 fields are named `job.<field>`."""
    if not isinstance(body, dict):
        raise InvalidInputError.one("job", "must be a JSON object (a POST /v1/jobs body)")
    bad = [name for name in NOT_IN_TEMPLATE if name in body]
    if bad:
        raise InvalidInputError.one(f"job.{bad[0]}", "is not allowed in a schedule's template")
    try:
        submission = parse_submission(body)
        new = resolve_submission(
            session,
            submission,
            tenant_id=tenant_id,
            max_attempts=genq().settings.max_attempts,
            idempotency_key=None,
            request_digest=request_hash(body),
        ).new
    except InvalidInputError as exc:
        errors = [{**e, "field": f"job.{e['field']}"} for e in exc.errors]
        raise InvalidInputError(errors) from None
    return {"request": body, "job": template_of(new)}


def _parse(model: type[BaseModel], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise InvalidInputError(errors_from(exc)) from None


def find_schedule(session: Session, schedule_id: str, *, lock: bool = False) -> Schedule:
    stmt = select(Schedule).where(Schedule.id == schedule_id)
    scope = tenant_scope()
    if scope is not None:
        stmt = stmt.where(Schedule.tenant_id == scope)
    if lock:
        stmt = stmt.with_for_update()
    found = session.scalar(stmt)
    if found is None:
        raise NotFoundError(f"no schedule {schedule_id}")
    return found


def _audit(session: Session, action: str, schedule: Schedule, detail: dict[str, Any]) -> None:
    actor = Actor.of_key(session, principal().key_id)
    record_action(session, actor, action, "schedule", schedule.id, detail)


def _flush_unique(session: Session) -> None:
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError:
        raise ConflictError(
            "this tenant already has a schedule of that name", field="name"
        ) from None


@bp.post("")
def create() -> tuple[Response, int, dict[str, str]]:
    body = _parse(ScheduleBody, read_json_body())
    cron, _ = check_cron(body.cron), check_timezone(body.timezone)
    tenant_id = principal().tenant_id
    now = utcnow()
    with genq().database.transaction() as session:
        schedule = Schedule(
            tenant_id=tenant_id,
            name=body.name,
            cron=cron,
            timezone=body.timezone,
            template=_template(session, tenant_id, body.job),
            paused=body.paused,
            next_run_at=next_slot(cron, body.timezone, now),
            created_at=now,
            updated_at=now,
        )
        session.add(schedule)
        _flush_unique(session)
        _audit(session, "schedule.create", schedule, {"name": schedule.name, "cron": cron})
        payload = schedule_payload(schedule)
    return jsonify(payload), 201, {"Location": f"/v1/schedules/{payload['id']}"}


@bp.get("")
def list_schedules() -> Response:
    scope = tenant_scope()
    with genq().database.transaction() as session:
        stmt = select(Schedule).order_by(Schedule.name, Schedule.id)
        if scope is not None:
            stmt = stmt.where(Schedule.tenant_id == scope)
        items = [schedule_payload(s) for s in session.scalars(stmt)]
    return jsonify({"items": items})


@bp.get("/<schedule_id>")
def get(schedule_id: str) -> Response:
    with genq().database.transaction() as session:
        return jsonify(schedule_payload(find_schedule(session, schedule_id)))


@bp.patch("/<schedule_id>")
def change(schedule_id: str) -> Response:
    """Change any of name, cron, timezone, job and paused; the next slot is recomputed from
    now when the cron, the time zone or the paused flag changes."""
    change = _parse(ScheduleChange, read_json_body())
    sent = change.model_dump(exclude_unset=True)
    if not sent:
        raise InvalidInputError.one(
            "body", "send at least one of: " + ", ".join(ScheduleChange.model_fields)
        )
    for name, value in sent.items():
        if value is None:
            raise InvalidInputError.one(name, "must not be null")
    now = utcnow()
    with genq().database.transaction() as session:
        schedule = find_schedule(session, schedule_id, lock=True)
        if "cron" in sent:
            schedule.cron = check_cron(sent["cron"])
        if "timezone" in sent:
            check_timezone(sent["timezone"])
            schedule.timezone = sent["timezone"]
        if "name" in sent:
            schedule.name = sent["name"]
        if "job" in sent:
            schedule.template = _template(session, schedule.tenant_id, sent["job"])
        if sent.get("paused") is True:
            schedule.paused = True
        elif sent.get("paused") is False or (
            not schedule.paused and ("cron" in sent or "timezone" in sent)
        ):
            resume(schedule, now)  # the next slot of the (new) expression, from now
        schedule.updated_at = now
        _flush_unique(session)
        _audit(session, "schedule.change", schedule, {"fields": sorted(sent)})
        payload = schedule_payload(schedule)
    return jsonify(payload)


def _set_paused(schedule_id: str, paused: bool) -> Response:
    now = utcnow()
    with genq().database.transaction() as session:
        schedule = find_schedule(session, schedule_id, lock=True)
        if paused:
            schedule.paused = True
        else:
            resume(schedule, now)
        schedule.updated_at = now
        _audit(session, "schedule.pause" if paused else "schedule.resume", schedule, {})
        payload = schedule_payload(schedule)
    return jsonify(payload)


@bp.post("/<schedule_id>/pause")
def pause(schedule_id: str) -> Response:
    return _set_paused(schedule_id, True)


@bp.post("/<schedule_id>/resume")
def resume_schedule(schedule_id: str) -> Response:
    """Slots that passed while it was paused are not made up; the next one comes from now."""
    return _set_paused(schedule_id, False)


@bp.delete("/<schedule_id>")
def delete(schedule_id: str) -> tuple[str, int]:
    """Jobs it already submitted stay (their schedule_id keeps naming it)."""
    with genq().database.transaction() as session:
        schedule = find_schedule(session, schedule_id, lock=True)
        _audit(session, "schedule.delete", schedule, {"name": schedule.name})
        session.delete(schedule)
    return "", 204
