"""The usage-based fair share on real SQLite and PostgreSQL (core/usage.py, core/fairness.py):
tenants of long and of short jobs get equal GPU time, running jobs count as they run, old usage
decays and its tenant returns to its share, and weights scale the shares; the running totals the
claim reads stay equal to the running rows through every way an attempt ends. Time is a clock of
the test's own (the claim and the finish take `now`), so no result depends on the machine's
speed; every start is a real claim in SQL."""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from core.db import Database
from core.fairness import claim_next
from core.jobs import cancel_job, create_job
from core.leases import Lease, finish_job, release_job
from core.preemption import requeue_preempted
from core.recovery import reap_expired
from core.settings import Settings
from core.states import JobState
from core.tables import Job, Tenant, TenantUsage, utcnow
from core.usage import attempt_cost, recount_running, usage_of
from tests.support.jobs import echo_job, tenants_database

HALF_LIFE_S = 600.0


def _database(database_url: str, tmp_path: Path, policy: str) -> Database:
    settings = Settings(
        var_dir=tmp_path / "var",
        database_url=database_url,
        fair_share=policy,
        fair_share_half_life_s=HALF_LIFE_S,
    )
    return tenants_database(settings, "a", "b")


@pytest.fixture
def db(database_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    database = _database(database_url, tmp_path, "usage")
    yield database
    database.dispose()


def _submit(db, tenant: str, n: int, duration_s: float) -> None:  # type: ignore[no-untyped-def]
    with db.transaction() as session:
        for _ in range(n):
            new = echo_job(db.tenants[tenant], db.echo_id, params={"delay_s": duration_s})
            create_job(session, new)


class Sim:
    """A discrete-event run of `slots` slots on the real claim: each job runs for its
    params' delay_s of simulated time. Records (tenant, start, end) of every run."""

    def __init__(self, db, slots: int, t0: datetime) -> None:  # type: ignore[no-untyped-def]
        self.db, self.slots, self.t0 = db, slots, t0
        self.now = 0.0
        self.running: list[tuple[float, str, Lease]] = []
        self.runs: list[tuple[str, float, float]] = []
        self.names = {v: k for k, v in db.tenants.items()}

    def at(self, t: float) -> datetime:
        return self.t0 + timedelta(seconds=t)

    def fill(self) -> None:
        while len(self.running) < self.slots:
            with self.db.transaction() as session:
                lease = claim_next(session, "generate", lease_ttl_s=3600, now=self.at(self.now))
                if lease is None:
                    return
                job = session.get(Job, lease.job_id)
                assert job is not None
                end = self.now + float(job.params["delay_s"])
                name = self.names[job.tenant_id]
            heapq.heappush(self.running, (end, lease.job_id, lease))
            self.runs.append((name, self.now, end))

    def run_until(self, t_end: float) -> None:
        self.fill()
        while self.running and self.running[0][0] <= t_end:
            self.now, _, lease = heapq.heappop(self.running)
            with self.db.transaction() as session:
                finish_job(session, lease, JobState.SUCCEEDED, now=self.at(self.now))
            self.fill()
        self.now = t_end

    def drain(self) -> None:
        """Let the running jobs end, starting no more."""
        while self.running:
            self.now, _, lease = heapq.heappop(self.running)
            with self.db.transaction() as session:
                finish_job(session, lease, JobState.SUCCEEDED, now=self.at(self.now))

    def shares(self, start: float, end: float) -> dict[str, float]:
        used: dict[str, float] = defaultdict(float)
        for name, a, b in self.runs:
            used[name] += max(0.0, min(b, end) - max(a, start))
        total = sum(used.values())
        return {name: used[name] / total for name in self.names.values()}


@pytest.mark.parametrize("policy", ["usage", "starts"])
def test_long_and_short_jobs_get_equal_gpu_time(
    database_url: str, tmp_path: Path, policy: str
) -> None:
    db = _database(database_url, tmp_path, policy)
    try:
        _submit(db, "a", 60, 4.0)  # long jobs
        _submit(db, "b", 120, 1.0)  # short jobs
        sim = Sim(db, slots=2, t0=utcnow())
        sim.run_until(100.0)
        with db.read() as session:  # both tenants had work queued the whole time
            queued = set(session.scalars(select(Job.tenant_id).where(Job.state == "queued")))
        assert {db.tenants["a"], db.tenants["b"]} <= queued
        shares = sim.shares(0.0, 100.0)
    finally:
        db.dispose()
    if policy == "usage":  # GPU time within 10% of equal
        assert abs(shares["a"] - 0.5) <= 0.05, shares
    else:  # equal starts: the tenant of 4 s jobs takes about 4/5 of the time
        assert shares["a"] > 0.7, shares


def test_running_jobs_are_charged_as_they_run(db) -> None:  # type: ignore[no-untyped-def]
    t0 = utcnow()
    _submit(db, "a", 1, 1000.0)
    sim = Sim(db, slots=2, t0=t0)
    sim.run_until(0.0)  # a's long job starts; nothing has ended
    _submit(db, "a", 2, 1.0)
    _submit(db, "b", 2, 1.0)
    with db.read() as session:
        usage = usage_of(session, list(db.tenants.values()), sim.at(50.0))
    a, b = usage[db.tenants["a"]], usage[db.tenants["b"]]
    # 50 s of one slot so far (a running attempt is decayed once it ends).
    assert math.isclose(a.running_gpu_seconds, 50.0, abs_tol=0.01), a
    assert b.gpu_seconds == 0.0
    # a's queued jobs are older, but a is 50 GPU-seconds into its long job: b goes first.
    sim.now = 50.0
    sim.fill()
    assert [name for name, _, _ in sim.runs] == ["a", "b"]
    # Once it ends, its run is charged decayed: 50 s with a 600 s half-life is 48.6 now.
    sim.drain()
    with db.read() as session:
        usage = usage_of(session, [db.tenants["a"]], sim.at(1000.0))
    expected = attempt_cost(1.0, t0, sim.at(1000.0), sim.at(1000.0), HALF_LIFE_S)
    assert math.isclose(usage[db.tenants["a"]].gpu_seconds, expected)


def test_a_tenant_whose_usage_decayed_returns_to_its_share(db) -> None:  # type: ignore[no-untyped-def]
    t0 = utcnow()
    _submit(db, "a", 1, 2000.0)
    sim = Sim(db, slots=1, t0=t0)
    sim.run_until(2000.0)  # a used one slot for 2000 s, alone
    _submit(db, "a", 200, 1.0)
    _submit(db, "b", 200, 1.0)
    sim.run_until(2060.0)
    assert sim.shares(2000.0, 2060.0)["a"] == 0.0  # a is far over its share: b runs
    # The cluster stops for ten half-lives; by then both usages have faded to near nothing,
    # and the two tenants share again.
    sim.drain()
    start = sim.now = sim.now + 10 * HALF_LIFE_S
    sim.run_until(start + 80.0)
    assert abs(sim.shares(start, start + 80.0)["a"] - 0.5) <= 0.05


def test_weights_scale_the_shares_of_gpu_time(db) -> None:  # type: ignore[no-untyped-def]
    with db.transaction() as session:
        session.execute(update(Tenant).where(Tenant.id == db.tenants["a"]).values(weight=2))
    _submit(db, "a", 100, 2.0)
    _submit(db, "b", 100, 1.0)
    sim = Sim(db, slots=3, t0=utcnow())
    sim.run_until(90.0)
    assert abs(sim.shares(0.0, 90.0)["a"] - 2 / 3) <= 0.05


def _running_from_rows(db, at: datetime) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """What the running attempts have cost by `at`, read from the job rows themselves."""
    out = dict.fromkeys(db.tenants.values(), 0.0)
    with db.read() as session:
        for job in session.scalars(select(Job).where(Job.state.in_(["running", "canceling"]))):
            assert job.started_at is not None
            rate = job.num_gpus or 1.0
            out[job.tenant_id] += rate * (at - job.started_at).total_seconds()
    return out


def test_the_running_totals_follow_every_start_and_end(db) -> None:  # type: ignore[no-untyped-def]
    """The claim reads each tenant's running attempts from totals in its usage row (not the
    running rows): after claims at different times and GPU shares, and after each way an
    attempt ends (finished, released for a retry, preempted, canceled, reaped), they equal
    what the rows say; `recount_running` rebuilds the same totals from the rows."""
    t0 = utcnow()
    _submit(db, "a", 4, 1.0)
    _submit(db, "b", 3, 1.0)
    with db.transaction() as session:
        gpus = [0.25, 0.0, 1.0, 0.5, 0.0, 2.0, 0.25]
        for job, num_gpus in zip(session.scalars(select(Job)), gpus, strict=True):
            job.num_gpus = num_gpus
    leases = []
    for i in range(7):
        with db.transaction() as session:
            lease = claim_next(session, "generate", lease_ttl_s=60, now=t0 + timedelta(seconds=i))
            assert lease is not None
            leases.append(lease)

    def check(at: datetime) -> None:
        expected = _running_from_rows(db, at)
        with db.read() as session:
            usage = usage_of(session, list(db.tenants.values()), at)
        for tenant_id, cost in expected.items():
            assert math.isclose(usage[tenant_id].running_gpu_seconds, cost, abs_tol=1e-3)

    check(t0 + timedelta(seconds=30))
    ends = [
        lambda s, lease: finish_job(s, lease, JobState.SUCCEEDED, now=t0 + timedelta(seconds=9)),
        lambda s, lease: release_job(s, lease, reason="transient", backoff_s=0),
        lambda s, lease: requeue_preempted(s, lease, hold_s=0),
    ]
    for lease, end in zip(leases, ends, strict=False):
        with db.transaction() as session:
            end(session, lease)
        check(t0 + timedelta(seconds=40))
    with db.transaction() as session:  # canceling still runs; canceled has ended
        job = session.get(Job, leases[3].job_id)
        assert job is not None and cancel_job(session, job) == JobState.CANCELING
    check(t0 + timedelta(seconds=50))
    with db.transaction() as session:
        finish_job(session, leases[3], JobState.CANCELED)
    with db.transaction() as session:  # the lease of the next one runs out: reaped
        job = session.get(Job, leases[4].job_id)
        assert job is not None
        job.lease_expires_at = utcnow() - timedelta(seconds=1)
        assert [r.job_id for r in reap_expired(session)] == [leases[4].job_id]
    check(utcnow() + timedelta(seconds=60))
    # Rebuilt from the rows, the totals are the same.
    with db.read() as session:
        kept = usage_of(session, list(db.tenants.values()), t0 + timedelta(seconds=500))
    with db.transaction() as session:
        assert recount_running(session) == 2
    with db.read() as session:
        rebuilt = usage_of(session, list(db.tenants.values()), t0 + timedelta(seconds=500))
    for tenant_id in db.tenants.values():
        assert math.isclose(
            kept[tenant_id].running_gpu_seconds,
            rebuilt[tenant_id].running_gpu_seconds,
            abs_tol=1e-3,
        )
        assert kept[tenant_id].running_gpu_seconds > 0
    # Once none runs, the totals are exactly zero (no rounding left over).
    with db.transaction() as session:
        for lease in leases[5:]:
            finish_job(session, lease, JobState.SUCCEEDED)
    with db.read() as session:
        usage = usage_of(session, list(db.tenants.values()), t0 + timedelta(days=1))
    assert all(u.running_gpu_seconds == 0.0 for u in usage.values())


def test_a_start_refreshes_the_usage_row_the_transaction_holds(db) -> None:  # type: ignore[no-untyped-def]
    """A claim adds its start to the tenant's running totals in one UPDATE, without reading
    the row: a copy of the row that the transaction already holds is refreshed, so an attempt
    that ends later in the same transaction subtracts from the new totals and the start is
    not lost."""
    t0 = utcnow()
    _submit(db, "a", 2, 1.0)
    with db.transaction() as session:
        first = claim_next(session, "generate", lease_ttl_s=60, now=t0)
        assert first is not None
    with db.transaction() as session:
        held = session.scalars(select(TenantUsage)).all()  # the copy the session keeps
        assert [row.running_attempts for row in held] == [1]
        second = claim_next(session, "generate", lease_ttl_s=60, now=t0 + timedelta(seconds=1))
        assert second is not None
        assert held[0].running_attempts == 2
        finish_job(session, first, JobState.SUCCEEDED, now=t0 + timedelta(seconds=2))
    with db.read() as session:
        row = session.scalar(select(TenantUsage))
        assert row is not None and row.running_attempts == 1
        usage = usage_of(session, list(db.tenants.values()), t0 + timedelta(seconds=30))
    expected = _running_from_rows(db, t0 + timedelta(seconds=30))
    for tenant_id, cost in expected.items():
        assert math.isclose(usage[tenant_id].running_gpu_seconds, cost, abs_tol=1e-3)


def test_the_claim_reads_the_limits_of_the_tenants_it_weighs(db) -> None:  # type: ignore[no-untyped-def]
    """The usage policy's claim reads each tenant's limits with its queued work and usage (one
    statement): the limits it reports are the tenant rows', a tenant at its running cap is
    passed over, and a tenant with usage yields to one without."""
    a, b = db.tenants["a"], db.tenants["b"]
    with db.transaction() as session:
        session.execute(update(Tenant).where(Tenant.id == a).values(weight=3, max_running=1))
    _submit(db, "a", 2, 10.0)
    now = utcnow()
    with db.transaction() as session:
        seen: dict = {}
        first = claim_next(session, "generate", lease_ttl_s=60, now=now, limits_seen=seen)
        assert first is not None and session.get(Job, first.job_id).tenant_id == a
        assert seen[a].weight == 3 and seen[a].max_running == 1
        assert seen[a].gpu_seconds_budget is None and seen[a].over_quota == "reject"
    _submit(db, "b", 1, 10.0)
    later = now + timedelta(seconds=5)
    with db.transaction() as session:  # a is at its cap, with 5 s of usage: b goes
        seen = {}
        second = claim_next(session, "generate", lease_ttl_s=60, now=later, limits_seen=seen)
        assert second is not None and session.get(Job, second.job_id).tenant_id == b
        assert set(seen) == {a, b} and seen[b].weight == 1 and seen[b].max_running is None
    with db.transaction() as session:  # still at its cap: nothing starts
        assert claim_next(session, "generate", lease_ttl_s=60, now=later) is None
    with db.transaction() as session:
        finish_job(session, first, JobState.SUCCEEDED, now=later)
    with db.transaction() as session:
        third = claim_next(session, "generate", lease_ttl_s=60, now=later)
        assert third is not None and session.get(Job, third.job_id).tenant_id == a
