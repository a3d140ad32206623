"""Where the CPU goes for one `echo` job: a burst of jobs through a real `genq up`, with the
CPU time of every process of the stack (API workers, Celery worker, scheduler, Ray's processes,
the model pool and server, the embedded or local Redis) and of this load generator read from
/proc before and after, divided by the number of jobs.

    .venv/bin/python bench/cpu_per_job.py [--jobs 400] [--clients 8] [--database-url URL]
                                          [--fair-share usage|starts]

Unlike bench/throughput.py this does not depend on how busy the machine is: it counts CPU,
not seconds. PostgreSQL's own server processes are not children of the stack and are left out
(their share shows as the gap between the machine's busy time and the sum). Figures are printed
and written to bench/results/cpu-per-job-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine_busy_s, write_result  # noqa: E402
from tests.support.stackproc import StackProcess, descendants  # noqa: E402

REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")
TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> tuple[str, float] | None:
    """(a short name, user + system CPU seconds) of a live process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    words = [a.decode(errors="replace") for a in argv if a]
    return name_of(words), (int(fields[11]) + int(fields[12])) * TICK_S


def name_of(argv: list[str]) -> str:
    """What a process of the stack is, from its command line."""
    line = " ".join(argv)
    for marker, name in (
        ("stack.cli worker", "celery worker"),
        ("stack.cli scheduler", "periodic scheduler"),
        ("stack.cli up", "genq up"),
        ("gunicorn", "api (gunicorn)"),
        ("ray::", argv[0] if argv else "ray"),
        ("gcs_server", "ray gcs_server"),
        ("raylet", "ray raylet"),
        ("redis-server", "redis-server"),
        ("dashboard", "ray dashboard"),
    ):
        if marker in line:
            return name
    return "other: " + (Path(argv[0]).name if argv else "?")


def redis_pids() -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"redis-server" in (entry / "cmdline").read_bytes():
                    pids.add(int(entry.name))
            except OSError:
                continue
    return pids


def snapshot(root_pid: int) -> dict[int, tuple[str, float]]:
    found = {}
    for pid in descendants(root_pid) | redis_pids():
        cpu = process_cpu(pid)
        if cpu is not None:
            found[pid] = cpu
    return found


def wait_in_sql(stack: StackProcess, ids: list[str]) -> None:
    from sqlalchemy import func, select

    from core.db import Database
    from core.settings import Settings
    from core.tables import Job

    database = Database(
        Settings(var_dir=stack.var_dir, database_url=stack.env.get("GENQ_DATABASE_URL"))
    )
    ended = Job.state.in_(["succeeded", "failed", "canceled"])
    try:
        while True:
            with database.read() as session:
                done = session.scalar(
                    select(func.count()).select_from(Job).where(Job.id.in_(ids), ended)
                )
            if done == len(ids):
                return
            time.sleep(0.05)
    finally:
        database.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--database-url", default=None, help="default: SQLite in a temp dir")
    parser.add_argument("--fair-share", choices=["usage", "starts"], default="usage")
    args = parser.parse_args()

    broker = f"{REDIS}/12"
    redis.Redis.from_url(broker).flushdb()
    env = {"GENQ_REDIS_URL": broker, "GENQ_LOG_LEVEL": "WARNING", "GENQ_API_WORKERS": "2"}
    env["GENQ_FAIR_SHARE"] = args.fair_share
    if args.database_url:
        env["GENQ_DATABASE_URL"] = args.database_url
    stack = StackProcess(Path(tempfile.mkdtemp(prefix="genq-cpu-")) / "var", env)
    stack.env.update(env)
    echo = {"kind": "generate", "model": "echo", "params": {"message": "x"}}
    try:
        stack.start()
        assert stack.process is not None
        for _ in range(20):  # warm: model server loaded, connections open
            stack.wait(stack.submit(echo)["id"])
        time.sleep(1)
        before, busy_before = snapshot(stack.process.pid), machine_busy_s()
        mine_before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            ids = list(pool.map(lambda _: stack.submit(echo)["id"], range(args.jobs)))
        wait_in_sql(stack, ids)  # not through the API, whose CPU is being counted
        elapsed_s = time.perf_counter() - started
        after, busy_after = snapshot(stack.process.pid), machine_busy_s()
        mine_after = resource.getrusage(resource.RUSAGE_SELF)
        stack.stop()
    finally:
        stack.kill()

    per_name: dict[str, float] = {}
    for pid, (name, cpu_s) in after.items():
        used = cpu_s - before.get(pid, (name, 0.0))[1]
        per_name[name] = per_name.get(name, 0.0) + used
    client_s = sum(
        getattr(mine_after, f) - getattr(mine_before, f) for f in ("ru_utime", "ru_stime")
    )
    per_name["load generator (this process)"] = client_s
    ms_per_job = {
        name: round(1000 * cpu_s / args.jobs, 2)
        for name, cpu_s in sorted(per_name.items(), key=lambda kv: -kv[1])
        if cpu_s > 0.005
    }
    result = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores",
        "database": "postgresql" if args.database_url else "sqlite",
        "jobs": args.jobs,
        "jobs_per_s": round(args.jobs / elapsed_s, 1),
        "machine_busy_cpu_s": round(busy_after - busy_before, 2),
        "elapsed_s": round(elapsed_s, 2),
        "cpu_ms_per_job": ms_per_job,
        "cpu_ms_per_job_total": round(sum(ms_per_job.values()), 1),
    }
    print(
        f"{args.jobs} echo jobs in {elapsed_s:.1f} s ({result['jobs_per_s']} jobs/s); the machine "
        f"was busy {result['machine_busy_cpu_s']} CPU-s of {os.cpu_count() * elapsed_s:.1f}"
    )
    for name, ms in ms_per_job.items():
        print(f"{ms:8.2f} ms of CPU per job  {name}")
    print(f"{result['cpu_ms_per_job_total']:8.1f} ms of CPU per job in all")
    write_result("cpu-per-job", result)


if __name__ == "__main__":
    main()
