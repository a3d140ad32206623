"""Issue #19's first target: `echo` jobs through the whole genq stack against the bare pipeline
(bench/bare_pipeline.py) that takes the same hops without genq, side by side in one run, on
the same Redis and the same kind of database.

    .venv/bin/python bench/job_path.py [--jobs 400] [--clients 8] [--database-url URL]
                                       [--label before] [--echo-max-replicas N]
                                       [--worker-processes N] [--rounds N]

Both sides run genq's defaults: 2 gunicorn processes of 16 threads, and Celery workers of 8
threads, as many processes as `genq up` starts on this machine (GENQ_WORKER_PROCESSES: one
per 4 cores, from 1 to 4; `--worker-processes` to choose; a run with another number than the
default is written as `job-path-processes-<N>-<UTC time>.json`). Several bare workers share
one Ray head started as genq's is, each with its own actor; one runs a Ray of its own. Each
side gets a warm-up of 20 jobs, then `--jobs` jobs from `--clients` client threads; the time
runs until the last one is finished, counted in SQL (not through the API being measured).

The two sides' rates move by a quarter from one run to the next on this 2-core machine (each
run starts its processes anew). `--rounds N` measures both N times, alternating which goes
first, and reports the median round (by the ratio of jobs/s) as the run's figures, with every
round's ratios beside it.
Besides jobs/s it reads the CPU time of every process of each side from /proc before and after
the burst (gunicorn, the Celery worker, Ray's processes, the Redis server on the benchmark's
port), so the ratio can be told apart from how busy the machine was. SQLite: each side gets
a fresh file; PostgreSQL: both use a new database of the server `--database-url` names
(genq's tables and `bare_job`), one per round, dropped after it. Figures are
printed and written to bench/results/job-path-<UTC time>.json (`job-path-before-…` with
`--label before`).

While the burst's jobs queue, genq's replica scaler asks for more echo replicas (the echo
family's policy: one per 2 jobs queued or running, up to 4), and a replica that starts during
the burst counts its whole start-up (`processes_started` names them). `--echo-max-replicas 1`
caps the echo model as an admin would (PATCH /v1/models/echo), for one warm server like the
bare pipeline's one actor; such a run is written as `job-path-replicas-<N>-<UTC time>.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import scratch_postgres, wait_for_workers, write_result  # noqa: E402
from bench.cpu_per_job import process_cpu  # noqa: E402
from tests.support.stackproc import StackProcess, descendants, free_port  # noqa: E402

REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")
WARM_JOBS = 20
# genq's default (GENQ_WORKER_CONCURRENCY), and the bare worker's --concurrency.
GENQ_WORKER_THREADS = 8


def redis_server_pids(url: str) -> set[int]:
    """The redis-server serving the benchmark's Redis (by its port), not the machine's others."""
    port = url.rsplit(":", 1)[1].split("/")[0]
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"redis-server" in argv and f":{port}".encode() in argv:
                pids.add(int(entry.name))
    return pids


def is_celery_worker(pid: int) -> bool:
    """The bare pipeline's worker, whose command line process_cpu does not name."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"celery" in argv and b"worker" in argv


def cpu_by_name(roots: list[int]) -> dict[int, tuple[str, float]]:
    found = {}
    pids = set(roots) | redis_server_pids(REDIS)
    for root in roots:
        pids |= descendants(root)
    for pid in pids:
        cpu = process_cpu(pid)
        if cpu is not None:
            name, cpu_s = cpu
            if name.startswith("other:") and is_celery_worker(pid):
                name = "celery worker"
            found[pid] = (name, cpu_s)
    return found


def per_job_ms(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], jobs: int
) -> dict[str, float]:
    per_name: dict[str, float] = {}
    for pid, (name, cpu_s) in after.items():
        used = cpu_s - before.get(pid, (name, 0.0))[1]
        per_name[name] = per_name.get(name, 0.0) + used
    return {
        name: round(1000 * cpu_s / jobs, 2)
        for name, cpu_s in sorted(per_name.items(), key=lambda kv: -kv[1])
        if cpu_s > 0.005
    }


def burst(
    submit: Callable[[], str], wait: Callable[[list[str]], None], jobs: int, clients: int
) -> tuple[list[str], float, float]:
    """Submit `jobs` from `clients` threads and wait until all are finished: (ids, seconds to
    submit them all, seconds until the last finished)."""
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        ids = list(pool.map(lambda _: submit(), range(jobs)))
    submitted_s = time.perf_counter() - start
    wait(ids)
    return ids, submitted_s, time.perf_counter() - start


