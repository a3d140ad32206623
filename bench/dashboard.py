"""Server time of every dashboard page with 100,000 jobs in the database, on SQLite and on
PostgreSQL.

    .venv/bin/python bench/dashboard.py [--jobs 100000] [--requests 40] [--only sqlite|postgres]

Builds the schema with the migrations (so the indexes are the real ones), bulk-inserts jobs
spread over 20 tenants, 7 states, 3 kinds, 6 models and the last 7 days (ids made from their
creation time, as genq makes them), plus events and outputs for some, then requests each page
through the real Flask app in-process, logged in as an admin, and times the request from the
WSGI call to the last byte (server time; no network). Prints p50 / p99 per page and writes
bench/results/dashboard-<UTC time>.json. Redis DB 10 backs the publisher.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402

import migrations  # noqa: E402
from api.app import create_app  # noqa: E402
from bench.common import scratch_postgres, write_result  # noqa: E402
from core.catalog import ensure_builtins  # noqa: E402
from core.db import Database  # noqa: E402
from core.keys import create_key, get_or_create_tenant  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.tables import Artifact, Job, JobEvent, Model, Tenant  # noqa: E402
from scheduler.enqueue import Publisher  # noqa: E402

REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/") + "/10"
PG = os.environ.get("GENQ_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
STATES = (
    ["succeeded"] * 80
    + ["failed"] * 6
    + ["canceled"] * 4
    + ["queued"] * 6
    + ["running"] * 2
    + ["scheduled"]
    + ["canceling"]
)
KINDS = ["generate"] * 8 + ["train", "finetune"]


def id_for(moment: datetime) -> str:
    """A genq id (core/ids.py layout) for a job created at `moment`."""
    ms = int(moment.timestamp() * 1000)
    value = (ms & ((1 << 48) - 1)) << 80 | random.getrandbits(80)
    value = (value & ~(0xF << 76)) | (0x7 << 76)
    value = (value & ~(0x3 << 62)) | (0x2 << 62)
    return str(uuid.UUID(int=value))


def populate(database: Database, n_jobs: int) -> dict[str, Any]:
    random.seed(1)
    now = datetime.now(UTC)
    with database.transaction() as session:
        ensure_builtins(session)
        tenants = [get_or_create_tenant(session, f"tenant-{i:02d}") for i in range(20)]
        _, admin_key = create_key(session, tenants[0], is_admin=True)
        for t in tenants[1:]:
            create_key(session, t, label="bench")
        models = []
        for i in range(5):
            for version in (1, 2):
                model = Model(
                    tenant_id=tenants[i].id,
                    name=f"model-{i}",
                    version=version,
                    family="ddpm",
                    config={},
                    metrics={"loss": 0.1 * version},
                )
                session.add(model)
                models.append(model)
        session.flush()
        echo = session.scalar(sa.select(Model).where(Model.name == "echo"))
        assert echo is not None
        models.append(echo)
        tenant_ids = [t.id for t in tenants]
        model_ids = [m.id for m in models]
    rows = []
    for _ in range(n_jobs):
        created = now - timedelta(seconds=random.uniform(0, 7 * 24 * 3600))
        state = random.choice(STATES)
        started = finished = None
        if state not in ("queued", "scheduled"):
            started = created + timedelta(seconds=random.expovariate(1 / 2))
        if state in ("succeeded", "failed", "canceled"):
            assert started is not None
            finished = min(now, started + timedelta(seconds=random.expovariate(1 / 20)))
        kind = random.choice(KINDS)
        rows.append(
            {
                "id": id_for(created),
                "tenant_id": random.choice(tenant_ids),
                "kind": kind,
                "state": state,
                "queue": "generate" if kind == "generate" else "train",
                "family": "ddpm",
                "model_id": random.choice(model_ids),
                "params": {"label": random.randrange(10), "num_images": 4},
                "priority": random.randrange(10),
                "attempt": 0 if state in ("queued", "scheduled") else 1,
                "max_attempts": 3,
                "progress_step": 10 if finished else 0,
                "progress_total": 10,
                "progress_message": "",
                "metrics": {},
                "error_type": "model-error" if state == "failed" else None,
                "error_detail": "boom" if state == "failed" else None,
                "created_at": created,
                "started_at": started,
                "finished_at": finished,
                "updated_at": finished or started or created,
            }
        )
    rows.sort(key=lambda r: r["id"])
    started_at = time.perf_counter()
    with database.engine.begin() as conn:
        for i in range(0, len(rows), 5000):
            conn.execute(sa.insert(Job.__table__), rows[i : i + 5000])
    insert_s = time.perf_counter() - started_at
    # A training job with a long history and outputs, for the job page.
    detail = next(r for r in reversed(rows) if r["state"] == "succeeded")
    events = [
        {"job_id": detail["id"], "type": "metric", "data": {"step": s, "values": {"loss": 1 / s}}}
        for s in range(1, 301)
    ] + [
        {"job_id": detail["id"], "type": "log", "data": {"message": f"line {i}", "level": "info"}}
        for i in range(300)
    ]
    artifacts = [
        {
            "id": str(uuid.uuid4()),
            "job_id": detail["id"],
            "tenant_id": detail["tenant_id"],
            "name": f"image-{i}.png",
            "kind": "image",
            "path": f"outputs/x/image-{i}.png",
            "content_type": "image/png",
            "size_bytes": 300,
            "sha256": "0" * 64,
            "meta": {},
        }
        for i in range(16)
    ]
    with database.engine.begin() as conn:
        conn.execute(sa.insert(JobEvent.__table__), events)
        conn.execute(sa.insert(Artifact.__table__), artifacts)
        conn.execute(sa.text("ANALYZE"))  # planner statistics, as a live database has
    middle = rows[len(rows) // 2]["id"]
    live_ids = [r["id"] for r in rows[-50:]]
    return {
        "admin_key": admin_key,
        "detail": detail["id"],
        "middle": middle,
        "prefix": rows[len(rows) // 3]["id"][:12],
        "live_ids": live_ids,
        "insert_s": insert_s,
    }


def pages(seed: dict[str, Any]) -> dict[str, str]:
    return {
        "overview": "/admin/",
        "jobs (first page)": "/admin/jobs",
        "jobs (page in the middle)": f"/admin/jobs?before={seed['middle']}",
        "jobs state=failed": "/admin/jobs?state=failed",
        "jobs state=failed, middle": f"/admin/jobs?state=failed&before={seed['middle']}",
        "jobs tenant": "/admin/jobs?tenant=tenant-07",
        "jobs model": "/admin/jobs?model=model-3",
        "jobs kind=train, last day": "/admin/jobs?kind=train&window=24h",
        "jobs id prefix": f"/admin/jobs?q={seed['prefix']}",
        "job page (300 metrics, 300 logs, 16 outputs)": f"/admin/jobs/{seed['detail']}",
        "models": "/admin/models",
        "datasets": "/admin/datasets",
        "tenants and keys": "/admin/tenants",
        "live: 50 jobs' progress": "/admin/live/jobs?ids=" + ",".join(seed["live_ids"]),
        "live: overview counts": "/admin/live/overview",
    }


def server_times(app: Any, seed: dict[str, Any], n: int) -> dict[str, dict[str, float]]:
    client = app.test_client()
    login = client.get("/admin/login").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', login)
    assert token is not None
    response = client.post(
        "/admin/login", data={"key": seed["admin_key"], "csrf_token": token.group(1)}
    )
    assert response.status_code == 302, response.get_data(as_text=True)
    results = {}
    for name, path in pages(seed).items():
        times = []
        for i in range(n + 3):
            started = time.perf_counter()
            response = client.get(path)
            response.get_data()
            elapsed = time.perf_counter() - started
            assert response.status_code == 200, (path, response.status_code)
            if i >= 3:  # the first requests warm caches and the connection pool
                times.append(elapsed * 1000)
        times.sort()
        results[name] = {
            "p50_ms": statistics.median(times),
            "p99_ms": times[min(len(times) - 1, round(0.99 * (len(times) - 1)))],
            "max_ms": times[-1],
        }
    return results


def run(kind: str, url: str, n_jobs: int, n_requests: int, var_dir: Path) -> dict[str, Any]:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        var_dir=var_dir,
        database_url=url,
        redis_url=REDIS,
        secret_key="bench-secret",
    )
    migrations.upgrade(settings)
    database = Database(settings)
    seed = populate(database, n_jobs)
    with database.transaction() as session:
        count = session.scalar(sa.select(sa.func.count()).select_from(Job))
        tenants = session.scalar(sa.select(sa.func.count()).select_from(Tenant))
    publisher = Publisher(settings)
    app = create_app(settings, database=database, publisher=publisher)
    results = server_times(app, seed, n_requests)
    publisher.close()
    database.dispose()
    print(f"\n{kind}: {count} jobs, {tenants} tenants (bulk insert {seed['insert_s']:.1f} s)")
    print(f"  {'page':48} {'p50 ms':>8} {'p99 ms':>8}")
    for name, r in results.items():
        print(f"  {name:48} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f}")
    return {"jobs": count, "insert_s": seed["insert_s"], "pages": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--only", choices=["sqlite", "postgres"])
    args = parser.parse_args()
    out: dict[str, Any] = {"jobs": args.jobs, "requests": args.requests}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "sqlite"):
            url = f"sqlite:///{tmp}/bench.db"
            out["sqlite"] = run("SQLite", url, args.jobs, args.requests, Path(tmp))
        if args.only in (None, "postgres"):
            with scratch_postgres(PG) as url:
                out["postgres"] = run("PostgreSQL", url, args.jobs, args.requests, Path(tmp))
    write_result("dashboard", out)


if __name__ == "__main__":
    main()
