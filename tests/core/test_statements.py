"""Prepared statements on the DBAPI cursor (core/statements.py): the rows, types, errors and
listeners of `Connection.execute`, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, cast

import pytest
from sqlalchemy import Table, bindparam, event, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError, MultipleResultsFound, NoResultFound, OperationalError

from core.db import Database, is_transient_db_error
from core.jobs import NewJob, create_job
from core.statements import Prepared
from core.states import JobKind, JobState
from core.tables import Artifact, Job, JobEvent, UTCDateTime, utcnow

JOB = cast(Table, Job.__table__)


def _job(db: Database, **params: Any) -> str:
    new = NewJob(
        tenant_id=db.tenant_id,  # type: ignore[attr-defined]
        kind=JobKind.GENERATE,
        family="echo",
        queue="generate",
        params=params or {"message": "x", "nested": {"a": [1, 2]}},
        model_id=db.echo_id,  # type: ignore[attr-defined]
    )
    with db.transaction() as session:
        job, _ = create_job(session, new)
    return str(job.id)


def test_rows_and_types_are_those_of_execute(db: Database) -> None:
    job_id = _job(db)
    statement = select(
        JOB.c.id, JOB.c.params, JOB.c.created_at, JOB.c.priority, JOB.c.num_gpus, JOB.c.state
    ).where(JOB.c.id == bindparam("job_id"))
    prepared = Prepared(statement)
    with db.transaction() as session:
        conn = session.connection()
        expected = conn.execute(statement, {"job_id": job_id}).one()
        for _ in range(2):  # the first run learns the result's column types; the second uses them
            got = prepared.run(conn, {"job_id": job_id}).one()
            assert tuple(got) == tuple(expected)
            assert [type(v) for v in got] == [type(v) for v in expected]
            assert got._mapping == dict(expected._mapping)
            assert got.params == {"message": "x", "nested": {"a": [1, 2]}}
            assert isinstance(got.created_at, datetime) and got.created_at.tzinfo is not None
        assert prepared.run(conn, {"job_id": "no-such-job"}).first() is None


def test_an_update_binds_typed_values_and_returns_its_rows(db: Database) -> None:
    job_id = _job(db)
    when = utcnow() + timedelta(seconds=30)
    statement = Prepared(
        update(JOB)
        .where(JOB.c.id == bindparam("job_id"), JOB.c.state == JobState.QUEUED, JOB.c.attempt == 0)
        .values(
            lease_expires_at=bindparam("until", type_=UTCDateTime()),
            metrics=bindparam("new_metrics", type_=JOB.c.metrics.type),
            attempt=JOB.c.attempt + 1,
        )
        .returning(JOB.c.attempt, JOB.c.lease_expires_at, JOB.c.metrics)
    )
    with db.transaction() as session:
        ran = statement.run(
            session.connection(), {"job_id": job_id, "until": when, "new_metrics": {"k": 1.5}}
        )
        assert ran.rowcount == 1 and len(ran.all()) == 1
        assert tuple(ran.one()) == (1, when, {"k": 1.5})
    with db.read() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.attempt, job.lease_expires_at, job.metrics) == (1, when, {"k": 1.5})
    with db.transaction() as session:  # its attempt is no longer 0: nothing matches
        ran = statement.run(
            session.connection(), {"job_id": job_id, "until": when, "new_metrics": {}}
        )
        assert ran.rowcount == 0 and ran.first() is None and ran.scalar() is None
        with pytest.raises(NoResultFound):
            ran.one()


def test_an_insert_takes_the_columns_it_names(db: Database) -> None:
    job_id = _job(db)
    events = Prepared(
        insert(cast(Table, JobEvent.__table__)), keys=("job_id", "type", "data", "created_at")
    )
    with db.transaction() as session:
        for n in range(3):
            params = {"job_id": job_id, "type": "log", "data": {"n": n}, "created_at": utcnow()}
            events.run(session.connection(), params)
    with db.read() as session:
        rows = session.execute(
            select(JobEvent.type, JobEvent.data).where(JobEvent.job_id == job_id)
            .order_by(JobEvent.id)
        ).all()  # fmt: skip
        assert [tuple(r) for r in rows][-3:] == [("log", {"n": n}) for n in range(3)]


def test_a_text_statement_without_columns_returns_the_drivers_rows(db: Database) -> None:
    _job(db)
    _job(db)
    counts = Prepared(text("SELECT queue, count(*) FROM job WHERE state = :state GROUP BY queue"))
    with db.transaction() as session:
        for _ in range(2):
            rows = counts.run(session.connection(), {"state": "queued"}).all()
            assert [tuple(r) for r in rows] == [("generate", 2)]
            assert [queue for queue, _ in rows] == ["generate"]
    with pytest.raises(MultipleResultsFound), db.transaction() as session:
        Prepared(text("SELECT id FROM job")).run(session.connection()).one()


def test_python_side_defaults_are_made_per_run(db: Database) -> None:
    job_id = _job(db)
    with db.read() as session:
        before = session.scalar(select(JOB.c.updated_at).where(JOB.c.id == job_id))
    # The artifact's id (new_id), meta (dict) and created_at (utcnow) come from its defaults;
    # the job's updated_at from its onupdate.
    artifacts = Prepared(
        insert(cast(Table, Artifact.__table__)),
        keys=(
            "job_id",
            "tenant_id",
            "name",
            "kind",
            "path",
            "content_type",
            "size_bytes",
            "sha256",
        ),
    )
    touch = Prepared(update(JOB).where(JOB.c.id == bindparam("job_id")).values(priority=7))
    with db.transaction() as session:
        conn = session.connection()
        for name in ("a", "b"):
            params = {
                "job_id": job_id,
                "tenant_id": db.tenant_id,  # type: ignore[attr-defined]
                "name": name,
                "kind": "text",
                "path": f"p/{name}",
                "content_type": "text/plain",
                "size_bytes": 1,
                "sha256": "0" * 64,
            }
            artifacts.run(conn, params)
        assert touch.run(conn, {"job_id": job_id}).rowcount == 1
    with db.read() as session:
        rows = session.execute(select(Artifact).where(Artifact.job_id == job_id)).scalars().all()
        assert len({a.id for a in rows}) == 2 and all(a.meta == {} for a in rows)
        assert all(a.created_at >= before for a in rows)
        job = session.get(Job, job_id)
        assert job is not None and job.priority == 7 and job.updated_at > before


def test_what_would_need_the_execution_context_is_refused(db: Database) -> None:
    with db.transaction() as session:
        conn = session.connection()
        listed = Prepared(select(JOB.c.id).where(JOB.c.id.in_(bindparam("ids", expanding=True))))
        with pytest.raises(ValueError, match="per call"):
            listed.run(conn, {"ids": ["a"]})
        one = Prepared(select(JOB.c.id).where(JOB.c.id == bindparam("job_id")))
        with pytest.raises(KeyError, match="job_id"):
            one.run(conn, {})
    with db.engine.connect() as conn, pytest.raises(RuntimeError, match="transaction"):
        one.run(conn, {"job_id": "j"})


def test_a_driver_error_is_sqlalchemys_and_loses_nothing_stored(db: Database) -> None:
    job_id = _job(db)
    events = Prepared(
        insert(cast(Table, JobEvent.__table__)), keys=("job_id", "type", "data", "created_at")
    )
    count = select(func.count()).select_from(JobEvent).where(JobEvent.job_id == job_id)
    with db.read() as session:
        before = session.scalar(count)
    with pytest.raises(IntegrityError), db.transaction() as session:
        conn = session.connection()
        events.run(conn, {"job_id": job_id, "type": "log", "data": {}, "created_at": utcnow()})
        # No such job: the foreign key refuses the row, in SQLAlchemy's exception.
        events.run(conn, {"job_id": "no-such", "type": "log", "data": {}, "created_at": utcnow()})
    with db.transaction() as session:  # rolled back whole; the connection usable again
        assert session.scalar(count) == before


def test_listeners_see_each_statement(db: Database) -> None:
    job_id = _job(db)
    prepared = Prepared(select(JOB.c.state).where(JOB.c.id == bindparam("job_id")))
    seen: list[str] = []

    def before(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        seen.append(statement)

    event.listen(db.engine, "before_cursor_execute", before)
    try:
        with db.transaction() as session:
            assert prepared.run(session.connection(), {"job_id": job_id}).scalar() == "queued"
    finally:
        event.remove(db.engine, "before_cursor_execute", before)
    assert [s for s in seen if s.lstrip().upper().startswith("SELECT JOB.STATE")], seen


# A statement that kills its own connection, as a database restart or failover would.
KILL_ON_INSERT = """
CREATE TABLE doomed (x integer);
CREATE OR REPLACE FUNCTION kill_self() RETURNS trigger AS $$
BEGIN
  PERFORM pg_terminate_backend(pg_backend_pid());
  RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER kill_self BEFORE INSERT ON doomed FOR EACH ROW EXECUTE FUNCTION kill_self();
"""


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_lost_connection_is_transient_and_replaced(db: Database) -> None:
    with db.engine.begin() as conn:
        conn.exec_driver_sql(KILL_ON_INSERT)
    killer = Prepared(text("INSERT INTO doomed VALUES (1)"))
    job_id = _job(db)
    with pytest.raises(OperationalError) as caught, db.transaction() as session:
        conn = session.connection()
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        killer.run(conn)
    assert caught.value.connection_invalidated and is_transient_db_error(caught.value)
    state = Prepared(select(JOB.c.state).where(JOB.c.id == bindparam("job_id")))
    with db.transaction() as session:  # a new connection, the job as it was
        conn = session.connection()
        assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() != pid
        assert state.run(conn, {"job_id": job_id}).scalar() == "queued"