def measure(
    roots: list[int],
    submit: Callable[[], str],
    wait: Callable[[list[str]], None],
    jobs: int,
    clients: int,
) -> dict[str, Any]:
    for _ in range(WARM_JOBS):  # warm: actor or model server up, connections open
        wait([submit()])
    time.sleep(1)
    before = cpu_by_name(roots)
    mine_before = resource.getrusage(resource.RUSAGE_SELF)
    _, submitted_s, elapsed_s = burst(submit, wait, jobs, clients)
    after = cpu_by_name(roots)
    mine_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = per_job_ms(before, after, jobs)
    client_s = sum(
        getattr(mine_after, f) - getattr(mine_before, f) for f in ("ru_utime", "ru_stime")
    )
    cpu["load generator (this process)"] = round(1000 * client_s / jobs, 2)
    # A process that started during the burst (a model server replica the scaler asked for)
    # counts its whole start-up above: named here so that a reader can tell.
    started: dict[str, int] = {}
    for pid, (name, _) in after.items():
        if pid not in before:
            started[name] = started.get(name, 0) + 1
    return {
        "jobs": jobs,
        "clients": clients,
        "jobs_per_s": round(jobs / elapsed_s, 1),
        "submit_per_s": round(jobs / submitted_s, 1),
        "cpu_ms_per_job": cpu,
        "cpu_ms_per_job_total": round(sum(cpu.values()), 1),
        "processes_started": started,
    }


def wait_in_sql(url: str, table: str, done_states: tuple[str, ...]) -> Callable[[list[str]], None]:
    from sqlalchemy import bindparam, create_engine, text

    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    engine = create_engine(url)
    query = text(
        f"SELECT count(*) FROM {table} WHERE id IN :ids AND state IN :states"  # noqa: S608
    ).bindparams(bindparam("ids", expanding=True), bindparam("states", expanding=True))

    def wait(ids: list[str]) -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                done = conn.execute(query, {"ids": ids, "states": list(done_states)}).scalar()
            if done == len(ids):
                return
            time.sleep(0.02 if len(ids) == 1 else 0.05)
        raise TimeoutError(f"{len(ids)} jobs not done in 600 s")

    return wait


