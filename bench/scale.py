"""The scheduling queries at scale: 100,000 job rows (bench/dashboard.py's seed: 20 tenants,
every state, 7 days) plus a deep backlog of queued jobs, on SQLite and on PostgreSQL.

    .venv/bin/python bench/scale.py [--jobs 100000] [--backlog 20000] [--requests 40]
                                    [--only sqlite|postgres]

Times, server-side and in-process (p50 / p99 over `--requests` after 3 warm-up ones):
`GET /v1/jobs` (a page, and `state=queued`: every job on it gets its queue position and ETA),
`GET /v1/jobs/{id}` of a queued job deep in the backlog, the dashboard's overview and tenants
pages, and the claim itself (`core.fairness.claim_next` by usage and by starts, rolled back
each time) against the plain FIFO claim it replaced (the oldest queued job by priority,
`claim_job`), side by side on the same rows. Writes bench/results/scale-<UTC time>.json.
Redis DB 10 backs the publisher.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402

import migrations  # noqa: E402
from api.app import create_app  # noqa: E402
from bench.common import scratch_postgres, write_result  # noqa: E402
from bench.dashboard import PG, REDIS, id_for, populate, server_times  # noqa: E402
from core.db import Database  # noqa: E402
from core.fairness import claim_next  # noqa: E402
from core.leases import claim_job  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.states import JobState  # noqa: E402
from core.tables import Job, Model, Tenant  # noqa: E402
from core.usage import POLICY_INFO, recount_running  # noqa: E402
from scheduler.enqueue import Publisher  # noqa: E402


def add_backlog(database: Database, n: int) -> str:
    """`n` more queued generate jobs, 80% of them from one tenant; returns the id of one deep
    in it."""
    random.seed(2)
    now = datetime.now(UTC)
    with database.transaction() as session:
        tenants = list(session.scalars(sa.select(Tenant.id).order_by(Tenant.name)))
        echo = session.scalar(sa.select(Model.id).where(Model.name == "echo"))
    rows = []
    for i in range(n):
        created = now - timedelta(seconds=n - i)
        rows.append(
            {
                "id": id_for(created),
                "tenant_id": tenants[1] if random.random() < 0.8 else random.choice(tenants),
                "kind": "generate",
                "state": "queued",
                "queue": "generate",
                "family": "echo",
                "model_id": echo,
                "params": {},
                "priority": random.choice([2, 5, 5, 8]),
                "attempt": 0,
                "max_attempts": 3,
                "progress_step": 0,
                "progress_total": 0,
                "progress_message": "",
                "metrics": {},
                "num_gpus": 0.0,
                "created_at": created,
                "updated_at": created,
            }
        )
    with database.engine.begin() as conn:
        for i in range(0, n, 5000):
            conn.execute(sa.insert(Job.__table__), rows[i : i + 5000])
        conn.execute(sa.text("ANALYZE"))
    return str(rows[int(n * 0.9)]["id"])


def _fifo(session: Any) -> Any:
    job_id = session.scalar(
        sa.select(Job.id)
        .where(Job.state == JobState.QUEUED, Job.queue == "generate")
        .order_by(Job.priority.desc(), Job.id)
        .limit(1)
    )
    return claim_job(session, job_id, lease_ttl_s=60)


def timed(fn: Callable[[], Any], n: int) -> dict[str, float]:
    times = []
    for i in range(n + 3):
        started = time.perf_counter()
        fn()
        if i >= 3:
            times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {
        "p50_ms": statistics.median(times),
        "p99_ms": times[min(len(times) - 1, round(0.99 * (len(times) - 1)))],
    }


def claim_times(database: Database, n: int) -> dict[str, dict[str, float]]:
    def rolled_back(claim: Callable[[Any], Any]) -> Callable[[], None]:
        def once() -> None:
            with database.sessions() as session:
                session.begin()
                assert claim(session) is not None
                session.rollback()

        return once

    def by_starts(session: Any) -> Any:
        session.info[POLICY_INFO] = "starts"
        return claim_next(session, "generate", lease_ttl_s=60)

    return {
        "claim: fair share by usage (claim_next)": timed(
            rolled_back(lambda s: claim_next(s, "generate", lease_ttl_s=60)), n
        ),
        "claim: fair share by starts (claim_next)": timed(rolled_back(by_starts), n),
        "claim: plain FIFO (baseline)": timed(rolled_back(_fifo), n),
    }


def run(kind: str, url: str, n_jobs: int, backlog: int, n: int, var_dir: Path) -> dict[str, Any]:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        var_dir=var_dir,
        database_url=url,
        redis_url=REDIS,
        secret_key="bench-secret",
        page_size_max=200,
    )
    migrations.upgrade(settings)
    database = Database(settings)
    seed = populate(database, n_jobs)
    deep = add_backlog(database, backlog)
    with database.transaction() as session:  # the seed writes running rows without a claim
        recount_running(session)
    with database.transaction() as session:
        total = session.scalar(sa.select(sa.func.count()).select_from(Job))
        queued = session.scalar(
            sa.select(sa.func.count()).select_from(Job).where(Job.state == JobState.QUEUED)
        )
    publisher = Publisher(settings)
    app = create_app(settings, database=database, publisher=publisher)
    client = app.test_client()
    headers = {"Authorization": f"Bearer {seed['admin_key']}"}

    def get(path: str) -> Callable[[], None]:
        def once() -> None:
            response = client.get(path, headers=headers)
            assert response.status_code == 200, (path, response.get_data(as_text=True)[:300])

        return once

    results = {
        "GET /v1/jobs (first page of 50)": timed(get("/v1/jobs"), n),
        "GET /v1/jobs?state=queued (50, positions + eta)": timed(get("/v1/jobs?state=queued"), n),
        "GET /v1/jobs?state=queued&limit=200": timed(get("/v1/jobs?state=queued&limit=200"), n),
        "GET /v1/jobs/{id} (queued, deep in the backlog)": timed(get(f"/v1/jobs/{deep}"), n),
        **claim_times(database, n),
    }
    dashboard = server_times(app, seed, n)
    for page in ("overview", "jobs (first page)", "tenants and keys"):
        results[f"dashboard: {page}"] = dashboard[page]
    position = client.get(f"/v1/jobs/{deep}", headers=headers).get_json()["queue_position"]
    publisher.close()
    database.dispose()
    fair = results["claim: fair share by usage (claim_next)"]["p50_ms"]
    fifo = results["claim: plain FIFO (baseline)"]["p50_ms"]
    print(f"\n{kind}: {total} jobs, {queued} queued (deep job at position {position})")
    print(f"  {'query':52} {'p50 ms':>8} {'p99 ms':>8}")
    for name, r in results.items():
        print(f"  {name:52} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f}")
    print(f"  claim p50, fair share / FIFO: {fair / fifo:.1f}x")
    return {"jobs": total, "queued": queued, "results": results, "claim_ratio": fair / fifo}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--backlog", type=int, default=20_000)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--only", choices=["sqlite", "postgres"])
    args = parser.parse_args()
    out: dict[str, Any] = {"jobs": args.jobs, "backlog": args.backlog, "requests": args.requests}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "sqlite"):
            url = f"sqlite:///{Path(tmp) / 'scale.db'}"
            out["sqlite"] = run(
                "sqlite", url, args.jobs, args.backlog, args.requests, Path(tmp) / "v1"
            )
        if args.only in (None, "postgres"):
            with scratch_postgres(PG) as url:
                out["postgres"] = run(
                    "postgres", url, args.jobs, args.backlog, args.requests, Path(tmp) / "v2"
                )
    write_result("scale", out)


if __name__ == "__main__":
    main()
