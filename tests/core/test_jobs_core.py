"""The job services on real SQLite and PostgreSQL: claims that only one caller wins, fencing by
lease token, the reaper, cancellation, outputs recorded once, deadlines."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import event, func, select, update

from core.artifacts import ArtifactStore
from core.errors import IllegalTransitionError, LeaseLostError
from core.events import Log, Metric, Output, Progress, TextDelta
from core.jobs import add_event, cancel_job, create_job, get_job
from core.leases import claim_job, finish_job, heartbeat, release_job
from core.recording import record_events, record_output, record_placement
from core.recovery import reap_expired, unpublished_jobs
from core.states import TRANSITIONS, JobState, check_transition
from core.tables import Artifact, Job, JobEvent, TenantUsage, utcnow
from tests.support.jobs import echo_job


def _new(db, **kw) -> str:  # type: ignore[no-untyped-def]
    with db.transaction() as session:
        new = echo_job(db.tenant_id, db.echo_id, **{"params": {"message": "hi"}, **kw})
        job, created = create_job(session, new)
        assert created
        return job.id


def test_transition_table_allows_only_listed_changes() -> None:
    for old, targets in TRANSITIONS.items():
        for new in JobState:
            if new in targets:
                check_transition(old, new)
            else:
                with pytest.raises(IllegalTransitionError):
                    check_transition(old, new)
    assert TRANSITIONS[JobState.SUCCEEDED] == frozenset()


def test_idempotency_key_returns_the_first_job(db) -> None:  # type: ignore[no-untyped-def]
    first = _new(db, idempotency_key="k1")
    with db.transaction() as session:
        job, created = create_job(session, echo_job(db.tenant_id, db.echo_id, idempotency_key="k1"))
        assert not created and job.id == first
        assert session.scalar(select(func.count()).select_from(Job)) == 1


def test_concurrent_claims_have_exactly_one_winner(db) -> None:  # type: ignore[no-untyped-def]
    job_ids = [_new(db) for _ in range(10)]
    contenders = 4
    wins: dict[str, list[int]] = {j: [] for j in job_ids}
    errors: list[BaseException] = []
    barrier = threading.Barrier(contenders)

    def contend(n: int) -> None:
        try:
            barrier.wait()
            for job_id in job_ids:
                with db.transaction() as session:
                    lease = claim_job(session, job_id, lease_ttl_s=30)
                if lease is not None:
                    wins[job_id].append(n)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(len(w) == 1 for w in wins.values()), wins
    with db.transaction() as session:
        attempts = session.scalars(select(Job.attempt)).all()
        assert sorted(attempts) == [1] * len(job_ids)


def test_a_reaped_lease_is_fenced_off(db) -> None:  # type: ignore[no-untyped-def]
    job_id = _new(db)
    with db.transaction() as session:
        old = claim_job(session, job_id, lease_ttl_s=30)
    assert old is not None
    with db.transaction() as session:  # the worker went silent: its lease ran out
        session.execute(
            update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(1))
        )
    with db.transaction() as session:
        reaped = reap_expired(session)
    assert [(r.job_id, r.state) for r in reaped] == [(job_id, JobState.QUEUED)]
    with db.transaction() as session:
        new = claim_job(session, job_id, lease_ttl_s=30)
    assert new is not None and new.attempt == 2
    for write in (
        lambda s: record_events(s, old, [Progress(1, 2)]),
        lambda s: heartbeat(s, old, lease_ttl_s=30),
        lambda s: finish_job(s, old, JobState.SUCCEEDED),
    ):
        with pytest.raises(LeaseLostError), db.transaction() as session:
            write(session)
    with db.transaction() as session:
        record_events(session, new, [Progress(2, 2, "done"), Metric(2, {"loss": 0.5})])
        assert finish_job(session, new, JobState.SUCCEEDED) == JobState.SUCCEEDED
    with db.transaction() as session:
        job = get_job(session, job_id)
        assert (job.state, job.progress_step, job.progress_message) == ("succeeded", 2, "done")
        assert job.lease_token is None


def test_reaper_fails_a_job_out_of_attempts_as_lost(db) -> None:  # type: ignore[no-untyped-def]
    job_id = _new(db, max_attempts=2)
    for attempt in (1, 2):
        with db.transaction() as session:
            lease = claim_job(session, job_id, lease_ttl_s=30)
        assert lease is not None and lease.attempt == attempt
        with db.transaction() as session:
            session.execute(
                update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(1))
            )
        with db.transaction() as session:
            reaped = reap_expired(session)
        assert len(reaped) == 1
    with db.transaction() as session:
        job = get_job(session, job_id)
        assert (job.state, job.error_type, job.attempt) == ("failed", "lost", 2)
        assert claim_job(session, job_id, lease_ttl_s=30) is None


def test_cancel_queued_is_immediate_and_running_goes_through_canceling(db) -> None:  # type: ignore[no-untyped-def]
    queued, running = _new(db), _new(db)
    with db.transaction() as session:
        lease = claim_job(session, running, lease_ttl_s=30)
        assert lease is not None
    with db.transaction() as session:
        assert cancel_job(session, get_job(session, queued)) == JobState.CANCELED
        assert cancel_job(session, get_job(session, running)) == JobState.CANCELING
    with db.transaction() as session:
        assert heartbeat(session, lease, lease_ttl_s=30) == JobState.CANCELING
        # The attempt finished its work anyway: the cancel request wins.
        assert finish_job(session, lease, JobState.SUCCEEDED) == JobState.CANCELED
    with db.transaction() as session:
        assert claim_job(session, queued, lease_ttl_s=30) is None  # never resurrected
        with pytest.raises(IllegalTransitionError):
            cancel_job(session, get_job(session, running))


def test_an_output_is_recorded_once(db, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    job_id = _new(db)
    store = ArtifactStore(tmp_path / "artifacts")
    with db.transaction() as session:
        lease = claim_job(session, job_id, lease_ttl_s=30)
    output = Output("output.txt", "text", "text/plain", b"hi")
    ids = []
    for _ in range(2):
        stored = store.write_output(db.tenant_id, job_id, output.name, output.data)
        with db.transaction() as session:
            ids.append(record_output(session, lease, output, stored).id)
    assert ids[0] == ids[1]
    with db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(Artifact)) == 1
        events = session.scalars(select(JobEvent.type).where(JobEvent.job_id == job_id)).all()
        assert events.count("output") == 1
    assert store.resolve(stored.path).read_bytes() == b"hi"


def test_one_transaction_records_a_name_once(db, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The second record of a name in the same transaction finds the first, still unflushed."""
    job_id = _new(db)
    store = ArtifactStore(tmp_path / "artifacts")
    with db.transaction() as session:
        lease = claim_job(session, job_id, lease_ttl_s=30)
    output = Output("output.txt", "text", "text/plain", b"hi")
    stored = store.write_output(db.tenant_id, job_id, output.name, output.data)
    with db.transaction() as session:
        first = record_output(session, lease, output, stored)
        assert record_output(session, lease, output, stored) is first
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(Artifact)) == 1


