"""Fair share against plain FIFO on the same workload, with the real claim SQL.

    .venv/bin/python bench/fairness.py [--slots 4] [--only sqlite|postgres]

Three tenants with different backlogs share `--slots` GPU slots: `big` queues 240 jobs of 1 s
at time 0, `mid` queues 40 jobs of 2 s at time 0, and `solo` submits a single 0.5 s job at
time 10 s. Time is simulated (a job "runs" for its duration in a discrete-event loop), so the
figures do not depend on the machine's load; every start is a real claim in SQL:
`core.fairness.claim_next` (priority, weighted fair share, age) against FIFO (the oldest queued
job, by `core.jobs.claim_job` on it). Prints, per 20 s window, each tenant's share of slot time,
the worst wait of the single-job tenant (seconds, and jobs started before it after it
arrived), and each tenant's mean wait; writes bench/results/fairness-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import sys
import tempfile
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402

import migrations  # noqa: E402
from core.catalog import ensure_builtins, resolve_model  # noqa: E402
from core.db import Database  # noqa: E402
from core.fairness import claim_next  # noqa: E402
from core.jobs import Lease, NewJob, claim_job, create_job, finish_job  # noqa: E402
from core.keys import get_or_create_tenant  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.states import JobKind, JobState  # noqa: E402
from core.tables import Job  # noqa: E402

PG = os.environ.get("GENQ_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
# tenant: (jobs, seconds each, arrival time)
WORKLOAD = {"big": (240, 1.0, 0.0), "mid": (40, 2.0, 0.0), "solo": (1, 0.5, 10.0)}
WINDOW_S = 20.0


def _fifo(session: Any, queue: str) -> Lease | None:
    job_id = session.scalar(
        sa.select(Job.id)
        .where(Job.state == JobState.QUEUED, Job.queue == queue)
        .order_by(Job.priority.desc(), Job.created_at, Job.id)
        .limit(1)
    )
    return claim_job(session, job_id, lease_ttl_s=600) if job_id else None


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
                if policy == "fair":
                    lease = claim_next(session, "generate", lease_ttl_s=600)
                else:
                    lease = _fifo(session, "generate")
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
                finish_job(session, lease, JobState.SUCCEEDED)
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


def run_backend(backend: str, slots: int, tmp: Path) -> dict[str, Any]:
    results = {}
    for policy in ("fifo", "fair"):
        if backend == "sqlite":
            url = f"sqlite:///{tmp / f'{policy}.db'}"
            cleanup = None
        else:
            name = f"genq_bench_fair_{policy}_{os.getpid()}"
            admin = sa.create_engine(
                PG.replace("postgresql://", "postgresql+psycopg://", 1),
                isolation_level="AUTOCOMMIT",
            )
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
            url = str(sa.engine.make_url(PG).set(database=name).render_as_string(False))
            cleanup = (admin, name)
        settings = Settings(var_dir=tmp / "var", database_url=url)
        migrations.upgrade(settings)
        database = Database(settings)
        try:
            results[policy] = simulate(database, policy, slots)
        finally:
            database.dispose()
            if cleanup is not None:
                admin, name = cleanup
                with admin.connect() as conn:
                    conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                admin.dispose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--only", choices=["sqlite", "postgres"])
    args = parser.parse_args()
    backends = [args.only] if args.only else ["sqlite", "postgres"]
    out: dict[str, Any] = {"slots": args.slots, "workload": WORKLOAD, "backends": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            res = run_backend(backend, args.slots, Path(tmp) / backend)
            out["backends"][backend] = res
            print(f"== {backend}: {args.slots} slots; share of slot time per {WINDOW_S:.0f} s")
            for policy in ("fifo", "fair"):
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
            fifo, fair = res["fifo"], res["fair"]
            ratio = fifo["solo_wait_s"] / fair["solo_wait_s"] if fair["solo_wait_s"] else None
            print(
                f"   worst wait of the single-job tenant: fifo {fifo['solo_wait_s']} s vs fair "
                f"{fair['solo_wait_s']} s"
                + (f" ({ratio:.0f}x shorter)" if ratio else " (fair: no wait at all)")
            )
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%S")
    path = ROOT / "bench" / "results" / f"fairness-{stamp}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
