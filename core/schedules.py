"""Recurring jobs: a schedule is a cron expression in an IANA time zone and a job template,
stored in SQL. The periodic scheduler calls `fire_due`, which submits each due slot's job once.

Exactly once: due schedules are read with their rows locked (SKIP LOCKED: several scheduler
processes share the work), and the job is created in the same transaction that moves
`next_run_at` to the following slot; a unique (schedule_id, slot_at) on the job is the last
guard, so a slot can never make two jobs, whatever crashes or restarts. No broker countdown is
involved: the slot waits in SQL, however far away it is.

Missed slots (the scheduler was down, or the schedule's slots come faster than the loop runs):
at most one catch-up job is submitted, for the latest missed slot; the earlier ones are
skipped, and the schedule carries on from the next slot after now.

Cron expressions have 5 fields (minute hour day month weekday), or 6 with seconds last (croniter
syntax), and are read in the schedule's time zone, so "0 9 * * 1-5" is 09:00 local time across
daylight-saving changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.errors import GenqError, InvalidInputError
from core.jobs import NewJob, create_job
from core.quotas import check_submission
from core.states import JobKind, JobState
from core.tables import Schedule, utcnow

log = logging.getLogger(__name__)

# The fields of a NewJob a template keeps (the rest is per firing, or not for schedules).
TEMPLATE_FIELDS = (
    "kind",
    "family",
    "queue",
    "params",
    "model_id",
    "dataset_id",
    "target_name",
    "priority",
    "webhook",
    "webhook_events",
    "timeout_s",
    "num_gpus",
)


def check_timezone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInputError.one(
            "timezone", f"unknown time zone {name!r} (an IANA name, e.g. Europe/Paris)"
        ) from None


def check_cron(expr: str) -> str:
    fields = expr.split()
    if len(fields) not in (5, 6) or not croniter.is_valid(expr):
        raise InvalidInputError.one(
            "cron", "must be a cron expression of 5 fields, or 6 with seconds last"
        )
    try:
        croniter(expr, datetime.now(UTC)).get_next(datetime)
    except CroniterBadDateError:  # e.g. "0 0 31 2 *": valid, but no such date ever comes
        raise InvalidInputError.one("cron", "never fires: no date matches it") from None
    return " ".join(fields)


def next_slot(cron: str, timezone: str, after: datetime) -> datetime:
    """The first slot strictly after `after`, in UTC."""
    local = after.astimezone(ZoneInfo(timezone))
    found: datetime = croniter(cron, local).get_next(datetime)
    return found.astimezone(UTC)


def latest_slot(cron: str, timezone: str, at: datetime) -> datetime:
    """The last slot at or before `at`, in UTC."""
    local = at.astimezone(ZoneInfo(timezone))
    if croniter.match(cron, local):
        return at.astimezone(UTC)
    found: datetime = croniter(cron, local).get_prev(datetime)
    return found.astimezone(UTC)


def template_of(new: NewJob) -> dict[str, Any]:
    """The JSON a schedule keeps of a validated job (see TEMPLATE_FIELDS)."""
    fields = asdict(new)
    return {name: fields[name] for name in TEMPLATE_FIELDS}


def job_from(schedule: Schedule, slot_at: datetime, max_attempts: int) -> NewJob:
    fields = dict(schedule.template["job"])
    fields["kind"] = JobKind(fields["kind"])
    return NewJob(
        tenant_id=schedule.tenant_id,
        max_attempts=max_attempts,
        schedule_id=schedule.id,
        slot_at=slot_at,
        **fields,
    )


def resume(schedule: Schedule, now: datetime) -> None:
    """Unpause: the next slot after now (slots that passed while paused are not made up)."""
    schedule.paused = False
    schedule.next_run_at = next_slot(schedule.cron, schedule.timezone, now)


def fire_due(
    session: Session,
    *,
    max_attempts: int,
    now: datetime | None = None,
    limit: int = 100,
    on_fired: Callable[[Schedule, str], None] | None = None,
) -> list[str]:
    """Submit the job of every due schedule's slot; returns the ids of the queued jobs (the
    caller publishes them after the commit)."""
    now = now or utcnow()
    due = session.scalars(
        select(Schedule)
        .where(Schedule.paused.is_(False), Schedule.next_run_at <= now)
        .order_by(Schedule.next_run_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    queued = []
    for schedule in due:
        assert schedule.next_run_at is not None
        slot = schedule.next_run_at
        following = next_slot(schedule.cron, schedule.timezone, slot)
        if following <= now:  # slots were missed: one catch-up, for the latest of them
            slot = latest_slot(schedule.cron, schedule.timezone, now)
            following = next_slot(schedule.cron, schedule.timezone, slot)
        schedule.next_run_at = following
        schedule.last_run_at = slot
        try:
            check_submission(session, schedule.tenant_id)
            with session.begin_nested():
                job, _ = create_job(session, job_from(schedule, slot, max_attempts))
        except IntegrityError:  # this slot's job exists already: it fired before
            log.warning("schedule %s: slot %s had fired already", schedule.id, slot)
            continue
        except GenqError as exc:  # a quota refused it, or the template no longer fits
            schedule.last_error = f"{slot.isoformat()}: {exc.detail}"
            log.warning("schedule %s: slot %s not submitted: %s", schedule.id, slot, exc.detail)
            continue
        schedule.fired_count += 1
        schedule.last_job_id = job.id
        schedule.last_error = None
        if on_fired is not None:
            on_fired(schedule, job.id)
        if job.state == JobState.QUEUED:
            queued.append(job.id)
    return queued
