"""What a broker token does when it finds nothing it may start (scheduler/tokens.py), on real
SQLite/PostgreSQL and Redis: a job held by its tenant's running cap keeps its marker only for
`held_recheck_s` (then the reconciler sends a new token), and a job waiting for its retry
backoff gets its token back with the remaining delay. Runner.run stops before Ray here: no job
is claimable in these cases."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import update

from core.catalog import ensure_builtins, resolve_model
from core.db import Database
from core.fairness import claim_next
from core.jobs import create_job
from core.keys import get_or_create_tenant
from core.settings import Settings
from core.tables import Job, Tenant, utcnow
from scheduler.broker import PUBLISHED_KEY
from scheduler.enqueue import Publication, Publisher
from scheduler.runner import Runner
from tests.support.jobs import echo_job


@pytest.fixture
def env(database_url: str, redis_db_url: str, tmp_path: Path) -> Iterator[tuple]:  # type: ignore[type-arg]
    redis_url = redis_db_url
    client = redis.Redis.from_url(redis_url)
    settings = Settings(
        var_dir=tmp_path, database_url=database_url, redis_url=redis_url, held_recheck_s=20
    )
    database = Database(settings)
    publisher = Publisher(settings)
    with database.transaction() as session:
        ensure_builtins(session)
        tenant = get_or_create_tenant(session, "acme")
        tenant.max_running = 1
        echo = resolve_model(session, tenant.id, "echo").id
        ids = []
        for _ in range(3):
            job, _ = create_job(session, echo_job(tenant.id, echo))
            ids.append(job.id)
    publisher.publish(database, [Publication(j, "generate") for j in ids])
    yield settings, database, publisher, client, ids
    publisher.close()
    database.dispose()
    client.flushdb()


def test_a_token_held_by_the_running_cap_rechecks_later(env) -> None:  # type: ignore[no-untyped-def]
    settings, database, publisher, client, ids = env
    with database.transaction() as session:
        lease = claim_next(session, "generate", lease_ttl_s=60)  # the tenant is at its cap
    assert lease is not None and lease.job_id == ids[0]
    publisher.forget(ids[0])
    runner = Runner(settings, database, publisher)
    assert runner.run(ids[1]) == "skipped:queued"
    key = PUBLISHED_KEY.format(job_id=ids[1])
    assert client.get(key) == b"held" and 0 < client.ttl(key) <= 20
    # The other job's marker is untouched: its token is still in the broker.
    assert client.ttl(PUBLISHED_KEY.format(job_id=ids[2])) > 20
    # A spare token (its job already running) holds one queued job the same way.
    assert runner.run(ids[0]) == "skipped:running"
    assert client.get(PUBLISHED_KEY.format(job_id=ids[2])) == b"held"
    with database.transaction() as session:
        session.execute(
            update(Tenant).where(Tenant.max_running.is_not(None)).values(max_running=None)
        )


def test_a_token_of_a_job_in_backoff_comes_back_when_due(env) -> None:  # type: ignore[no-untyped-def]
    settings, database, publisher, client, ids = env
    later = utcnow() + timedelta(seconds=30)
    with database.transaction() as session:
        session.execute(update(Job).values(not_before=later))
    depth = sum(client.llen(k) for k in client.keys("generate*") if client.type(k) == b"list")
    runner = Runner(settings, database, publisher)
    assert runner.run(ids[0]) == "skipped:queued"
    after = sum(client.llen(k) for k in client.keys("generate*") if client.type(k) == b"list")
    assert after == depth + 1  # republished (with its countdown)
    key = PUBLISHED_KEY.format(job_id=ids[0])
    assert client.get(key) == b"1"  # a real message, not a held marker
