"""The periodic scheduler against real Redis and real SQLite/PostgreSQL: it publishes queued
jobs that lost their message (and only those), requeues jobs whose lease expired, and starts
delayed jobs when their time comes. Also the first-start bootstrap and the worker's settings
check."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import update

from core.catalog import ensure_builtins, resolve_model
from core.db import Database
from core.intake import InsertQueue
from core.jobs import NewJob, create_job, get_job
from core.keys import authenticate, get_or_create_tenant
from core.leases import claim_job
from core.settings import Settings
from core.states import JobKind
from core.tables import Job, utcnow
from scheduler.broker import PUBLISHED_KEY
from scheduler.enqueue import Publisher
from scheduler.periodic import Periodic
from scheduler.worker import InconsistentSettingsError, check_settings
from stack.supervisor import bootstrap
from tests.support.jobs import echo_job


@pytest.fixture
def env(database_url: str, redis_db_url: str, tmp_path: Path) -> Iterator[tuple]:  # type: ignore[type-arg]
    redis_url = redis_db_url
    client = redis.Redis.from_url(redis_url)
    settings = Settings(
        var_dir=tmp_path, database_url=database_url, redis_url=redis_url, republish_after_s=60
    )
    database = Database(settings)
    publisher = Publisher(settings)
    with database.transaction() as session:
        ensure_builtins(session)
        tenant = get_or_create_tenant(session, "acme")
        echo = resolve_model(session, tenant.id, "echo")
        tenant_id, echo_id = tenant.id, echo.id

    def new_job(**kw: object) -> str:
        with database.transaction() as session:
            return create_job(session, echo_job(tenant_id, echo_id, **kw))[0].id

    yield settings, database, Periodic(settings, database, publisher), client, new_job
    publisher.close()
    database.dispose()
    client.flushdb()


def _queued_ids(client: redis.Redis) -> list[str]:
    """Job ids in Celery's Redis lists for the generate queue (every priority step)."""
    ids = []
    for key in client.keys("generate*"):
        if client.type(key) != b"list":
            continue
        for raw in client.lrange(key, 0, -1):
            message = json.loads(raw)
            ids.append(message["headers"]["argsrepr"].strip("[]'\""))
    return ids


def test_reconciler_publishes_only_jobs_without_a_message(env) -> None:  # type: ignore[no-untyped-def]
    settings, database, periodic, client, new_job = env
    lost = new_job()  # committed, never published: a crash between commit and publish
    report = periodic.tick()
    assert report.republished == 1
    assert _queued_ids(client) == [lost]
    assert client.exists(PUBLISHED_KEY.format(job_id=lost))

    # Published and its message present: nothing to do, even once it is old.
    with database.transaction() as session:
        session.execute(
            update(Job).where(Job.id == lost).values(published_at=utcnow() - timedelta(hours=1))
        )
    assert periodic.tick().republished == 0
    assert _queued_ids(client) == [lost]

    # The broker lost everything (a Redis restart without persistence).
    client.flushdb()
    with database.transaction() as session:
        session.execute(
            update(Job).where(Job.id == lost).values(published_at=utcnow() - timedelta(hours=1))
        )
    assert periodic.tick().republished == 1
    assert _queued_ids(client) == [lost]


def test_reaper_requeues_and_publishes_an_expired_job(env) -> None:  # type: ignore[no-untyped-def]
    settings, database, periodic, client, new_job = env
    job_id = new_job()
    with database.transaction() as session:
        assert claim_job(session, job_id, lease_ttl_s=30) is not None
        session.flush()
        session.execute(
            update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(1))
        )
    report = periodic.tick()
    assert (report.reaped, report.requeued) == (1, 1)
    with database.transaction() as session:
        job = get_job(session, job_id)
        assert (job.state, job.attempt, job.lease_token) == ("queued", 1, None)
    assert _queued_ids(client) == [job_id]


def test_delayed_job_starts_when_its_time_comes(env) -> None:  # type: ignore[no-untyped-def]
    settings, database, periodic, client, new_job = env
    later = new_job(run_at=utcnow() + timedelta(hours=1))
    soon = new_job(run_at=utcnow() + timedelta(minutes=10))
    with database.transaction() as session:
        assert get_job(session, soon).state == "scheduled"
    assert periodic.tick().promoted == 0  # not yet
    with database.transaction() as session:
        # Its time comes (the clock is moved, not waited for: on a loaded machine a run_at a
        # moment ahead could pass before the job is even stored).
        get_job(session, soon).run_at = utcnow() - timedelta(seconds=1)
    assert periodic.tick().promoted == 1
    with database.transaction() as session:
        assert get_job(session, soon).state == "queued"
        assert get_job(session, later).state == "scheduled"
    assert _queued_ids(client) == [soon]


def test_bootstrap_makes_one_admin_key_on_first_start(tmp_path: Path) -> None:
    settings = Settings(var_dir=tmp_path)
    key = bootstrap(settings)
    assert key and key.startswith("gq_")
    assert bootstrap(settings) is None  # shown once
    database = Database(settings)
    with database.transaction() as session:
        assert authenticate(session, key).is_admin
    database.dispose()

    fixed = "gq_automation-key-for-ci-0123456789"
    other = Settings(var_dir=tmp_path / "other", admin_key=fixed)
    assert bootstrap(other) is None
    database = Database(other)
    with database.transaction() as session:
        assert authenticate(session, fixed).is_admin
    database.dispose()


def test_worker_refuses_inconsistent_lease_settings(tmp_path: Path) -> None:
    check_settings(Settings(var_dir=tmp_path))
    with pytest.raises(InconsistentSettingsError, match="VISIBILITY_TIMEOUT"):
        check_settings(Settings(var_dir=tmp_path, lease_ttl_s=1800, visibility_timeout_s=3600))
    with pytest.raises(InconsistentSettingsError, match="HEARTBEAT"):
        check_settings(Settings(var_dir=tmp_path, lease_ttl_s=10, heartbeat_interval_s=8))


def test_a_submit_that_died_after_its_commit_is_published_once_its_mark_is_old(env) -> None:  # type: ignore[no-untyped-def]
    # POST /v1/jobs commits its job already marked as published (core/intake.py), then
    # publishes; an API process that dies in between leaves a marked job with no message.
    settings, database, periodic, client, new_job = env
    other = new_job()
    with database.transaction() as session:  # published a moment ago: not the reconciler's
        session.execute(update(Job).where(Job.id == other).values(published_at=utcnow()))
    died = InsertQueue(database).insert(get_job_template(database, other)).id
    with database.read() as session:
        assert get_job(session, died).published_at is not None
    # Within republish_after_s the reconciler trusts the mark, as it would a live publish.
    assert died not in _queued_ids(client) and periodic.tick().republished == 0
    with database.transaction() as session:
        session.execute(
            update(Job).where(Job.id == died).values(published_at=utcnow() - timedelta(hours=1))
        )
    # Once the mark is old and no marker says a message exists, it is published, once.
    assert periodic.tick().republished == 1
    assert _queued_ids(client) == [died]
    assert client.exists(PUBLISHED_KEY.format(job_id=died))
    assert periodic.tick().republished == 0


def get_job_template(database: Database, job_id: str) -> NewJob:
    """A NewJob like the job `job_id` (its tenant, model and queue)."""
    with database.read() as session:
        job = get_job(session, job_id)
        return NewJob(
            tenant_id=job.tenant_id,
            kind=JobKind(job.kind),
            family=job.family,
            queue=job.queue,
            params={},
            model_id=job.model_id,
        )
