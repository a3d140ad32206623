"""Server time of one GET /metrics scrape with 100,000 jobs in the database, on SQLite and on
PostgreSQL: what a Prometheus scrape costs the API, since the job figures are read from SQL
when scraped (api/metrics.py, core/census.py).

    .venv/bin/python bench/metrics_scrape.py [--jobs 100000] [--scrapes 20] [--only sqlite|postgres]

The database is filled as bench/dashboard.py fills it (20 tenants, 7 states, 3 kinds, the
last 7 days), then the real Flask app answers scrapes in-process with the scrape token; the
time runs from the WSGI call to the last byte. Prints p50 / max with every scrape querying
(GENQ_METRICS_CACHE_S=0), p50 of scrapes answered from the text shared through Redis, and the
exposition's size and series count, and writes bench/results/metrics-<UTC time>.json. Redis
DB 10 backs the publisher (and holds no snapshot, so the cluster's figures are empty).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


import migrations  # noqa: E402
from api.app import create_app  # noqa: E402
from api.metrics import SQL_CACHE_KEY  # noqa: E402
from bench.common import scratch_postgres, write_result  # noqa: E402
from bench.dashboard import PG, REDIS, populate  # noqa: E402
from core.db import Database  # noqa: E402
from core.settings import Settings  # noqa: E402
from scheduler.enqueue import Publisher  # noqa: E402

TOKEN = "bench-metrics-token-000000"


def scrape_times(app: Any, n_scrapes: int) -> tuple[list[float], bytes]:
    """Milliseconds per scrape (after two that warm up), and the last answer."""
    client = app.test_client()
    times, body = [], b""
    for i in range(n_scrapes + 2):
        started = time.perf_counter()
        response = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        body = response.get_data()
        elapsed = time.perf_counter() - started
        assert response.status_code == 200, body[:300]
        if i >= 2:  # the first scrapes warm caches and the connection pool
            times.append(elapsed * 1000)
    return times, body


def run(kind: str, url: str, n_jobs: int, n_scrapes: int, var_dir: Path) -> dict[str, Any]:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        var_dir=var_dir,
        database_url=url,
        redis_url=REDIS,
        metrics_token=TOKEN,
        rate_limits=False,
        metrics_cache_s=0,
    )
    migrations.upgrade(settings)
    database = Database(settings)
    seed = populate(database, n_jobs)
    publisher = Publisher(settings)
    queried = scrape_times(create_app(settings, database=database, publisher=publisher), n_scrapes)
    shared = settings.model_copy(update={"metrics_cache_s": 300})
    publisher.redis.delete(SQL_CACHE_KEY)
    cached = scrape_times(create_app(shared, database=database, publisher=publisher), n_scrapes)
    publisher.redis.delete(SQL_CACHE_KEY)
    publisher.close()
    database.dispose()
    times, body = queried
    series = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
    result = {
        "jobs": n_jobs,
        "insert_s": seed["insert_s"],
        "p50_ms": statistics.median(times),
        "max_ms": max(times),
        "cached_p50_ms": statistics.median(cached[0]),
        "bytes": len(body),
        "series": series,
    }
    print(
        f"{kind}: {n_jobs} jobs: scrape p50 {result['p50_ms']:.0f} ms, max "
        f"{result['max_ms']:.0f} ms; shared text (GENQ_METRICS_CACHE_S) p50 "
        f"{result['cached_p50_ms']:.0f} ms; {series} series, {len(body) / 1024:.0f} KiB"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--scrapes", type=int, default=20)
    parser.add_argument("--only", choices=["sqlite", "postgres"])
    args = parser.parse_args()
    out: dict[str, Any] = {"jobs": args.jobs, "scrapes": args.scrapes}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "sqlite"):
            url = f"sqlite:///{tmp}/bench.db"
            out["sqlite"] = run("SQLite", url, args.jobs, args.scrapes, Path(tmp))
        if args.only in (None, "postgres"):
            with scratch_postgres(PG) as url:
                out["postgres"] = run("PostgreSQL", url, args.jobs, args.scrapes, Path(tmp))
    write_result("metrics", out)


if __name__ == "__main__":
    main()
