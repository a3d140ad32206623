"""The claim a broker message makes (scheduler/attempt.py `claim_for_token`), on real SQLite and
PostgreSQL: the queue the message came from stands in for reading its job's, and a hint that
is wrong (broker input may be hostile) changes nothing: a claim made with it is rolled back, and
the job's own queue decides, as without a hint."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select, update

from core.catalog import register_model
from core.db import Database
from core.jobs import create_job
from core.settings import Settings
from core.states import JobKind, JobState
from core.tables import FairShare, Job, JobEvent, TenantUsage, utcnow
from scheduler.attempt import claim_for_token, read_snapshot
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


def test_the_snapshot_takes_the_model_the_claim_returned(db) -> None:  # type: ignore[no-untyped-def]
    """The claim returns the job's model with the claimed row (core.leases.claimed_model): the
    snapshot built from it is the one a read of the model rows gives, for an adapter version
    served by its base too."""
    tenant_id = db.tenants["acme"]
    with db.transaction() as session:
        base = register_model(
            session, tenant_id=tenant_id, name="base", family="echo", path="models/base",
            config={"width": 8},
        )  # fmt: skip
        adapter = register_model(
            session, tenant_id=tenant_id, name="tuned", family="echo", path="models/tuned",
            config={"served_by_base": True, "rank": 4}, parent_id=base.id,
        )  # fmt: skip
        job_id = create_job(session, echo_job(tenant_id, adapter.id))[0].id
        session.execute(delete(Job).where(Job.id == db.generate_id))
    claim = claim_for_token(db, job_id, "generate", lease_ttl_s=60)
    assert claim.lease is not None and claim.snapshot is not None
    assert claim.lease.job_id == job_id
    with db.read() as session:
        read = read_snapshot(session, job_id)
    snap = claim.snapshot
    assert (snap.model_path, snap.model_config) == (
        "models/tuned",
        {"served_by_base": True, "rank": 4},
    )
    assert (snap.serve_model_id, snap.serve_model_path, snap.serve_model_config) == (
        base.id, "models/base", {"width": 8},
    )  # fmt: skip
    assert snap.adapter == {"id": adapter.id, "path": "models/tuned"}
    assert vars(snap) == vars(read)


def test_a_claim_fails_an_expired_first_job_and_starts_the_next(db) -> None:  # type: ignore[no-untyped-def]
    """The tenant's first due job is found and claimed in one statement; when that one's
    deadline has passed, the claim fails it and starts the next job in line."""
    tenant_id = db.tenants["acme"]
    with db.transaction() as session:
        later = create_job(session, echo_job(tenant_id, db.echo_id))[0].id
        session.execute(
            update(Job)
            .where(Job.id == db.generate_id)
            .values(deadline=utcnow() - timedelta(seconds=1))
        )
    claim = claim_for_token(db, db.generate_id, "generate", lease_ttl_s=60)
    assert claim.lease is not None and claim.lease.job_id == later
    assert _state(db, later)[:2] == (JobState.RUNNING, 1)
    with db.read() as session:
        expired = session.get(Job, db.generate_id)
        assert expired is not None
        assert (expired.state, expired.error_type, expired.attempt) == ("failed", "deadline", 0)
