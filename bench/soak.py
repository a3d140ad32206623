"""Soak under chaos: 1,000 mixed jobs (echo, tiny ddpm generation, tiny ddpm training) through
the real stack (API in-process, Celery workers, the periodic scheduler, Ray) while a chaos loop
SIGKILLs Celery workers and Ray actor processes at random for the first `--chaos-for` seconds
(then the stack drains on its own). Prints jobs lost (never reached a
terminal state), jobs run twice (more than one terminal state, or more than one model
registered), duplicate outputs (two rows for one output name, an output file without its row,
more rows than the job makes), all of which must be 0, and the time to drain.

    .venv/bin/python -m bench.soak [--jobs 1000] [--db sqlite|postgres] [--chaos-every 15]
        [--chaos-for 180]

Uses Redis DB 7 of 127.0.0.1:6379 (GENQ_TEST_REDIS_URL) and a local Ray head of its own.
Results go to bench/results/soak-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select, text  # noqa: E402

from api.stack import Stack  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.tables import Artifact, Job, JobEvent, Model  # noqa: E402
from tests import test_faults_support as harness  # noqa: E402
from tests.stackproc import descendants  # noqa: E402

PG_URL = os.environ.get("GENQ_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
TERMINAL = {"succeeded", "failed", "canceled"}
TRAIN = {"preset": "tiny", "steps": 10, "batch_size": 8, "checkpoint_every": 5}


def actor_pids(ray_pid: int) -> list[int]:
    """Ray worker processes hosting a trainer or a model server of this run's own Ray head
    (never another cluster's on the same machine)."""
    pids = []
    for pid in descendants(ray_pid):
        proc = Path(f"/proc/{pid}")
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"ray::") and (b"Trainer" in cmdline or b"ModelServer" in cmdline):
            pids.append(int(proc.name))
    return pids


def chaos(
    cluster: harness.Cluster, stop: threading.Event, every_s: float, for_s: float, log: list[str]
) -> None:
    rng = random.Random(7)
    until = time.monotonic() + for_s
    while not stop.wait(rng.uniform(every_s / 2, every_s * 1.5)) and time.monotonic() < until:
        workers = [p for p in cluster.procs if p.name == "worker" and p.process.poll() is None]
        if rng.random() < 0.5 and workers:
            victim = rng.choice(workers)
            cluster.kill(victim)
            cluster.worker(wait=False)
            log.append(f"{time.monotonic():.1f} SIGKILL worker {victim.pid}")
        else:
            pids = actor_pids(cluster.ray.stack.children[0].process.pid)
            if pids:
                pid = rng.choice(pids)
                try:
                    os.kill(pid, signal.SIGKILL)
                    log.append(f"{time.monotonic():.1f} SIGKILL actor {pid}")
                except ProcessLookupError:
                    pass


def submit_all(cluster: harness.Cluster, n: int, model: str) -> list[tuple[str, str]]:
    rng = random.Random(1)
    jobs = []
    for i in range(n):
        r = rng.random()
        if r < 0.02:
            kind, body = (
                "train",
                {
                    "kind": "train",
                    "family": "ddpm",
                    "dataset": "digits",
                    "name": f"soak-{i}",
                    "params": {**TRAIN, "seed": i},
                },
            )
        elif r < 0.10:
            kind, body = (
                "generate",
                {
                    "kind": "generate",
                    "model": model,
                    "params": {"label": i % 10, "num_images": 1, "steps": 3, "seed": i},
                },
            )
        else:
            kind, body = (
                "echo",
                {
                    "kind": "generate",
                    "model": "echo",
                    "params": {"message": f"m{i}", "delay_s": round(rng.uniform(0, 0.3), 3)},
                },
            )
        jobs.append((cluster.submit(body), kind))
    return jobs