def test_the_finish_keeps_the_columns_its_fenced_read_left_out(db) -> None:  # type: ignore[no-untyped-def]
    """The fence reads a few of the job row's columns: the finish still merges the metrics
    already stored, a column it did not read is loaded when used in the same transaction, and
    the columns it does not write keep their values."""
    job_id = _new(db, params={"message": "kept"}, priority=3)
    with db.transaction() as session:
        lease = claim_job(session, job_id, lease_ttl_s=30)
        session.execute(update(Job).where(Job.id == job_id).values(metrics={"earlier": 1}))
    assert lease is not None
    with db.transaction() as session:
        record_placement(session, lease, {"node": "n1"})
        job = session.get(Job, job_id)  # the fence's copy of the row
        assert job is not None and job.params == {"message": "kept"}
        assert finish_job(session, lease, JobState.SUCCEEDED, metrics={"load_s": 0.5}) == (
            JobState.SUCCEEDED
        )
    with db.read() as session:
        job = get_job(session, job_id)
        assert job.state == JobState.SUCCEEDED and job.lease_token is None
        assert job.metrics == {"earlier": 1, "load_s": 0.5}
        assert job.params == {"message": "kept"} and job.priority == 3
        assert job.placement == {"node": "n1"} and job.attempt == 1
        assert job.started_at is not None and job.finished_at is not None


