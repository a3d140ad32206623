"""Jobs per second of `echo` jobs through the whole genq stack, against raw Celery no-op tasks
on the same Redis in the same run, and submit->start latency at idle.

    .venv/bin/python bench/throughput.py [--jobs 400] [--raw-tasks 2000] [--database-url URL]

genq path: HTTP submit (row + publish) -> Celery claim -> Ray model server -> output file and
artifact row -> finish. Raw path: send_task -> a prefork worker runs a no-op. Figures are
printed and written to bench/results/throughput-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402
from tests.support.stackproc import StackProcess  # noqa: E402

REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def bench_raw_celery(n: int, pool: str, concurrency: int) -> float:
    broker = f"{REDIS}/12"
    r = redis.Redis.from_url(broker)
    r.flushdb()
    env = {**os.environ, "BENCH_BROKER_URL": broker, "PYTHONPATH": str(ROOT)}
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.raw_celery",
            "worker",
            f"--pool={pool}",
            f"--concurrency={concurrency}",
            "--loglevel=WARNING",
            "--without-gossip",
            "--without-mingle",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        from bench.raw_celery import COUNTER, app, noop

        app.conf.broker_url = broker
        noop.delay("warm-up")
        while int(r.get(COUNTER) or 0) < 1:
            time.sleep(0.05)
        r.set(COUNTER, 0)
        start = time.perf_counter()
        for i in range(n):
            noop.delay(str(i))
        while int(r.get(COUNTER) or 0) < n:
            time.sleep(0.01)
        return n / (time.perf_counter() - start)
    finally:
        worker.terminate()
        worker.wait(30)


def bench_genq(stack: StackProcess, n: int, latency_samples: int) -> dict[str, float]:
    echo = {"kind": "generate", "model": "echo", "params": {"message": "x"}}
    # Warm up: the first job starts the echo model server.
    stack.wait(stack.submit(echo)["id"])

    # Idle latency: one job at a time; created_at/started_at/finished_at are the row's.
    starts, totals = [], []
    for _ in range(latency_samples):
        done = stack.wait(stack.submit(echo)["id"])
        created = datetime.fromisoformat(done["created_at"])
        started = datetime.fromisoformat(done["started_at"])
        finished = datetime.fromisoformat(done["finished_at"])
        starts.append((started - created).total_seconds() * 1000)
        totals.append((finished - created).total_seconds() * 1000)

    # Throughput: n jobs submitted from 8 client threads, until the last one finished
    # (counted in SQL, so that waiting does not load the API being measured).
    from sqlalchemy import func, select

    from core.db import Database
    from core.settings import Settings
    from core.tables import Job

    database = Database(
        Settings(var_dir=stack.var_dir, database_url=stack.env.get("GENQ_DATABASE_URL"))
    )
    with database.transaction() as session:
        before = session.scalar(
            select(func.count()).select_from(Job).where(Job.state == "succeeded")
        )
    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda _: stack.submit(echo)["id"], range(n)))
    submitted_s = time.perf_counter() - start
    while True:
        with database.read() as session:
            finished = session.scalar(
                select(func.count()).select_from(Job).where(Job.state.in_(["succeeded", "failed"]))
            )
        if finished - before >= n:
            break
        time.sleep(0.05)
    elapsed = time.perf_counter() - start
    # Submit->start under load: the same row timestamps, for the n jobs of the burst.
    with database.read() as session:
        rows = session.execute(select(Job.created_at, Job.started_at).where(Job.id.in_(ids))).all()
    loaded = [(s - c).total_seconds() * 1000 for c, s in rows if s is not None]
    database.dispose()
    return {
        "jobs": n,
        "jobs_per_s": n / elapsed,
        "submit_per_s": n / submitted_s,
        "submit_to_start_p50_ms": statistics.median(starts),
        "submit_to_start_p99_ms": percentile(starts, 0.99),
        "submit_to_done_p50_ms": statistics.median(totals),
        "submit_to_done_p99_ms": percentile(totals, 0.99),
        "loaded_submit_to_start_p50_ms": statistics.median(loaded),
        "loaded_submit_to_start_p99_ms": percentile(loaded, 0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--raw-tasks", type=int, default=2000)
    parser.add_argument("--latency-samples", type=int, default=50)
    parser.add_argument("--database-url", default=None, help="default: SQLite in a temp dir")
    parser.add_argument("--worker-concurrency", type=int, default=8)
    args = parser.parse_args()

    raw_prefork = bench_raw_celery(args.raw_tasks, "prefork", 2)
    raw_threads = bench_raw_celery(args.raw_tasks, "threads", args.worker_concurrency)

    tmp = Path(tempfile.mkdtemp(prefix="genq-bench-"))
    redis.Redis.from_url(f"{REDIS}/12").flushdb()
    env = {
        "GENQ_REDIS_URL": f"{REDIS}/12",
        "GENQ_WORKER_CONCURRENCY": str(args.worker_concurrency),
        "GENQ_LOG_LEVEL": "WARNING",
        "GENQ_API_WORKERS": "2",
    }
    if args.database_url:
        env["GENQ_DATABASE_URL"] = args.database_url
    stack = StackProcess(tmp / "var", env)
    stack.env["GENQ_API_WORKERS"] = "2"
    try:
        stack.start()
        genq = bench_genq(stack, args.jobs, args.latency_samples)
        stack.stop()
    finally:
        stack.kill()

    result = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores",
        "database": "postgresql" if args.database_url else "sqlite",
        "raw_celery_noop_per_s": {
            "prefork_2": raw_prefork,
            f"threads_{args.worker_concurrency}": raw_threads,
        },
        "genq_echo": genq,
        "ratio_genq_to_raw_prefork": genq["jobs_per_s"] / raw_prefork,
    }
    print(f"raw Celery no-op, prefork x2:      {raw_prefork:8.1f} tasks/s")
    print(f"raw Celery no-op, threads x{args.worker_concurrency}:     {raw_threads:8.1f} tasks/s")
    print(
        f"genq echo through the stack:       {genq['jobs_per_s']:8.1f} jobs/s "
        f"(ratio to raw prefork {result['ratio_genq_to_raw_prefork']:.2f})"
    )
    print(f"genq submit rate (8 clients):      {genq['submit_per_s']:8.1f} requests/s")
    print(
        f"submit->start at idle:  p50 {genq['submit_to_start_p50_ms']:.1f} ms, "
        f"p99 {genq['submit_to_start_p99_ms']:.1f} ms"
    )
    print(
        f"submit->done at idle:   p50 {genq['submit_to_done_p50_ms']:.1f} ms, "
        f"p99 {genq['submit_to_done_p99_ms']:.1f} ms"
    )
    print(
        f"submit->start under load ({args.jobs} jobs from 8 clients): "
        f"p50 {genq['loaded_submit_to_start_p50_ms']:.1f} ms, "
        f"p99 {genq['loaded_submit_to_start_p99_ms']:.1f} ms"
    )
    write_result("throughput", result)


if __name__ == "__main__":
    main()