def audit(cluster: harness.Cluster, jobs: list[tuple[str, str]]) -> dict[str, object]:
    ids = [j for j, _ in jobs]
    kinds = dict(jobs)
    with cluster.database.transaction() as s:
        rows = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(ids)))}
        terminal_events = Counter(
            e.job_id
            for e in s.scalars(
                select(JobEvent).where(JobEvent.job_id.in_(ids), JobEvent.type == "state")
            )
            if e.data.get("to") in TERMINAL
        )
        outputs = Counter(
            job_id
            for (job_id,) in s.execute(select(Artifact.job_id).where(Artifact.job_id.in_(ids)))
        )
        dup_names = s.execute(
            select(func.count())
            .select_from(Artifact)
            .where(Artifact.job_id.in_(ids))
            .group_by(Artifact.job_id, Artifact.name)
            .having(func.count() > 1)
        ).all()
        models = Counter(
            job_id for (job_id,) in s.execute(select(Model.job_id).where(Model.job_id.in_(ids)))
        )
        paths = {p for (p,) in s.execute(select(Artifact.path).where(Artifact.job_id.in_(ids)))}
    files = {
        str(p.relative_to(cluster.settings.artifacts))
        for p in (cluster.settings.artifacts / "outputs").rglob("*")
        if p.is_file() and any(part in kinds for part in p.parts)
    }
    lost = [j for j in ids if rows[j].state not in TERMINAL]
    twice = [j for j in ids if terminal_events[j] > 1 or models[j] > 1]
    expected = {"echo": 1, "generate": 1, "train": None}
    too_many = [
        j for j in ids if expected[kinds[j]] is not None and outputs[j] > expected[kinds[j]]
    ]
    return {
        "jobs": len(ids),
        "by_kind": dict(Counter(kinds.values())),
        "states": dict(Counter(r.state for r in rows.values())),
        "failed_by_error": dict(
            Counter(r.error_type for r in rows.values() if r.state == "failed")
        ),
        "retried_jobs": sum(1 for r in rows.values() if r.attempt > 1),
        "jobs_lost": len(lost),
        "jobs_run_twice": len(twice),
        "duplicate_outputs": len(dup_names) + len(files - paths) + len(too_many),
        "orphan_output_files": len(files - paths),
    }


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--chaos-every", type=float, default=15.0, help="mean seconds between kills"
    )
    parser.add_argument("--chaos-for", type=float, default=180.0, help="seconds of chaos")
    parser.add_argument("--timeout", type=float, default=1200.0, help="give up draining after")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)  # stop the Ray head and workers on the way out

    harness.REDIS_URL = harness.REDIS_URL.rsplit("/", 1)[0] + "/7"  # the soak's own Redis DB
    tmp = Path(tempfile.mkdtemp(prefix="genq-soak-"))
    url = f"sqlite:///{tmp / 'genq.db'}"
    if args.db == "postgres":
        from sqlalchemy import create_engine

        name = f"genq_soak_{uuid.uuid4().hex[:8]}"
        admin = create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://"))
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = PG_URL.rsplit("/", 1)[0] + f"/{name}"
    stack = Stack(
        Settings(_env_file=None, var_dir=tmp / "ray", ray_num_cpus=4, ray_num_gpus=1)  # type: ignore[call-arg]
    )
    stack.env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    (tmp / "ray").mkdir()
    stack.start_ray()
    ray = harness.RayHead(stack, tmp / "ray")
    cluster = harness.Cluster(
        tmp, url, ray, extra_env={"GENQ_MAX_ATTEMPTS": "6", "GENQ_WORKER_CONCURRENCY": "4"}
    )
    stop = threading.Event()
    kills: list[str] = []
    try:
        for _ in range(args.workers):
            cluster.worker()
        cluster.scheduler()
        seed_model = cluster.submit(
            {"kind": "train", "family": "ddpm", "dataset": "digits", "name": "soak-gen",
             "params": {**TRAIN, "seed": 0}}
        )  # fmt: skip
        assert cluster.wait(seed_model, 300)["state"] == "succeeded"
        thread = threading.Thread(
            target=chaos, args=(cluster, stop, args.chaos_every, args.chaos_for, kills)
        )
        started = time.monotonic()
        thread.start()
        jobs = submit_all(cluster, args.jobs, "soak-gen")
        submitted_s = time.monotonic() - started
        ids = [j for j, _ in jobs]
        deadline = started + args.timeout
        while time.monotonic() < deadline:
            with cluster.database.transaction() as s:
                left = s.scalar(
                    select(func.count()).where(Job.id.in_(ids), Job.state.notin_(TERMINAL))
                )
            if not left:
                break
            if int(time.monotonic() - started) % 30 == 0:
                print(f"{time.monotonic() - started:.0f} s: {left} jobs not finished", flush=True)
            time.sleep(1)
        drain_s = time.monotonic() - started
        stop.set()
        thread.join()
        time.sleep(2)  # let any late (fenced) writes of killed attempts land, if they could
        result = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "db": args.db,
            "workers": args.workers,
            "chaos_every_s": args.chaos_every,
            "chaos_for_s": args.chaos_for,
            "chaos_kills": len(kills),
            "worker_kills": sum("worker" in k for k in kills),
            "actor_kills": sum("actor" in k for k in kills),
            "submit_s": round(submitted_s, 1),
            "drain_s": round(drain_s, 1),
            **audit(cluster, jobs),
        }
    finally:
        stop.set()
        cluster.close()
        stack.stop()
    print(json.dumps(result, indent=2))
    out = ROOT / "bench" / "results" / f"soak-{datetime.now(UTC):%Y-%m-%dT%H%M%S}.json"
    out.write_text(json.dumps({**result, "kills": kills}, indent=2) + "\n")


if __name__ == "__main__":
    main()
