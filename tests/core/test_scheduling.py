"""The claim order on real SQLite and PostgreSQL (core/fairness.py, core/quotas.py): fair share
between tenants, priorities, queue positions that match the order jobs really start in, the
running cap under concurrent claims, and the GPU-seconds budget. The claim function is driven
directly with real SQL; tests/test_scheduling_stack.py runs the same rules through a worker."""

from __future__ import annotations

import random
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from core.errors import QuotaExceededError
from core.fairness import claim_next
from core.jobs import create_job, parse_priority
from core.leases import Lease, finish_job
from core.positions import queue_positions
from core.quotas import check_submission
from core.settings import Settings
from core.states import JobState
from core.tables import Job, Tenant, utcnow
from tests.support.jobs import echo_job, tenants_database


@pytest.fixture
def db(database_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    # The start-based policy: its order does not depend on how long the test's jobs run
    # (tests/core/test_usage.py covers the usage-based one with a clock of its own).
    settings = Settings(var_dir=tmp_path / "var", database_url=database_url, fair_share="starts")
    database = tenants_database(settings, "a", "b", "c")
    yield database
    database.dispose()


def _submit(db, tenant: str, n: int = 1, priority: int | str = 5) -> list[str]:  # type: ignore[no-untyped-def]
    ids = []
    with db.transaction() as session:
        for _ in range(n):
            new = echo_job(db.tenants[tenant], db.echo_id, priority=parse_priority(priority))
            job, _ = create_job(session, new)
            ids.append(job.id)
    return ids


def _claim(db) -> Lease | None:  # type: ignore[no-untyped-def]
    with db.transaction() as session:
        return claim_next(session, "generate", lease_ttl_s=60)


def _finish(db, lease: Lease) -> None:  # type: ignore[no-untyped-def]
    with db.transaction() as session:
        finish_job(session, lease, JobState.SUCCEEDED)


def _tenant_of(db, job_id: str) -> str:  # type: ignore[no-untyped-def]
    with db.transaction() as session:
        tenant_id = session.scalar(select(Job.tenant_id).where(Job.id == job_id))
    return {v: k for k, v in db.tenants.items()}[tenant_id]


def _set_tenant(db, name: str, **values: object) -> None:  # type: ignore[no-untyped-def]
    with db.transaction() as session:
        session.execute(update(Tenant).where(Tenant.id == db.tenants[name]).values(**values))


def test_a_one_job_tenant_waits_behind_at_most_one_job_per_slot(db) -> None:  # type: ignore[no-untyped-def]
    slots = 2
    _submit(db, "a", 200)
    running = [_claim(db) for _ in range(slots)]  # A holds every slot
    (b_job,) = _submit(db, "b")
    started_before_b = 0
    while True:
        _finish(db, running.pop(0))  # a slot frees up
        lease = _claim(db)
        assert lease is not None
        if lease.job_id == b_job:
            break
        started_before_b += 1
        running.append(lease)
    assert started_before_b <= slots - 1, started_before_b


def test_an_interactive_job_goes_ahead_of_a_batch_backlog(db) -> None:  # type: ignore[no-untyped-def]
    _submit(db, "a", 100, priority="batch")
    (urgent,) = _submit(db, "a", priority="interactive")
    lease = _claim(db)
    assert lease is not None and lease.job_id == urgent


def test_weights_share_the_slots(db) -> None:  # type: ignore[no-untyped-def]
    _set_tenant(db, "a", weight=2)
    _submit(db, "a", 40)
    _submit(db, "b", 40)
    first = [_tenant_of(db, lease.job_id) for lease in (_claim(db) for _ in range(30)) if lease]
    assert first.count("a") == 20 and first.count("b") == 10, first


def test_queue_positions_match_the_order_jobs_start_in(db) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(7)
    _set_tenant(db, "b", weight=3)
    for _ in range(60):
        _submit(db, rng.choice("abc"), priority=rng.choice([2, 5, 5, 8]))
    with db.transaction() as session:
        queued = list(session.scalars(select(Job).where(Job.state == JobState.QUEUED)))
        positions = queue_positions(session, queued)
    assert sorted(positions.values()) == list(range(60))
    started: list[str] = []
    running: list[Lease] = []
    while (lease := _claim(db)) is not None:
        started.append(lease.job_id)
        running.append(lease)
        if len(running) > 3:  # jobs end as others start: positions do not depend on it
            _finish(db, running.pop(rng.randrange(len(running))))
    assert len(started) == 60
    assert [positions[j] for j in started] == list(range(60))


def test_a_late_tenant_is_placed_by_queue_position_too(db) -> None:  # type: ignore[no-untyped-def]
    _submit(db, "a", 20)
    for _ in range(5):
        assert _claim(db) is not None
    (late,) = _submit(db, "b")
    with db.transaction() as session:
        job = session.get(Job, late)
        assert job is not None
        assert queue_positions(session, [job]) == {late: 0}


def test_the_running_cap_holds_under_concurrent_claims(db) -> None:  # type: ignore[no-untyped-def]
    cap = 2
    _set_tenant(db, "a", max_running=cap)
    _submit(db, "a", 24)
    _submit(db, "b", 6)
    samples: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    a_id = db.tenants["a"]

    def running_of_a() -> int:
        with db.transaction() as session:
            return int(
                session.scalar(
                    select(func.count())
                    .select_from(Job)
                    .where(Job.tenant_id == a_id, Job.state == JobState.RUNNING)
                )
                or 0
            )

    def sampler() -> None:
        while not stop.is_set():
            samples.append(running_of_a())
            time.sleep(0.005)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            idle = 0
            while idle < 20:
                lease = _claim(db)
                if lease is None:
                    idle += 1
                    time.sleep(0.01)
                    continue
                idle = 0
                samples.append(running_of_a())
                time.sleep(rng.random() * 0.02)  # the job "runs"
                _finish(db, lease)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    watcher = threading.Thread(target=sampler)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert not errors, errors
    with db.transaction() as session:
        states = session.scalars(select(Job.state)).all()
    assert set(states) == {JobState.SUCCEEDED} and len(states) == 30
    assert max(samples) == cap, max(samples)  # reached, never exceeded


def _burn(db, tenant: str, seconds: float) -> None:  # type: ignore[no-untyped-def]
    """A finished job of `tenant` that ran `seconds` just now."""
    (job_id,) = _submit(db, tenant)
    now = utcnow()
    with db.transaction() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                state=JobState.SUCCEEDED,
                started_at=now - timedelta(seconds=seconds),
                finished_at=now,
            )
        )


