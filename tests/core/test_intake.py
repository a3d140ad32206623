"""The submit path's inserts (core/intake.py) on real SQLite and PostgreSQL: the rows a job
starts with, group commits of jobs submitted together, and a group with one bad row, which
fails only that job."""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.exc import IntegrityError

from core.db import Database
from core.intake import InsertQueue, insert_job
from core.jobs import NewJob, create_job
from core.states import JobState
from core.tables import Job, JobEvent
from tests.support.jobs import echo_job


def _new(db: Database, **kw: Any) -> NewJob:
    fields: dict[str, Any] = {
        "tenant_id": db.tenant_id,  # type: ignore[attr-defined]
        "model_id": db.echo_id,  # type: ignore[attr-defined]
        "params": {"message": "hi"},
        **kw,  # a test may give another model_id
    }
    return echo_job(**fields)


def _columns(job: Job) -> dict[str, Any]:
    return {c.key: getattr(job, c.key) for c in Job.__table__.columns}


def test_insert_job_writes_the_row_create_job_writes(db: Database) -> None:
    with db.transaction() as session:
        inserted, created = insert_job(session, _new(db), published=True)
        made, _ = create_job(session, _new(db))
    assert created
    with db.read() as session:
        stored = session.get(Job, inserted.id)
        other = session.get(Job, made.id)
        assert stored is not None and other is not None
        # Every column as the ORM path fills it, but the id, the times and the publish mark.
        skip = {"id", "created_at", "updated_at", "published_at"}
        mine = {k: v for k, v in _columns(stored).items() if k not in skip}
        assert mine == {k: v for k, v in _columns(other).items() if k not in skip}
        # The object returned is the row as stored.
        assert _columns(inserted) == _columns(stored)
        assert stored.state == JobState.QUEUED and stored.published_at is not None
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == inserted.id)).all()
        assert [(e.type, e.data) for e in events] == [("state", {"from": None, "to": "queued"})]


def test_insert_job_returns_the_earlier_job_of_an_idempotency_key(db: Database) -> None:
    with db.transaction() as session:
        first, created = insert_job(session, _new(db, idempotency_key="k"), published=True)
    with db.transaction() as session:
        again, created_again = insert_job(session, _new(db, idempotency_key="k"), published=True)
    assert created and not created_again and again.id == first.id


def _submit_all(queue: InsertQueue, news: list[NewJob]) -> dict[int, Job | BaseException]:
    results: dict[int, Job | BaseException] = {}

    def submit(index: int) -> None:
        try:
            results[index] = queue.insert(news[index])
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            results[index] = exc

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(news))]
    for thread in threads:
        thread.start()
    return results, threads  # type: ignore[return-value]


def _count_commits(db: Database) -> list[int]:
    commits = [0]

    @event.listens_for(db.engine, "commit")
    def _commit(_conn: Any) -> None:
        commits[0] += 1

    return commits


def _submit_behind_a_held_lock(
    db: Database, queue: InsertQueue, news: list[NewJob]
) -> dict[int, Job | BaseException]:
    """Submit `news` at once while a transaction holds SQLite's write lock (a row lock on
    PostgreSQL), so that they queue up for it; each one's job or error once all have ended."""
    held = db.transaction()
    held.__enter__().execute(select(JobEvent.id).limit(1))
    results, threads = _submit_all(queue, news)  # type: ignore[misc]
    if db.writers is not None:
        # All but the leader (which waits for the write lock) queue behind it.
        while queue.waiting() < len(news):
            threading.Event().wait(0.01)
    held.__exit__(None, None, None)
    for thread in threads:
        thread.join(60)
    return results


def test_jobs_submitted_together_commit_in_one_group(db: Database) -> None:
    queue = InsertQueue(db)
    commits = _count_commits(db)
    results = _submit_behind_a_held_lock(db, queue, [_new(db) for _ in range(8)])
    committed = commits[0]
    assert all(isinstance(r, Job) for r in results.values()) and len(results) == 8
    ids = [r.id for r in results.values()]  # type: ignore[union-attr]
    with db.read() as read:
        rows = read.scalars(select(Job).where(Job.id.in_(ids))).all()
        assert len(rows) == 8 and all(r.published_at is not None for r in rows)
        events = read.scalars(select(JobEvent).where(JobEvent.job_id.in_(ids))).all()
        assert sorted(e.job_id for e in events) == sorted(ids)
    if db.writers is not None:
        assert committed == 2  # the held transaction, then one group of all eight
    assert queue.waiting() == 0


def test_a_bad_row_fails_only_its_own_job(db: Database) -> None:
    queue = InsertQueue(db)
    commits = _count_commits(db)
    # A model deleted between the submit's reads and its insert: the foreign key refuses it.
    news = [_new(db) for _ in range(3)] + [_new(db, model_id="no-such-model")]
    results = _submit_behind_a_held_lock(db, queue, news)
    committed = commits[0]
    assert isinstance(results[3], IntegrityError)
    good = [results[i] for i in range(3)]
    assert all(isinstance(r, Job) for r in good)
    with db.read() as read:
        ids = [r.id for r in good]  # type: ignore[union-attr]
        assert len(read.scalars(select(Job.id).where(Job.id.in_(ids))).all()) == 3
    if db.writers is not None:
        # The group failed as a whole (the fault fired), then each job was tried alone.
        assert committed == 1 + 3
    assert queue.waiting() == 0
