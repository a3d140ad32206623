"""The recovery policies without processes, on SQLite and PostgreSQL: capped exponential backoff
with jitter, deadline expiry of waiting jobs, the out-of-memory smaller-batch retry, the reaper's
`lost` ending at the attempt cap, and the dead-letter view. (The same policies under real
crashes are in tests/faults/test_faults.py.)
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from api.app import create_app
from core.catalog import ensure_builtins, resolve_model
from core.db import Database
from core.jobs import create_job
from core.keys import create_key, get_or_create_tenant
from core.leases import claim_job, release_job, retry_backoff_s
from core.recovery import expire_deadlines, reap_expired
from core.settings import Settings
from core.states import JobState
from core.tables import Base, Job, utcnow
from scheduler.enqueue import Publisher
from scheduler.outcomes import is_out_of_memory, smaller_batch
from tests.support.jobs import echo_job


@pytest.fixture
def settings(database_url: str, tmp_path: Path, redis_db_url: str) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        var_dir=tmp_path / "var",
        database_url=database_url,
        redis_url=redis_db_url,
        artifact_root=tmp_path / "artifacts",
        secret_key="k",
    )


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    database = Database(settings)
    Base.metadata.create_all(database.engine)
    with database.transaction() as session:
        ensure_builtins(session)
    yield database
    database.dispose()


def make_job(db: Database, **kw: Any) -> str:
    with db.transaction() as session:
        tenant = get_or_create_tenant(session, "acme")
        model = resolve_model(session, tenant.id, "echo")
        job, _ = create_job(session, echo_job(tenant.id, model.id, **kw))
        return job.id


def test_backoff_doubles_is_capped_and_jittered() -> None:
    for attempt, full in [(1, 2.0), (2, 4.0), (3, 8.0), (10, 60.0)]:
        delays = [retry_backoff_s(attempt, base_s=2.0, cap_s=60.0) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in delays), (attempt, min(delays), max(delays))
        assert len(set(delays)) > 100  # jitter: the jobs of one outage do not return together


def test_waiting_jobs_past_their_deadline_fail_without_starting(db: Database) -> None:
    soon = make_job(db, deadline=utcnow() + timedelta(hours=1))
    late = make_job(db, deadline=utcnow() + timedelta(hours=1))
    with db.transaction() as session:
        session.execute(
            update(Job).where(Job.id == late).values(deadline=utcnow() - timedelta(seconds=1))
        )
    with db.transaction() as session:
        assert expire_deadlines(session) == [late]
    with db.transaction() as session:
        expired, waiting = session.get(Job, late), session.get(Job, soon)
        assert expired is not None and waiting is not None
        assert (expired.state, expired.error_type, expired.attempt) == ("failed", "deadline", 0)
        assert waiting.state == "queued"
        assert claim_job(session, late, lease_ttl_s=60) is None


def test_out_of_memory_halves_the_batch_for_the_next_attempt(db: Database) -> None:
    class OutOfMemoryError(RuntimeError):  # torch.cuda's, as the runner sees it by name
        pass

    assert is_out_of_memory(OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not is_out_of_memory(ValueError("bad"))
    assert smaller_batch({"batch_size": 64, "steps": 3}) == {"batch_size": 32, "steps": 3}
    assert smaller_batch({"batch_size": 1}) is None and smaller_batch({"steps": 3}) is None
    job_id = make_job(db, params={"batch_size": 64})
    with db.transaction() as session:
        lease = claim_job(session, job_id, lease_ttl_s=60)
        assert lease is not None
    with db.transaction() as session:
        state = release_job(session, lease, reason="oom", params=smaller_batch({"batch_size": 64}))
        assert state == JobState.QUEUED
    with db.transaction() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.params == {"batch_size": 32} and job.attempt == 1


def test_reaper_fails_as_lost_at_the_cap_and_dead_letter_lists_it(
    db: Database, settings: Settings
) -> None:
    capped = make_job(db, max_attempts=1)
    retried = make_job(db, max_attempts=2)
    for job_id in (capped, retried):
        with db.transaction() as session:
            assert claim_job(session, job_id, lease_ttl_s=0.01) is not None
    with db.transaction() as session:
        session.execute(
            update(Job).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )  # both workers died
    with db.transaction() as session:
        reaped = {r.job_id: (r.state, r.attempt) for r in reap_expired(session)}
    assert reaped == {capped: (JobState.FAILED, 1), retried: (JobState.QUEUED, 1)}
    app = create_app(settings, database=db, publisher=Publisher(settings))
    with db.transaction() as session:
        _, key = create_key(session, get_or_create_tenant(session, "acme"))
        _, other = create_key(session, get_or_create_tenant(session, "globex"))
    client = app.test_client()
    page = client.get("/v1/dead-letter", headers={"Authorization": f"Bearer {key}"}).get_json()
    assert [(j["id"], j["error"]["type"]) for j in page["items"]] == [(capped, "lost")]
    theirs = client.get("/v1/dead-letter", headers={"Authorization": f"Bearer {other}"})
    assert theirs.get_json()["items"] == []