def test_a_tenant_over_its_gpu_budget_is_held_or_refused(db) -> None:  # type: ignore[no-untyped-def]
    _set_tenant(db, "a", gpu_seconds_budget=5.0, budget_period_s=86400, over_quota="hold")
    _burn(db, "a", 10)
    with db.transaction() as session:
        check_submission(session, db.tenants["a"])  # hold: accepted
    (held,) = _submit(db, "a")
    assert _claim(db) is None  # ... but not started while over budget
    _set_tenant(db, "a", gpu_seconds_budget=60.0)
    lease = _claim(db)
    assert lease is not None and lease.job_id == held
    _set_tenant(db, "a", gpu_seconds_budget=5.0, over_quota="reject")
    with db.transaction() as session, pytest.raises(QuotaExceededError) as refused:
        check_submission(session, db.tenants["a"])
    body = refused.value.problem()
    assert body["status"] == 429 and body["limit"] == "gpu_seconds_budget"
    assert body["allowed"] == 5.0 and body["current"] >= 10


def test_max_queued_refuses_whatever_the_policy(db) -> None:  # type: ignore[no-untyped-def]
    _set_tenant(db, "b", max_queued=3, over_quota="hold")
    _submit(db, "b", 3)
    with db.transaction() as session, pytest.raises(QuotaExceededError) as refused:
        check_submission(session, db.tenants["b"])
    body = refused.value.problem()
    assert (body["limit"], body["current"], body["allowed"]) == ("max_queued", 3, 3)
    with db.transaction() as session:
        check_submission(session, db.tenants["a"])  # other tenants are not limited


def test_a_job_in_backoff_is_not_claimed_until_due(db) -> None:  # type: ignore[no-untyped-def]
    (job_id,) = _submit(db, "a")
    with db.transaction() as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(not_before=utcnow() + timedelta(seconds=30))
        )
    assert _claim(db) is None
    with db.transaction() as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(not_before=utcnow() - timedelta(seconds=1))
        )
    lease = _claim(db)
    assert lease is not None and lease.job_id == job_id
