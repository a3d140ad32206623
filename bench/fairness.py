"""Usage-based fair share against start-based fair share and plain FIFO on the same workload,
and the wait of an interactive job behind a training backlog with and without preemption,
with the real claim SQL.

    .venv/bin/python bench/fairness.py [--slots 4] [--only sqlite|postgres]

Three tenants with different backlogs share `--slots` GPU slots: `big` queues 240 jobs of 1 s
at time 0, `mid` queues 40 jobs of 2 s at time 0, and `solo` submits a single 0.5 s job at
time 10 s. Time is simulated (a job "runs" for its duration in a discrete-event loop, and the
claim and the finish are given the simulated time), so the figures do not depend on the
machine's load; every start is a real claim in SQL: `core.fairness.claim_next` under
`fair_share=usage` (GPU-seconds, decayed) and `fair_share=starts` (start-time fair queuing),
against FIFO (the oldest queued job, by `core.leases.claim_job` on it). Prints, per 20 s window,
each tenant's share of slot time, the worst wait of the single-job tenant (seconds, and jobs
started before it after it arrived), and each tenant's mean wait.

Then preemption: tenant `lab` fills every slot with batch training jobs of 600 s (a checkpoint
every 60 s of training) and queues as many again; at 100 s an `interactive` generation job of
2 s arrives. Without preemption it waits for the first training job to end; with it, the
periodic round (`core.preemption.preempt_for_waiting`, each simulated second) asks a trainer to
stop at its next checkpoint once the job has waited `preempt_after_s` (10 s here), and the
trainer resumes later from that checkpoint (`requeue_preempted`). Prints the interactive job's
wait and the training work lost (none: it stops at a checkpoint).

Last, what one claim costs (wall time, not simulated) as the running jobs grow: 20 tenants with
100 queued jobs each, and 0, then 3,056 running jobs (claimed on another queue); the claim by
usage, by starts and FIFO, each rolled back, p50 / p99 over `--claims` claims. (`--claims-only`
runs this part alone, which also runs against an older checkout to compare.) Writes
bench/results/fairness-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import heapq
import math
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402

import migrations  # noqa: E402
from bench.common import scratch_postgres, write_result  # noqa: E402
from core.catalog import ensure_builtins, resolve_model  # noqa: E402
from core.db import Database  # noqa: E402
from core.fairness import claim_next  # noqa: E402
from core.jobs import NewJob, create_job  # noqa: E402
from core.keys import get_or_create_tenant  # noqa: E402
from core.leases import Lease, claim_job, finish_job  # noqa: E402
from core.preemption import preempt_for_waiting, requeue_preempted  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.states import JobKind, JobState  # noqa: E402
from core.tables import Job, utcnow  # noqa: E402

PG = os.environ.get("GENQ_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
# tenant: (jobs, seconds each, arrival time)
WORKLOAD = {"big": (240, 1.0, 0.0), "mid": (40, 2.0, 0.0), "solo": (1, 0.5, 10.0)}
WINDOW_S = 20.0
POLICIES = ("fifo", "starts", "usage")
# The preemption scenario (seconds of simulated time).
TRAIN_S, CHECKPOINT_S, INTERACTIVE_AT, INTERACTIVE_S = 600.0, 60.0, 100.0, 2.0
PREEMPT_AFTER_S, GRACE_S = 10.0, 30.0
# The claim's cost: tenants, queued jobs each, and the running jobs it is measured with (the
# last is what bench/scale.py's seed has).
COST_TENANTS, COST_QUEUED_EACH, COST_RUNNING = 20, 100, (0, 3056)


def _fifo(session: Any, queue: str, now: datetime) -> Lease | None:
    job_id = session.scalar(
        sa.select(Job.id)
        .where(Job.state == JobState.QUEUED, Job.queue == queue)
        .order_by(Job.priority.desc(), Job.created_at, Job.id)
        .limit(1)
    )
    return claim_job(session, job_id, lease_ttl_s=86400, now=now) if job_id else None


def _claim(session: Any, policy: str, queue: str, now: datetime) -> Lease | None:
    if policy == "fifo":
        return _fifo(session, queue, now)
    return claim_next(session, queue, lease_ttl_s=86400, now=now)


def simulate(database: Database, policy: str, slots: int) -> dict[str, Any]:
    with database.transaction() as session:
        ensure_builtins(session)
        tenants = {name: get_or_create_tenant(session, name).id for name in WORKLOAD}
        echo = resolve_model(session, tenants["big"], "echo").id
    names = {v: k for k, v in tenants.items()}
    duration = {name: spec[1] for name, spec in WORKLOAD.items()}
    arrivals = sorted((spec[2], name) for name, spec in WORKLOAD.items())
    submitted_at: dict[str, float] = {}
    starts: list[tuple[float, str, str]] = []  # (time, tenant, job id)
    running: list[tuple[float, str, Lease]] = []  # heap of (end, job, lease)
    now, free = 0.0, slots
    t0 = utcnow()

    def at(t: float) -> datetime:
        return t0 + timedelta(seconds=t)

    def submit(name: str, at: float) -> None:
        with database.transaction() as session:
            for _ in range(WORKLOAD[name][0]):
                job, _ = create_job(
                    session,
                    NewJob(
                        tenant_id=tenants[name],
                        kind=JobKind.GENERATE,
                        family="echo",
                        queue="generate",
                        params={},
                        model_id=echo,
                    ),
                )
                submitted_at[job.id] = at

    while True:
        while arrivals and arrivals[0][0] <= now:
            submit(arrivals.pop(0)[1], now)
        while free > 0:
            with database.transaction() as session:
                lease = _claim(session, policy, "generate", at(now))
                tenant_id = (
                    session.scalar(sa.select(Job.tenant_id).where(Job.id == lease.job_id))
                    if lease
                    else None
                )
            if lease is None or tenant_id is None:
                break
            name = names[tenant_id]
            starts.append((now, name, lease.job_id))
            heapq.heappush(running, (now + duration[name], lease.job_id, lease))
            free -= 1
        next_arrival = arrivals[0][0] if arrivals else None
        if not running and next_arrival is None:
            break
        if running and (next_arrival is None or running[0][0] <= next_arrival):
            now, _, lease = heapq.heappop(running)
            with database.transaction() as session:
                finish_job(session, lease, JobState.SUCCEEDED, now=at(now))
            free += 1
        else:
            assert next_arrival is not None
            now = next_arrival
    return report(starts, submitted_at, duration)


def report(
    starts: list[tuple[float, str, str]], submitted_at: dict[str, float], duration: dict[str, float]
) -> dict[str, Any]:
    end = max(t + duration[n] for t, n, _ in starts)
    windows: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for t, name, _ in starts:
        a, b = t, t + duration[name]
        while a < b:  # spread the job's slot time over the windows it spans
            w = int(a // WINDOW_S)
            cut = min(b, (w + 1) * WINDOW_S)
            windows[w][name] += cut - a
            a = cut
    shares = []
    for w in sorted(windows):
        total = sum(windows[w].values())
        shares.append(
            {
                "window": f"{w * WINDOW_S:.0f}-{(w + 1) * WINDOW_S:.0f}s",
                **{n: round(windows[w].get(n, 0.0) / total, 3) for n in WORKLOAD},
            }
        )
    waits: dict[str, list[float]] = defaultdict(list)
    for t, name, job_id in starts:
        waits[name].append(t - submitted_at[job_id])
    solo_start = next(t for t, n, _ in starts if n == "solo")
    solo_arrival = WORKLOAD["solo"][2]
    jumped = sum(1 for t, n, _ in starts if n != "solo" and solo_arrival <= t <= solo_start)
    return {
        "makespan_s": round(end, 2),
        "shares": shares,
        "solo_wait_s": round(max(waits["solo"]), 3),
        "solo_jobs_started_before_it": jumped,
        "mean_wait_s": {n: round(sum(w) / len(w), 2) for n, w in waits.items()},
    }


def simulate_preemption(database: Database, slots: int, preempt: bool) -> dict[str, Any]:
    """The interactive job behind a training backlog (module docstring), stepping simulated
    time by one second; ends and stops are recorded at their exact times."""
    with database.transaction() as session:
        ensure_builtins(session)
        lab = get_or_create_tenant(session, "lab").id
        user = get_or_create_tenant(session, "user").id
        echo = resolve_model(session, user, "echo").id
        for _ in range(2 * slots):
            create_job(
                session,
                NewJob(
                    tenant_id=lab,
                    kind=JobKind.TRAIN,
                    family="charlm",
                    queue="train",
                    params={},
                    priority=2,
                ),
            )
    t0 = utcnow()

    def at(t: float) -> datetime:
        return t0 + timedelta(seconds=t)

    saved: dict[str, float] = defaultdict(float)  # training seconds kept in a checkpoint
    running: dict[str, dict[str, Any]] = {}
    interactive: str | None = None
    started_at: float | None = None
    lost_s, preemptions, now = 0.0, 0, 0.0
    training_done: list[float] = []
    while now == 0.0 or running or started_at is None:
        if interactive is None and now >= INTERACTIVE_AT:
            with database.transaction() as session:
                job, _ = create_job(
                    session,
                    NewJob(
                        tenant_id=user,
                        kind=JobKind.GENERATE,
                        family="echo",
                        queue="generate",
                        params={},
                        model_id=echo,
                        priority=8,
                    ),
                )
                job.created_at = at(INTERACTIVE_AT)
                interactive = job.id
        for job_id, run in sorted(running.items(), key=lambda kv: kv[1]["end"]):
            if run["end"] > now:
                continue
            with database.transaction() as session:
                if run.get("stop") is not None:  # preempted: back to the queue
                    requeue_preempted(
                        session, run["lease"], hold_s=PREEMPT_AFTER_S, now=at(run["end"])
                    )
                    lost_s += run["done"] - run["stop"]
                    saved[job_id] = run["stop"]
                    preemptions += 1
                else:
                    finish_job(session, run["lease"], JobState.SUCCEEDED, now=at(run["end"]))
                    if job_id != interactive:
                        training_done.append(run["end"])
            del running[job_id]
        if preempt and interactive is not None and started_at is None:
            with database.transaction() as session:
                made = preempt_for_waiting(
                    session,
                    preempt_after_s=PREEMPT_AFTER_S,
                    grace_s=GRACE_S,
                    max_preemptions=3,
                    now=at(now),
                )
            for p in made:
                run = running[p.job_id]
                work = saved[p.job_id] + now - run["start"]
                checkpoint = math.ceil(work / CHECKPOINT_S) * CHECKPOINT_S
                if checkpoint - work > GRACE_S:  # killed at the grace's end
                    work += GRACE_S
                    checkpoint = math.floor(work / CHECKPOINT_S) * CHECKPOINT_S
                else:
                    work = checkpoint
                run.update(
                    stop=checkpoint,
                    done=work,
                    end=now + (work - (saved[p.job_id] + now - run["start"])),
                )
        while len(running) < slots:
            with database.transaction() as session:
                lease = claim_next(session, "generate", lease_ttl_s=86400, now=at(now))
                lease = lease or claim_next(session, "train", lease_ttl_s=86400, now=at(now))
            if lease is None:
                break
            if lease.job_id == interactive:
                started_at = now
                end = now + INTERACTIVE_S
            else:
                end = now + TRAIN_S - saved[lease.job_id]
            running[lease.job_id] = {"lease": lease, "start": now, "end": end}
        now += 1.0
    return {
        "interactive_wait_s": round((started_at or 0.0) - INTERACTIVE_AT, 1),
        "preemptions": preemptions,
        "training_lost_s": round(lost_s, 1),
        "training_makespan_s": max(training_done),
    }


def _add_jobs(database: Database, tenants: list[str], queue: str, n_each: int) -> list[str]:
    ids = []
    with database.transaction() as session:
        echo = resolve_model(session, tenants[0], "echo").id
        for _ in range(n_each):
            for tenant_id in tenants:
                job, _ = create_job(
                    session,
                    NewJob(
                        tenant_id=tenant_id,
                        kind=JobKind.GENERATE,
                        family="echo",
                        queue=queue,
                        params={},
                        model_id=echo,
                        priority=5,
                    ),
                )
                ids.append(job.id)
    return ids


def _timed_claims(database: Database, policy: str, n: int) -> dict[str, float]:
    times = []
    for i in range(n + 3):
        with database.sessions() as session:
            session.begin()
            started = time.perf_counter()
            if policy == "starts":
                session.info["fair_share"] = "starts"
            assert _claim(session, policy, "generate", utcnow()) is not None
            elapsed = time.perf_counter() - started
            session.rollback()
        if i >= 3:
            times.append(elapsed * 1000)
    times.sort()
    return {
        "p50_ms": round(statistics.median(times), 2),
        "p99_ms": round(times[min(len(times) - 1, round(0.99 * (len(times) - 1)))], 2),
    }


def claim_cost(database: Database, n: int) -> dict[str, Any]:
    """The claim's wall time at each count of running jobs (module docstring)."""
    with database.transaction() as session:
        ensure_builtins(session)
        tenants = [get_or_create_tenant(session, f"t{i:02d}").id for i in range(COST_TENANTS)]
    _add_jobs(database, tenants, "generate", COST_QUEUED_EACH)
    out: dict[str, Any] = {}
    running = 0
    for target in COST_RUNNING:
        more = target - running
        if more > 0:
            ids = _add_jobs(database, tenants, "train", -(-more // len(tenants)))[:more]
            with database.transaction() as session:
                for job_id in ids:
                    assert claim_job(session, job_id, lease_ttl_s=86400) is not None
            running = target
        out[str(target)] = {p: _timed_claims(database, p, n) for p in ("usage", "starts", "fifo")}
    return out


@contextmanager
def _database(backend: str, tmp: Path, label: str, policy: str) -> Iterator[Database]:
    """A fresh migrated database for one run, dropped (PostgreSQL) after it."""
    with ExitStack() as cleanup:
        if backend == "sqlite":
            url = f"sqlite:///{tmp / f'{label}.db'}"
        else:
            url = cleanup.enter_context(scratch_postgres(PG, f"genq_bench_fair_{label}"))
        fair_share = "starts" if policy == "starts" else "usage"
        settings = Settings(var_dir=tmp / "var", database_url=url, fair_share=fair_share)
        migrations.upgrade(settings)
        database = Database(settings)
        try:
            yield database
        finally:
            database.dispose()


def run_claim_cost(backend: str, tmp: Path, n: int) -> dict[str, Any]:
    with _database(backend, tmp, "claim_cost", "usage") as database:
        return claim_cost(database, n)


def print_claim_cost(cost: dict[str, Any]) -> None:
    print(f"-- one claim, {COST_TENANTS} tenants x {COST_QUEUED_EACH} queued (p50 / p99 ms)")
    for running, by_policy in cost.items():
        row = "   ".join(f"{p} {r['p50_ms']:.1f} / {r['p99_ms']:.1f}" for p, r in by_policy.items())
        print(f"   {int(running):>5} running:  {row}")


def run_backend(backend: str, slots: int, tmp: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for policy in POLICIES:
        with _database(backend, tmp, policy, policy) as database:
            results[policy] = simulate(database, policy, slots)
    for preempt in (False, True):
        label = "preemption" if preempt else "no_preemption"
        with _database(backend, tmp, label, "usage") as database:
            results[label] = simulate_preemption(database, slots, preempt)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--only", choices=["sqlite", "postgres"])
    parser.add_argument("--claims", type=int, default=200)
    parser.add_argument("--claims-only", action="store_true")
    args = parser.parse_args()
    backends = [args.only] if args.only else ["sqlite", "postgres"]
    out: dict[str, Any] = {"slots": args.slots, "workload": WORKLOAD, "backends": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            (Path(tmp) / backend).mkdir(parents=True, exist_ok=True)
            cost = run_claim_cost(backend, Path(tmp) / backend, args.claims)
            if args.claims_only:
                out["backends"][backend] = {"claim_cost": cost}
                print(f"== {backend}")
                print_claim_cost(cost)
                continue
            res = run_backend(backend, args.slots, Path(tmp) / backend)
            res["claim_cost"] = cost
            out["backends"][backend] = res
            print(f"== {backend}: {args.slots} slots; share of slot time per {WINDOW_S:.0f} s")
            for policy in POLICIES:
                r = res[policy]
                print(f"-- {policy}: makespan {r['makespan_s']} s")
                print("   window      " + "  ".join(f"{n:>5}" for n in WORKLOAD))
                for s in r["shares"][:8]:
                    row = "  ".join(f"{s[n]:5.2f}" for n in WORKLOAD)
                    print(f"   {s['window']:<11} {row}")
                print(
                    f"   solo tenant: waited {r['solo_wait_s']} s, "
                    f"{r['solo_jobs_started_before_it']} jobs started before it; "
                    f"mean waits {r['mean_wait_s']}"
                )
            for label in ("no_preemption", "preemption"):
                r = res[label]
                print(
                    f"-- interactive job behind {2 * args.slots} training jobs, {label}: waited "
                    f"{r['interactive_wait_s']} s; {r['preemptions']} preemptions, "
                    f"{r['training_lost_s']} s of training lost, training done at "
                    f"{r['training_makespan_s']} s"
                )
            print_claim_cost(cost)
    write_result("fairness", out)


if __name__ == "__main__":
    main()
