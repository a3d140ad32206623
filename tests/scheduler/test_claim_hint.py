"""The claim a broker message makes (scheduler/attempt.py `claim_for_token`), on real SQLite and
PostgreSQL: the queue the message came from stands in for reading its job's, and a hint that
is wrong (broker input may be hostile) changes nothing: a claim made with it is rolled back, and
the job's own queue decides, as without a hint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from core.db import Database
from core.jobs import create_job
from core.settings import Settings
from core.states import JobKind, JobState
from core.tables import FairShare, Job, JobEvent, TenantUsage
from scheduler.attempt import claim_for_token
from tests.support.jobs import echo_job, tenants_database


@pytest.fixture
def db(database_url: str, tmp_path: Path) -> Iterator[Database]:
    """A tenant with a queued `train` job and, newer, a queued `generate` job: their ids as
    `db.train_id` and `db.generate_id`."""
    database = tenants_database(
        Settings(var_dir=tmp_path / "var", database_url=database_url), "acme"
    )
    tenant_id = database.tenants["acme"]  # type: ignore[attr-defined]
    with database.transaction() as session:
        train = echo_job(tenant_id, database.echo_id, kind=JobKind.TRAIN, queue="train")  # type: ignore[attr-defined]
        database.train_id = create_job(session, train)[0].id  # type: ignore[attr-defined]
        generate = echo_job(tenant_id, database.echo_id)  # type: ignore[attr-defined]
        database.generate_id = create_job(session, generate)[0].id  # type: ignore[attr-defined]
    yield database
    database.dispose()


def _state(db: Database, job_id: str) -> tuple[str, int, int]:
    """The job's state and attempt, and how many events it has."""
    with db.read() as session:
        job = session.get(Job, job_id)
        assert job is not None
        events = session.scalar(
            select(func.count()).select_from(JobEvent).where(JobEvent.job_id == job_id)
        )
        return job.state, job.attempt, int(events or 0)


@pytest.mark.parametrize("hint", ["generate", None])
def test_a_message_claims_its_own_job_from_its_queue(db, hint) -> None:  # type: ignore[no-untyped-def]
    claim = claim_for_token(db, db.generate_id, hint, lease_ttl_s=60)
    assert claim.queue == "generate" and claim.lease is not None and claim.snapshot is not None
    assert claim.lease.job_id == db.generate_id and claim.snapshot.queue == "generate"
    assert _state(db, db.generate_id)[:2] == (JobState.RUNNING, 1)
    assert _state(db, db.train_id) == (JobState.QUEUED, 0, 1)


def test_a_hint_naming_another_queue_claims_nothing_there(db) -> None:  # type: ignore[no-untyped-def]
    """A message for the generate job that says it came from `train`: the train job, which
    the hint's claim took, is given back (rolled back: no attempt, no event, no usage), and
    the generate job is claimed from its own queue."""
    claim = claim_for_token(db, db.generate_id, "train", lease_ttl_s=60)
    assert claim.queue == "generate" and claim.lease is not None
    assert claim.lease.job_id == db.generate_id
    assert _state(db, db.train_id) == (JobState.QUEUED, 0, 1)
    with db.read() as session:
        usage = session.get(TenantUsage, claim.snapshot.tenant_id)  # type: ignore[union-attr]
        assert usage is not None and usage.running_attempts == 1


def test_a_hint_naming_no_queue_of_jobs_is_not_used(db) -> None:  # type: ignore[no-untyped-def]
    """A made-up queue name is not claimed from (on PostgreSQL that would write a fair-share
    clock for it; SQLite's claims read no clock under the usage policy)."""
    claim = claim_for_token(db, db.generate_id, "no-such-queue", lease_ttl_s=60)
    assert claim.lease is not None and claim.lease.job_id == db.generate_id
    with db.read() as session:
        queues = set(session.scalars(select(FairShare.queue)))
    assert "no-such-queue" not in queues
    assert queues == (set() if db.engine.dialect.name == "sqlite" else {"generate"})


def test_a_message_for_a_missing_job_starts_nothing(db) -> None:  # type: ignore[no-untyped-def]
    """The hint's claim took a job of the queue; the message's job does not exist, so it is
    rolled back, and the runner is told the job is missing."""
    claim = claim_for_token(db, "no-such-job", "generate", lease_ttl_s=60)
    assert claim.queue is None and claim.lease is None
    assert _state(db, db.generate_id) == (JobState.QUEUED, 0, 1)