def start_ray_head(var_dir: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], dict]:
    """A Ray head started as `genq up` starts its own (stack/services.py), for the bare
    pipeline's worker processes to share: the process, and what its drivers need in their
    environment (BARE_RAY_ADDRESS and the head's token)."""
    from core.settings import Settings
    from stack.services import ray_head_argv, ray_head_env, ray_head_started

    var_dir.mkdir(parents=True, exist_ok=True)
    env = ray_head_env(var_dir)
    port = free_port()
    argv = ray_head_argv(
        Settings(_env_file=None, var_dir=var_dir), Path(sys.executable).parent, port
    )
    with open(log_path, "wb") as log:
        head = subprocess.Popen(
            argv,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 120
    while not ray_head_started(log_path, 0, lambda: head.poll() is not None):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the bare pipeline's Ray head did not start; see {log_path}")
        time.sleep(0.2)
    return head, {**env, "BARE_RAY_ADDRESS": f"127.0.0.1:{port}"}


def stop_ray_head(head: subprocess.Popen[bytes]) -> None:
    """As `genq up` stops its head: SIGTERM to `ray start` alone, then its group."""
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(40)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()


def bench_bare(
    database_url: str, jobs: int, clients: int, workers: int, threads: int, processes: int
) -> dict:
    broker = f"{REDIS}/13"
    redis.Redis.from_url(broker).flushdb()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("GENQ_", "BARE_"))},
        "BARE_DATABASE_URL": database_url,
        "BARE_BROKER_URL": broker,
        "PYTHONPATH": str(ROOT),
    }
    from bench.bare_pipeline import create_table, make_engine

    engine = make_engine(database_url)
    create_table(engine)
    engine.dispose()
    port = free_port()
    bin_dir = Path(sys.executable).parent
    tmp = Path(tempfile.gettempdir())
    head = None
    if processes > 1:
        head, head_env = start_ray_head(tmp / f"bare-ray-{port}", tmp / f"bare-ray-{port}.log")
        env.update(head_env)
    log = open(tmp / f"bare-pipeline-{port}.log", "wb")  # noqa: SIM115
    celery_workers = [
        subprocess.Popen(
            [
                str(bin_dir / "celery"),
                "-A",
                "bench.bare_pipeline:worker_app",
                "worker",
                "--queues=bare",
                "--pool=threads",
                f"--concurrency={GENQ_WORKER_THREADS}",
                "--loglevel=WARNING",
                "--without-gossip",
                "--without-mingle",
                f"--hostname=bare-{n}@%h",
            ],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for n in range(1, processes + 1)
    ]
    # The same gunicorn configuration `genq api` runs (api/cli.py): gthread workers.
    server = subprocess.Popen(
        [
            str(bin_dir / "gunicorn"),
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            str(workers),
            "--worker-class",
            "gthread",
            "--threads",
            str(threads),
            "--graceful-timeout",
            "5",
            "bench.bare_pipeline:create_app()",
        ],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    session = requests.Session()
    try:
        deadline = time.monotonic() + 180  # a loaded machine starts gunicorn slowly
        while True:
            try:
                session.get(f"{base}/jobs/none", timeout=5)  # 404 once the app answers
                break
            except requests.RequestException:  # not listening, or the app still loading
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)

        def submit() -> str:
            reply = session.post(f"{base}/jobs", json={"message": "x"}, timeout=30)
            reply.raise_for_status()
            return str(reply.json()["id"])

        wait = wait_in_sql(database_url, "bare_job", ("done",))
        # Every worker consumes once its Ray and its actor are up (worker_init); asked on
        # this run's broker (the module's own app reads BARE_BROKER_URL, unset here).
        from bench.bare_pipeline import make_celery

        app = make_celery(broker)
        deadline = time.monotonic() + 180
        try:
            while len(app.control.ping(timeout=1.0)) < processes:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{processes} bare workers did not all start")
        finally:
            app.close()
        roots = [server.pid, *(w.pid for w in celery_workers)]
        if head is not None:
            roots.append(head.pid)
        return measure(roots, submit, wait, jobs, clients)
    finally:
        children = [server, *celery_workers]
        for child in children:
            os.killpg(child.pid, signal.SIGTERM)
        for child in children:
            try:
                child.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        if head is not None:
            stop_ray_head(head)
        log.close()


def bench_genq(
    var_dir: Path,
    database_url: str | None,
    jobs: int,
    clients: int,
    processes: int,
    echo_max_replicas: int | None = None,
) -> dict:
    broker = f"{REDIS}/12"
    redis.Redis.from_url(broker).flushdb()
    # genq's defaults where the test harness (StackProcess) sets less: 2 API processes and
    # worker processes of 8 threads, as the bare pipeline runs (2 gunicorn workers, Celery
    # workers of --concurrency=8).
    env = {
        "GENQ_REDIS_URL": broker,
        "GENQ_LOG_LEVEL": "WARNING",
        "GENQ_API_WORKERS": "2",
        "GENQ_WORKER_CONCURRENCY": str(GENQ_WORKER_THREADS),
        "GENQ_WORKER_PROCESSES": str(processes),
    }
    if database_url:
        env["GENQ_DATABASE_URL"] = database_url
    stack = StackProcess(var_dir, env)
    stack.env.update(env)
    echo = {"kind": "generate", "model": "echo", "params": {"message": "x"}}
    url = database_url or f"sqlite:///{(var_dir / 'genq.db').resolve()}"
    try:
        stack.start()
        assert stack.process is not None
        wait_for_workers(stack, processes)
        if echo_max_replicas is not None:  # the echo model's policy, as an admin sets it
            reply = stack.call("PATCH", "/v1/models/echo", json={"max_replicas": echo_max_replicas})
            assert reply.status_code == 200, reply.text
        wait = wait_in_sql(url, "job", ("succeeded", "failed", "canceled"))
        result = measure(
            [stack.process.pid], lambda: str(stack.submit(echo)["id"]), wait, jobs, clients
        )
        stack.stop()
        return result
    finally:
        stack.kill()


def default_worker_processes() -> int:
    """What `genq up` starts on this machine when GENQ_WORKER_PROCESSES is unset."""
    from core.settings import Settings

    return Settings(_env_file=None, worker_processes=None).worker_process_count


def one_round(args: argparse.Namespace, tmp: Path, genq_first: bool) -> dict[str, Any]:
    """Both sides once (in the order asked), each on a fresh SQLite file, or both on a new
    database of the PostgreSQL server of `--database-url` (dropped after the round)."""
    if args.database_url:
        with scratch_postgres(args.database_url, "genq_job_path") as url:
            return _round(args, tmp, genq_first, url)
    return _round(args, tmp, genq_first, None)


def _round(
    args: argparse.Namespace, tmp: Path, genq_first: bool, database_url: str | None
) -> dict[str, Any]:
    bare_url = database_url or f"sqlite:///{tmp / 'bare.db'}"
    sides: dict[str, Any] = {}
    order = ("genq", "bare") if genq_first else ("bare", "genq")
    for side in order:
        if side == "bare":
            # genq's defaults for `genq api`: GENQ_API_WORKERS=2 (as bench_genq sets),
            # GENQ_API_THREADS=16.
            sides[side] = bench_bare(
                bare_url, args.jobs, args.clients, 2, 16, args.worker_processes
            )
        else:
            sides[side] = bench_genq(
                tmp / "var",
                database_url,
                args.jobs,
                args.clients,
                args.worker_processes,
                args.echo_max_replicas,
            )
    bare, genq = sides["bare"], sides["genq"]
    return {
        "bare_pipeline": bare,
        "genq_echo": genq,
        "ratio_jobs_per_s": round(genq["jobs_per_s"] / bare["jobs_per_s"], 2),
        "ratio_cpu_per_job": round(bare["cpu_ms_per_job_total"] / genq["cpu_ms_per_job_total"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--database-url", default=None, help="default: SQLite in a temp dir")
    parser.add_argument("--label", default="", help="`before` marks a baseline run")
    parser.add_argument(
        "--echo-max-replicas",
        type=int,
        default=None,
        help="cap the echo model's replicas (default: the echo family's policy, up to 4 while "
        "jobs queue; the bare pipeline has one actor)",
    )
    parser.add_argument(
        "--worker-processes",
        type=int,
        default=default_worker_processes(),
        help="Celery worker processes on each side (default: what `genq up` starts here)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="measure both sides this often")
    args = parser.parse_args()

    rounds = []
    for n in range(args.rounds):
        tmp = Path(tempfile.mkdtemp(prefix="genq-job-path-"))
        made = one_round(args, tmp, genq_first=n % 2 == 1)
        print(
            f"round {n + 1}: genq / bare {made['ratio_jobs_per_s']:.2f} in jobs/s, "
            f"{made['ratio_cpu_per_job']:.2f} in CPU per job",
            flush=True,
        )
        rounds.append(made)
    # The median round by its ratio of jobs/s (the upper one of an even count).
    median = sorted(rounds, key=lambda r: r["ratio_jobs_per_s"])[len(rounds) // 2]
    bare, genq = median["bare_pipeline"], median["genq_echo"]
    database = "postgresql" if args.database_url else "sqlite"
    result = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores",
        "database": database,
        "label": args.label,
        "echo_max_replicas": args.echo_max_replicas or "family policy",
        # Celery worker threads, on both sides (runs before 2026-12-05 14:45 gave genq 4).
        "worker_threads": GENQ_WORKER_THREADS,
        # Celery worker processes on both sides (runs before 2026-12-06 07:00 had one).
        "worker_processes": args.worker_processes,
        "rounds": len(rounds),
        **median,
    }
    if len(rounds) > 1:
        result["rounds_ratio_jobs_per_s"] = ", ".join(
            f"{r['ratio_jobs_per_s']:.2f}" for r in rounds
        )
        result["rounds_ratio_cpu_per_job"] = ", ".join(
            f"{r['ratio_cpu_per_job']:.2f}" for r in rounds
        )
        result["ratio_jobs_per_s_mean"] = round(
            statistics.fmean(r["ratio_jobs_per_s"] for r in rounds), 2
        )
    for name, side in (("bare pipeline", bare), ("genq echo", genq)):
        print(
            f"{name:14s} {side['jobs_per_s']:7.1f} jobs/s (submits {side['submit_per_s']:.1f}/s), "
            f"{side['cpu_ms_per_job_total']:.1f} ms of CPU per job"
        )
        for process, ms in side["cpu_ms_per_job"].items():
            print(f"    {ms:8.2f} ms  {process}")
        for process, n in side["processes_started"].items():
            print(f"    started during the burst: {n} x {process}")
    which = f"median of {len(rounds)} rounds, " if len(rounds) > 1 else ""
    print(
        f"genq / bare ({database}, {which}{args.worker_processes} worker process(es) a side): "
        f"{result['ratio_jobs_per_s']:.2f} in jobs/s, "
        f"{result['ratio_cpu_per_job']:.2f} in CPU per job (target 0.5)"
    )
    # A capped run is its own kind: the target reads the family's policy (bench/report.py).
    capped = f"-replicas-{args.echo_max_replicas}" if args.echo_max_replicas else ""
    if args.worker_processes != default_worker_processes():  # so is another process count
        capped += f"-processes-{args.worker_processes}"
    # The database is in the JSON; `--label before` marks a baseline run.
    write_result(f"job-path{capped}", result, before=args.label == "before")


if __name__ == "__main__":
    main()
