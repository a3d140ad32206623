"""Where a Celery worker's time goes under a steady `echo` load, for several thread counts
side by side in one run (GENQ_WORKER_CONCURRENCY): jobs a second, the worker's CPU per job by
kind of thread, and how busy the whole machine is.

    .venv/bin/python bench/worker_threads.py [--threads 8 4 2] [--seconds 15]
                                              [--database-url URL]

For each thread count it starts a `genq up` (one worker process, 2 API processes of 16
threads, the echo model capped at one replica as an admin would: PATCH /v1/models/echo), runs
20 jobs to warm it, then keeps about `--backlog` jobs queued from 8 client threads. After
`--settle` seconds of that load it reads, over `--seconds`: the jobs that finished (counted in
SQL), the CPU time of each of the worker's threads (/proc/<pid>/task) and the machine's busy
CPU-seconds (/proc/stat). Threads are grouped as the worker's main thread (Celery's consumer:
it reads the broker and hands messages to the task threads), its other Python threads (the
task threads, which claim, run and finish jobs, and genq's own: lease keepers, heartbeat,
snapshot, scaler) and the threads Ray's and gRPC's C++ code starts (named, unlike Python's).
SQLite: a fresh file per thread count; PostgreSQL: a new database of the server
`--database-url` names, per thread count, dropped after. Prints a table and writes
bench/results/worker-threads-<UTC time>.json.

Unlike bench/job_path.py this is no race to a fixed number of jobs: the queue never runs dry,
so it shows the worker's steady rate and what bounds it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    machine_busy_s,
    scratch_postgres,
    wait_for_workers,
    write_result,
)
from tests.support.stackproc import StackProcess, descendants  # noqa: E402

REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")
CLIENTS = 8
WARM_JOBS = 20
TICK_S = 1 / os.sysconf("SC_CLK_TCK")
ECHO = {"kind": "generate", "model": "echo", "params": {"message": "x"}}


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Thread id -> (its name, its user + system CPU seconds) of a live process."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            name = (task / "comm").read_text().strip()
            found[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) * TICK_S)
    return found


def kind_of(pid: int, tid: int, name: str) -> str:
    if tid == pid:
        return "main thread (consumer)"
    # Python's threads keep the process's name; Ray's and gRPC's C++ threads name themselves.
    return "python threads (tasks, keepers, ...)" if name == "python" else "ray and grpc threads"


def done_counter(url: str) -> Any:
    from sqlalchemy import create_engine, text

    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    engine = create_engine(url)
    query = text("SELECT count(*) FROM job WHERE state = 'succeeded'")

    def done() -> int:
        with engine.connect() as conn:
            return int(conn.execute(query).scalar() or 0)

    return done


@contextlib.contextmanager
def steady_load(stack: StackProcess, done: Any, backlog: int) -> Iterator[None]:
    """Client threads that keep about `backlog` jobs queued or running, for the block."""
    stop = threading.Event()
    submitted = [done()]
    lock = threading.Lock()
    finished = [done()]

    def watch() -> None:
        while not stop.wait(0.2):
            finished[0] = done()

    def client() -> None:
        while not stop.is_set():
            if submitted[0] - finished[0] >= backlog:
                time.sleep(0.01)
                continue
            stack.submit(ECHO)
            with lock:
                submitted[0] += 1

    threads = [threading.Thread(target=watch)]
    threads += [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def measure(args: argparse.Namespace, threads: int, database_url: str | None) -> dict:
    broker = f"{REDIS}/12"
    redis.Redis.from_url(broker).flushdb()
    var_dir = Path(tempfile.mkdtemp(prefix="genq-worker-threads-"))
    env = {
        "GENQ_REDIS_URL": broker,
        "GENQ_LOG_LEVEL": "WARNING",
        "GENQ_API_WORKERS": "2",
        "GENQ_WORKER_CONCURRENCY": str(threads),
        "GENQ_WORKER_PROCESSES": "1",
    }
    if database_url:
        env["GENQ_DATABASE_URL"] = database_url
    url = database_url or f"sqlite:///{(var_dir / 'genq.db').resolve()}"
    stack = StackProcess(var_dir, env)
    stack.env.update(env)
    try:
        stack.start()
        assert stack.process is not None
        wait_for_workers(stack, 1)
        reply = stack.call("PATCH", "/v1/models/echo", json={"max_replicas": 1})
        assert reply.status_code == 200, reply.text
        done = done_counter(url)
        for _ in range(WARM_JOBS):
            stack.submit(ECHO)
        while done() < WARM_JOBS:
            time.sleep(0.1)
        (worker,) = (
            pid
            for pid in descendants(stack.process.pid)
            if b"stack.cli\0worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
        )
        with steady_load(stack, done, args.backlog):
            time.sleep(args.settle)
            cpu0, busy0, done0, t0 = thread_cpu(worker), machine_busy_s(), done(), time.monotonic()
            time.sleep(args.seconds)
            cpu1, busy1, done1, t1 = thread_cpu(worker), machine_busy_s(), done(), time.monotonic()
        stack.stop()
    finally:
        stack.kill()
    jobs = done1 - done0
    by_kind: dict[str, float] = {}
    for tid, (name, cpu_s) in cpu1.items():
        used = cpu_s - cpu0.get(tid, (name, 0.0))[1]
        kind = kind_of(worker, tid, name)
        by_kind[kind] = by_kind.get(kind, 0.0) + used
    per_job = {kind: round(1000 * cpu_s / jobs, 2) for kind, cpu_s in sorted(by_kind.items())}
    cpus = os.cpu_count() or 1
    return {
        "worker_threads": threads,
        "jobs": jobs,
        "jobs_per_s": round(jobs / (t1 - t0), 1),
        "worker_cpu_ms_per_job": round(sum(per_job.values()), 2),
        "worker_cpu_ms_per_job_by_thread": per_job,
        "machine_busy_pct": round(100 * (busy1 - busy0) / (t1 - t0) / cpus, 1),
        "machine_cpu_ms_per_job": round(1000 * (busy1 - busy0) / jobs, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[8, 4, 2])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--backlog", type=int, default=150)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    runs = []
    for threads in args.threads:
        if args.database_url:
            with scratch_postgres(args.database_url, "genq_worker_threads") as url:
                runs.append(measure(args, threads, url))
        else:
            runs.append(measure(args, threads, None))
        run = runs[-1]
        print(
            f"{threads} threads: {run['jobs_per_s']} jobs/s, worker "
            f"{run['worker_cpu_ms_per_job']} ms of CPU per job "
            f"{run['worker_cpu_ms_per_job_by_thread']}, machine {run['machine_busy_pct']}% busy "
            f"({run['machine_cpu_ms_per_job']} ms per job)"
        )
    result = {
        "machine": f"{os.cpu_count()} cores",
        "database": "postgresql" if args.database_url else "sqlite",
        "seconds": args.seconds,
        "backlog": args.backlog,
        "runs": {str(run["worker_threads"]): run for run in runs},
    }
    write_result("worker-threads", result)


if __name__ == "__main__":
    main()
