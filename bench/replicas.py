"""Replicas: throughput of a burst on one sleep-bound model with max_replicas 1 versus 4, in
one run, on a local Ray declaring 4 GPUs; the seconds from the burst to the 4th replica
serving; the seconds from the last job to scale-down.

The model is `echo` with `delay_s` (its work is waiting, not CPU: a replica runs one job at a
time), so replicas, not the machine, bound the throughput. Jobs go through the real runner
(claim, lease, events, finish in SQL) from a pool of threads, as a Celery worker's threads
would run them, and the real scaler thread reads the queue from SQL and tells the real model
pool; only the broker's hop is left out (each thread takes the next job itself).

    .venv/bin/python -m bench.replicas [--jobs 200] [--delay-s 0.25] [--threads 16]
        [--redis-url redis://127.0.0.1:6379/15]

Prints a table and writes bench/results/replicas-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ray
import redis
from sqlalchemy import func, select, update

import migrations
from core.catalog import ensure_builtins, resolve_model
from core.db import Database
from core.jobs import NewJob, create_job
from core.keys import get_or_create_tenant
from core.settings import Settings
from core.states import JobKind
from core.tables import Job, Model
from scheduler.enqueue import Publisher
from scheduler.runner import Runner
from scheduler.scaling import Scaler
from workers.pool import get_pool

RESULTS = Path(__file__).resolve().parent / "results"
LOOK_S = 0.05


def pool_replicas(model_id: str) -> list[dict[str, Any]]:
    servers = ray.get(get_pool().info.remote())["servers"]
    return [s for s in servers if s["model_id"] == model_id]


def run_round(
    settings: Settings,
    database: Database,
    runner: Runner,
    *,
    max_replicas: int,
    jobs: int,
    delay_s: float,
    threads: int,
) -> dict[str, Any]:
    with database.transaction() as session:
        tenant = get_or_create_tenant(session, "bench")
        model_id = resolve_model(session, tenant.id, "echo").id
        session.execute(
            update(Model)
            .where(Model.id == model_id)
            .values(
                serving={
                    "min_replicas": 0,
                    "max_replicas": max_replicas,
                    "target_jobs_per_replica": 1,
                    "idle_unload_s": 3,
                    "last_idle_unload_s": 3,
                }
            )
        )
        tenant_id = tenant.id
    scaler = Scaler(settings, runner)
    scaler.start()
    burst_at = time.monotonic()
    with database.transaction() as session:
        ids = [
            create_job(
                session,
                NewJob(
                    tenant_id=tenant_id,
                    kind=JobKind.GENERATE,
                    family="echo",
                    queue="generate",
                    params={"message": "x", "delay_s": delay_s},
                    model_id=model_id,
                ),
            )[0].id
            for _ in range(jobs)
        ]
    full_at: list[float] = []

    def watch_replicas() -> None:
        while not full_at and time.monotonic() - burst_at < 600:
            ready = [r for r in pool_replicas(model_id) if r["ready"]]
            if len(ready) >= max_replicas:
                full_at.append(time.monotonic())
            time.sleep(LOOK_S)

    watcher = threading.Thread(target=watch_replicas, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(threads) as executor:
        list(executor.map(runner.run, ids))
    done_at = time.monotonic()
    with database.transaction() as session:
        states = dict(
            session.execute(
                select(Job.state, func.count()).where(Job.id.in_(ids)).group_by(Job.state)
            ).all()
        )
        last_finish = session.scalar(select(func.max(Job.finished_at)).where(Job.id.in_(ids)))
    watcher.join()
    # Scale-down: from the last job's end until no replica is left (min_replicas 0).
    while pool_replicas(model_id) and time.monotonic() - done_at < 600:
        time.sleep(LOOK_S)
    gone_at = time.monotonic()
    scaler.stop()
    wall_s = done_at - burst_at
    return {
        "max_replicas": max_replicas,
        "jobs": jobs,
        "delay_s": delay_s,
        "threads": threads,
        "states": {str(k): v for k, v in states.items()},
        "wall_s": round(wall_s, 2),
        "jobs_per_s": round(jobs / wall_s, 2),
        "ideal_jobs_per_s": round(max_replicas / delay_s, 2),
        "burst_to_all_replicas_serving_s": round(full_at[0] - burst_at, 2) if full_at else None,
        "last_job_to_scaled_down_s": round(gone_at - done_at, 2),
        "last_finished_at": str(last_finish),
        "idle_unload_s": 3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--delay-s", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    args = parser.parse_args()
    redis.Redis.from_url(args.redis_url).flushdb()
    ray.init(
        address="local",
        num_cpus=8,
        num_gpus=4,  # declared: the cluster of the measure
        resources={"gpu_memory_gb": 320},
        include_dashboard=False,
        namespace="genq",
        log_to_driver=False,
    )
    rounds = []
    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            var_dir=Path(folder),
            database_url=f"sqlite:///{folder}/genq.db",
            redis_url=args.redis_url,
            scale_interval_s=0.5,
            scale_cooldown_s=1,
            worker_concurrency=args.threads,
        )
        migrations.upgrade(settings)
        database = Database(settings)
        with database.transaction() as session:
            ensure_builtins(session)
        publisher = Publisher(settings)
        runner = Runner(settings, database, publisher)
        for max_replicas in (1, 4):
            rounds.append(
                run_round(
                    settings,
                    database,
                    runner,
                    max_replicas=max_replicas,
                    jobs=args.jobs,
                    delay_s=args.delay_s,
                    threads=args.threads,
                )
            )
        publisher.close()
        database.dispose()
    ray.shutdown()
    speedup = rounds[1]["jobs_per_s"] / rounds[0]["jobs_per_s"]
    result = {
        "bench": "replicas",
        "at": datetime.now(UTC).isoformat(),
        "cluster": "local Ray, 8 CPUs and 4 GPUs declared",
        "rounds": rounds,
        "speedup_4_vs_1": round(speedup, 2),
    }
    print(
        f"{'max_replicas':>12} {'wall s':>8} {'jobs/s':>8} {'ideal':>8} {'to full':>8} {'down':>6}"
    )
    for r in rounds:
        print(
            f"{r['max_replicas']:>12} {r['wall_s']:>8} {r['jobs_per_s']:>8} "
            f"{r['ideal_jobs_per_s']:>8} {r['burst_to_all_replicas_serving_s']!s:>8} "
            f"{r['last_job_to_scaled_down_s']:>6}"
        )
    print(f"speed-up with 4 replicas: {speedup:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"replicas-{stamp}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
