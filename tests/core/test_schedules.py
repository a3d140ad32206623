"""Schedules fire each slot exactly once (core/schedules.py) on real SQLite and PostgreSQL:
with two scheduler processes racing at every tick, across a restart of the scheduler, with one
catch-up after downtime; and through the real periodic loop, whose jobs reach the broker."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from core.catalog import ensure_builtins, resolve_model
from core.db import Database
from core.keys import get_or_create_tenant
from core.schedules import fire_due, latest_slot, next_slot, template_of
from core.settings import Settings
from core.tables import Job, Schedule
from scheduler.enqueue import Publisher
from scheduler.periodic import Periodic
from tests.support.jobs import echo_job

EVERY_5_S = "* * * * * */5"  # croniter: seconds are the sixth field


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    s = Settings(var_dir=tmp_path / "var", database_url=database_url)
    return s


def _make_schedule(database: Database, cron: str, start: datetime, tz: str = "UTC") -> str:
    with database.transaction() as session:
        ensure_builtins(session)
        tenant = get_or_create_tenant(session, "acme")
        echo = resolve_model(session, tenant.id, "echo")
        new = echo_job(tenant.id, echo.id, params={"message": "tick"})
        schedule = Schedule(
            tenant_id=tenant.id,
            name="ticks",
            cron=cron,
            timezone=tz,
            template={"request": {}, "job": template_of(new)},
            next_run_at=next_slot(cron, tz, start),
        )
        session.add(schedule)
        session.flush()
        return schedule.id


def _slots(database: Database, schedule_id: str) -> list[datetime]:
    with database.transaction() as session:
        rows = session.scalars(
            select(Job.slot_at).where(Job.schedule_id == schedule_id).order_by(Job.slot_at)
        ).all()
    return [r for r in rows if r is not None]


def test_slots_fire_once_each_with_racing_schedulers_and_a_restart(settings: Settings) -> None:
    t0 = datetime(2026, 3, 1, 12, 0, 0, 500000, tzinfo=UTC)
    first = Database(settings)
    schedule_id = _make_schedule(first, EVERY_5_S, t0)

    def race(databases: list[Database], now: datetime) -> None:
        barrier = threading.Barrier(len(databases))
        errors: list[BaseException] = []

        def one(db: Database) -> None:
            try:
                barrier.wait()
                with db.transaction() as session:
                    fire_due(session, max_attempts=3, now=now)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(db,)) for db in databases]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors

    # Two schedulers tick every second for 30 s: slots at :05 ... :30.
    second = Database(settings)
    for s in range(31):
        race([first, second], t0 + timedelta(seconds=s))
    assert _slots(first, schedule_id) == [
        datetime(2026, 3, 1, 12, 0, sec, tzinfo=UTC) for sec in range(5, 31, 5)
    ]
    first.dispose()
    second.dispose()
    # Both stop; 30 s later two fresh processes start: one catch-up job for the six missed
    # slots (for 12:01:00, the latest of them), then every slot again.
    third, fourth = Database(settings), Database(settings)
    for s in range(61, 81):
        race([third, fourth], t0 + timedelta(seconds=s))
    slots = _slots(third, schedule_id)
    assert slots[6:] == [datetime(2026, 3, 1, 12, 1, sec, tzinfo=UTC) for sec in range(0, 21, 5)]
    assert len(set(slots)) == len(slots) == 11
    with third.transaction() as session:
        schedule = session.get(Schedule, schedule_id)
        assert schedule is not None and schedule.fired_count == 11
        assert schedule.next_run_at == datetime(2026, 3, 1, 12, 1, 25, tzinfo=UTC)
    third.dispose()
    fourth.dispose()


def test_a_paused_schedule_does_not_fire(settings: Settings) -> None:
    t0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
    database = Database(settings)
    schedule_id = _make_schedule(database, EVERY_5_S, t0)
    with database.transaction() as session:
        schedule = session.get(Schedule, schedule_id)
        assert schedule is not None
        schedule.paused = True
    with database.transaction() as session:
        assert fire_due(session, max_attempts=3, now=t0 + timedelta(seconds=60)) == []
    assert _slots(database, schedule_id) == []
    database.dispose()


def test_cron_is_read_in_the_schedules_time_zone() -> None:
    # 09:00 on weekdays in Paris: 08:00 UTC in winter, 07:00 UTC in summer.
    winter = next_slot("0 9 * * 1-5", "Europe/Paris", datetime(2026, 1, 9, 12, tzinfo=UTC))
    summer = next_slot("0 9 * * 1-5", "Europe/Paris", datetime(2026, 7, 10, 12, tzinfo=UTC))
    assert winter == datetime(2026, 1, 12, 8, tzinfo=UTC)  # Friday noon -> Monday
    assert summer == datetime(2026, 7, 13, 7, tzinfo=UTC)
    at = datetime(2026, 1, 12, 8, tzinfo=UTC)
    assert latest_slot("0 9 * * 1-5", "Europe/Paris", at) == at


def test_the_periodic_loop_fires_and_publishes_across_a_restart(
    settings: Settings, redis_db_url: str
) -> None:
    redis_url = redis_db_url
    client = redis.Redis.from_url(redis_url)
    settings = settings.model_copy(update={"redis_url": redis_url})
    database = Database(settings)
    schedule_id = _make_schedule(database, "* * * * * *", datetime.now(UTC))
    fired = 0
    for _restart in range(2):  # a fresh Periodic (and database) each time: a restart
        db = Database(settings)
        publisher = Publisher(settings)
        periodic = Periodic(settings, db, publisher)
        time.sleep(1.1)  # at least one slot (every second) is due; catch-up makes it one
        report = periodic.tick()
        assert report.scheduled == 1
        fired += 1
        publisher.close()
        db.dispose()
    slots = _slots(database, schedule_id)
    assert len(slots) == len(set(slots)) == fired
    with database.transaction() as session:
        ids = session.scalars(select(Job.id).where(Job.schedule_id == schedule_id)).all()
        assert {session.get(Job, j).state for j in ids} == {"queued"}  # type: ignore[union-attr]
    assert Publisher(settings).has_message(list(ids)) == [True] * fired
    database.dispose()
    client.flushdb()