def test_finishing_with_an_output_updates_the_job_row_once(db, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The runner's finish (placement, output, state and usage in one transaction) writes the
    job row with one UPDATE: the lookups in it do not flush the pending changes first."""
    job_id = _new(db)
    store = ArtifactStore(tmp_path / "artifacts")
    with db.transaction() as session:
        lease = claim_job(session, job_id, lease_ttl_s=30)
    assert lease is not None
    output = Output("output.txt", "text", "text/plain", b"hi")
    stored = store.write_output(db.tenant_id, job_id, output.name, output.data)
    statements: list[str] = []

    def seen(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        statements.append(statement)

    event.listen(db.engine, "before_cursor_execute", seen)
    try:
        with db.transaction() as session:
            record_placement(session, lease, {"node": "n1"})
            record_output(session, lease, output, stored)
            assert finish_job(session, lease, JobState.SUCCEEDED) == JobState.SUCCEEDED
    finally:
        event.remove(db.engine, "before_cursor_execute", seen)
    assert sum(s.lstrip().upper().startswith("UPDATE JOB ") for s in statements) == 1
    with db.read() as session:
        job = get_job(session, job_id)
        assert job.state == JobState.SUCCEEDED and job.placement == {"node": "n1"}
        assert session.scalar(select(func.count()).select_from(Artifact)) == 1


def test_a_job_past_its_deadline_is_not_started(db) -> None:  # type: ignore[no-untyped-def]
    job_id = _new(db, deadline=utcnow() - timedelta(seconds=1))
    with db.transaction() as session:
        assert claim_job(session, job_id, lease_ttl_s=30) is None
    with db.transaction() as session:
        job = get_job(session, job_id)
        assert (job.state, job.error_type, job.attempt) == ("failed", "deadline", 0)


def test_release_requeues_then_fails_when_attempts_run_out(db) -> None:  # type: ignore[no-untyped-def]
    job_id = _new(db, max_attempts=2)
    states = []
    for _ in range(2):
        with db.transaction() as session:
            lease = claim_job(session, job_id, lease_ttl_s=30)
            assert lease is not None
        with db.transaction() as session:
            states.append(release_job(session, lease, reason="actor died"))
    assert states == [JobState.QUEUED, JobState.FAILED]
    with db.transaction() as session:
        assert get_job(session, job_id).error_type == "transient"


def test_unpublished_jobs_lists_never_published_first(db) -> None:  # type: ignore[no-untyped-def]
    a, b = _new(db), _new(db)
    with db.transaction() as session:
        session.execute(
            update(Job).where(Job.id == a).values(published_at=utcnow() - timedelta(hours=1))
        )
        assert unpublished_jobs(session, older_than_s=60) == [b, a]
        assert unpublished_jobs(session, older_than_s=7200) == [b]


def test_nul_characters_from_a_worker_are_stored_as_replacement_characters(db) -> None:  # type: ignore[no-untyped-def]
    # A model may generate U+0000 (GPT-2's vocabulary has byte 0); PostgreSQL stores it in
    # neither text nor jsonb, so the write (and the attempt) would fail.
    job_id = _new(db)
    with db.transaction() as session:
        lease = claim_job(session, job_id, lease_ttl_s=30)
    with db.transaction() as session:
        record_events(
            session,
            lease,
            [
                Log("a\x00b"),
                TextDelta(0, "\x00"),
                Progress(1, 2, "step\x00"),
                Metric(1, {"m\x00": 1.0}),
            ],
        )
    with db.transaction() as session:
        finish_job(
            session,
            lease,
            JobState.FAILED,
            error_type="model-error",
            error_detail="bad\x00",
            metrics={"k\x00": 1.0},
        )
    with db.transaction() as session:
        job = get_job(session, job_id)
        assert (job.progress_message, job.error_detail) == ("step\ufffd", "bad\ufffd")
        assert job.metrics == {"k\ufffd": 1.0}
        data = session.scalars(
            select(JobEvent.data).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        ).all()
    assert {"message": "a\ufffdb", "level": "info"} in data
    assert {"index": 0, "text": "\ufffd"} in data
    assert {"step": 1, "values": {"m\ufffd": 1.0}} in data


def test_events_keep_the_order_they_were_added_in(db, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A job's events are written at once (a Core INSERT) once its row exists, through the
    session's flush while it does not or while an event is still pending there: their ids
    follow the order of the calls either way, and a new job's first events land."""
    with db.transaction() as session:
        job, _ = create_job(session, echo_job(db.tenant_id, db.echo_id, params={"message": "hi"}))
        add_event(session, job, "log", {"message": "while pending"})  # the row is not written
        job_id = job.id
    with db.transaction() as session:
        lease = claim_job(session, job_id, lease_ttl_s=30)
    assert lease is not None
    store = ArtifactStore(tmp_path / "artifacts")
    output = Output("output.txt", "text", "text/plain", b"hi")
    stored = store.write_output(db.tenant_id, job_id, output.name, output.data)
    with db.transaction() as session:
        record_events(session, lease, [Log("first")])
        held = get_job(session, job_id)
        # An event pending in the session: the ones after it wait for the flush too.
        session.add(JobEvent(job_id=job_id, type="log", data={"message": "pending"}))
        record_events(session, lease, [Log("after the pending one")])
        record_output(session, lease, output, stored)
        session.flush()
        add_event(session, held, "log", {"message": "after the flush"})
        finish_job(session, lease, JobState.SUCCEEDED)
    with db.read() as session:
        events = session.execute(
            select(JobEvent.type, JobEvent.data)
            .where(JobEvent.job_id == job_id)
            .order_by(JobEvent.id)
        ).all()
    said = [data.get("message") or data.get("to") or data.get("name") for _, data in events]
    assert said == [
        "queued",
        "while pending",
        "running",
        "first",
        "pending",
        "after the pending one",
        "output.txt",
        "after the flush",
        "succeeded",
    ]


def test_a_later_attempt_gets_the_earlier_attempts_output_and_usage_counts_each_once(
    db, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """An output name an earlier attempt recorded is not recorded again (the INSERT finds it
    taken: the later attempt gets the first row, one row and one output event in all), nor is
    a name recorded twice in one finishing transaction; the tenant's usage counts each
    attempt once, and none runs at the end."""
    job_id = _new(db)
    store = ArtifactStore(tmp_path / "artifacts")
    output = Output("output.txt", "text", "text/plain", b"one")
    with db.transaction() as session:
        lease = claim_job(session, job_id, lease_ttl_s=30)
    assert lease is not None
    stored = store.write_output(db.tenant_id, job_id, output.name, output.data, lease.token)
    with db.transaction() as session:
        first = record_output(session, lease, output, stored)
        release_job(session, lease, reason="transient")
    with db.transaction() as session:
        again = claim_job(session, job_id, lease_ttl_s=30)
    assert again is not None and again.attempt == 2
    later = store.write_output(db.tenant_id, job_id, output.name, b"two", again.token)
    with db.transaction() as session:
        record_placement(session, again, {"node": "n2"})
        kept = record_output(session, again, output, later)
        assert kept.id == first.id and kept.path == stored.path
        assert record_output(session, again, output, later) is kept
        finish_job(session, again, JobState.SUCCEEDED)
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(Artifact)) == 1
        events = session.scalars(select(JobEvent.type).where(JobEvent.job_id == job_id)).all()
        assert events.count("output") == 1
        job = get_job(session, job_id)
        assert job.state == JobState.SUCCEEDED and job.placement == {"node": "n2"}
        usage = session.get(TenantUsage, db.tenant_id)
        assert usage is not None and usage.running_attempts == 0
        assert usage.running_rate == 0.0 and usage.attempts == pytest.approx(2.0, rel=1e-3)


def test_a_claim_refreshes_the_copy_of_the_job_the_session_holds(db) -> None:  # type: ignore[no-untyped-def]
    """A job row the transaction read before claiming it shows the claim: the claim's own
    UPDATE does not go through that copy, and the copy's unflushed change is kept."""
    job_id = _new(db)
    with db.transaction() as session:
        job = get_job(session, job_id)
        job.priority = 7  # unflushed when the claim runs
        lease = claim_job(session, job_id, lease_ttl_s=30)
        assert lease is not None
        assert job.state == JobState.RUNNING and job.attempt == 1
        assert job.lease_token == lease.token and job.priority == 7
        heartbeat(session, lease, lease_ttl_s=30)  # the fence finds the same copy
    with db.read() as session:
        job = get_job(session, job_id)
        assert job.state == JobState.RUNNING and job.priority == 7
