"""Soak under chaos: 1,000 mixed jobs (echo with small delays, tiny ddpm generation, a few tiny
ddpm trainings) through a real `genq up` (PostgreSQL, the embedded Redis, a local Ray head) while
a chaos loop breaks one component at random every few seconds for the first `--chaos-for`
seconds: SIGKILL the Celery worker, a model server, a trainer, the Ray head (its whole process
group), the Redis server; terminate every PostgreSQL connection of the stack's database
(`pg_terminate_backend`, 20 rounds over a second); pause a model server (SIGSTOP, a stall).
`genq up` restarts what dies; the stack then drains on its own.

Prints jobs lost (never reached a terminal state), jobs run twice (more than one terminal
state, or more than one model registered), duplicate outputs (two rows for one output name,
more rows than the job makes) and stray output files (files in the store without their row),
all of which must be 0, with the restarts `genq up` made and the time to drain.

    .venv/bin/python -m bench.soak [--jobs 1000] [--chaos-every 10] [--chaos-for 300]

Needs the PostgreSQL server of GENQ_TEST_DATABASE_URL (it creates a database of its own). Every
process it signals is a descendant of the `genq up` it started. Results go to
bench/results/soak-<time>.json.
"""

from __future__ import annotations

import argparse
import contextlib
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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from sqlalchemy import create_engine, func, select, text  # noqa: E402

from bench.common import write_result  # noqa: E402
from core.db import Database  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.strays import GRACE as STRAY_GRACE  # noqa: E402
from core.tables import Artifact, Job, JobEvent, Model, utcnow  # noqa: E402
from tests.support.stackproc import StackProcess, descendants, is_alive  # noqa: E402

PG_URL = os.environ.get("GENQ_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
TERMINAL = {"succeeded", "failed", "canceled"}
TRAIN = {"preset": "tiny", "steps": 10, "batch_size": 8, "checkpoint_every": 5}
# What the chaos loop breaks, and how often (relative weights).
FAULTS = {
    "worker": 3,
    "model_server": 3,
    "trainer": 3,  # often passed over: a trainer runs only now and then
    "ray_head": 1,
    "redis": 1,
    "postgres": 3,
    "stall": 2,
}
STALL_TIMEOUT_S = 10.0


def pids(stack: StackProcess, marker: bytes, *, prefix: bool = False) -> list[int]:
    """The stack's own live processes whose command line contains (starts with) `marker`."""
    assert stack.process is not None
    found = []
    for pid in descendants(stack.process.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        hit = cmdline.startswith(marker) if prefix else marker in cmdline
        if hit and is_alive(pid):
            found.append(pid)
    return found


class Chaos:
    def __init__(self, stack: StackProcess, pg_url: str, rng: random.Random) -> None:
        self.stack, self.pg_url, self.rng = stack, pg_url, rng
        self.log: list[dict[str, Any]] = []
        self.started = time.monotonic()

    def strike(self) -> None:
        kinds = list(FAULTS)
        for kind in self.rng.sample(kinds, len(kinds), counts=[FAULTS[k] for k in kinds]):
            what = getattr(self, f"_{kind}")()
            if what is not None:
                at = round(time.monotonic() - self.started, 1)
                self.log.append({"at_s": at, "fault": kind, "what": what})
                print(f"{at:7.1f} s chaos: {kind} {what}", flush=True)
                return

    def _kill_one(self, marker: bytes, prefix: bool = False) -> str | None:
        found = pids(self.stack, marker, prefix=prefix)
        if not found:
            return None
        pid = self.rng.choice(found)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return None
        return f"SIGKILL pid {pid}"

    def _worker(self) -> str | None:
        return self._kill_one(b"stack.cli\x00worker")

    def _model_server(self) -> str | None:
        return self._kill_one(b"ray::ModelServer", prefix=True)

    def _trainer(self) -> str | None:
        return self._kill_one(b"ray::Trainer", prefix=True)

    def _redis(self) -> str | None:
        return self._kill_one(b"redis-server")

    def _ray_head(self) -> str | None:
        found = pids(self.stack, b"ray\x00start\x00--head")
        if not found:
            return None
        try:
            os.killpg(found[0], signal.SIGKILL)
        except ProcessLookupError:
            return None
        return f"SIGKILL process group {found[0]}"

    def _postgres(self) -> str | None:
        name = self.pg_url.rsplit("/", 1)[1]
        engine = create_engine(
            PG_URL.replace("postgresql://", "postgresql+psycopg://", 1),
            isolation_level="AUTOCOMMIT",
        )
        killed = 0
        try:
            with engine.connect() as conn:
                for _ in range(20):
                    killed += len(
                        conn.execute(
                            text(
                                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE datname = :name AND pid <> pg_backend_pid()"
                            ),
                            {"name": name},
                        ).all()
                    )
                    time.sleep(0.05)
        finally:
            engine.dispose()
        return f"terminated {killed} connections" if killed else None

    def _stall(self) -> str | None:
        found = pids(self.stack, b"ray::ModelServer", prefix=True)
        if not found:
            return None
        pid = self.rng.choice(found)
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            return None

        def resume() -> None:  # if the stall watch has not killed it by then
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

        timer = threading.Timer(3 * STALL_TIMEOUT_S, resume)
        timer.daemon = True
        timer.start()
        return f"SIGSTOP pid {pid}"


def run_chaos(chaos: Chaos, stop: threading.Event, every_s: float, for_s: float) -> None:
    until = time.monotonic() + for_s
    while not stop.wait(chaos.rng.uniform(every_s / 2, every_s * 1.5)):
        if time.monotonic() > until:
            return
        try:
            chaos.strike()
        except Exception as exc:  # a fault that could not be injected is logged, not fatal
            print(f"chaos failed: {exc!r}", flush=True)


def submit(stack: StackProcess, body: dict[str, Any]) -> str:
    """Submit, retrying while the API cannot reach its database or broker (they are being
    killed); the Idempotency-Key makes a retried submission the same job."""
    key = uuid.uuid4().hex
    for _ in range(600):
        try:
            response = stack.call("POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key})
            if response.status_code in (200, 202):  # 200: a retry found the job made
                return str(response.json()["id"])
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"could not submit {body}")


def submit_all(stack: StackProcess, n: int, model: str) -> list[tuple[str, str]]:
    rng = random.Random(1)
    jobs = []
    for i in range(n):
        r = rng.random()
        if r < 0.02:
            kind = "train"
            body = {
                "kind": "train",
                "family": "ddpm",
                "dataset": "digits",
                "name": f"soak-{i}",
                "params": {**TRAIN, "seed": i},
            }
        elif r < 0.07:
            kind = "generate"
            body = {
                "kind": "generate",
                "model": model,
                "params": {"label": i % 10, "num_images": 1, "steps": 3, "seed": i},
            }
        else:
            kind = "echo"
            body = {
                "kind": "generate",
                "model": "echo",
                "params": {"message": f"m{i}", "delay_s": round(rng.uniform(0, 0.3), 3)},
            }
        jobs.append((submit(stack, body), kind))
    return jobs


def audit(database: Database, artifacts: Path, jobs: list[tuple[str, str]]) -> dict[str, object]:
    ids = [j for j, _ in jobs]
    kinds = dict(jobs)
    with database.transaction() as s:
        rows = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(ids)))}
        terminal_events = Counter(
            e.job_id
            for e in s.scalars(
                select(JobEvent).where(JobEvent.job_id.in_(ids), JobEvent.type == "state")
            )
            if e.data.get("to") in TERMINAL
        )
        stalled = {
            e.job_id
            for e in s.scalars(
                select(JobEvent).where(JobEvent.job_id.in_(ids), JobEvent.type == "state")
            )
            if str(e.data.get("reason", "")).startswith("stalled")
        }
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
    # Every file under the jobs' output folders, not only the rows.
    files = {
        str(p.relative_to(artifacts))
        for p in (artifacts / "outputs").rglob("*")
        if p.is_file() and any(part in kinds for part in p.parts)
    }
    lost = [j for j in ids if rows[j].state not in TERMINAL]
    twice = [j for j in ids if terminal_events[j] > 1 or models[j] > 1]
    expected = {"echo": 1, "generate": 1, "train": None}
    too_many = [
        j for j in ids if expected[kinds[j]] is not None and outputs[j] > expected[kinds[j]]
    ]
    missing = [
        j
        for j in ids
        if rows[j].state == "succeeded" and expected[kinds[j]] and outputs[j] < expected[kinds[j]]
    ]
    stray = sorted(files - paths)
    return {
        "jobs": len(ids),
        "by_kind": dict(Counter(kinds.values())),
        "states": dict(Counter(r.state for r in rows.values())),
        "failed_by_error": dict(
            Counter(r.error_type for r in rows.values() if r.state == "failed")
        ),
        "retried_jobs": sum(1 for r in rows.values() if r.attempt > 1),
        "stalled_jobs": len(stalled),
        "jobs_lost": len(lost),
        "jobs_run_twice": len(twice),
        "duplicate_outputs": len(dup_names) + len(too_many),
        "stray_output_files": len(stray),
        "succeeded_without_output": len(missing),
        "output_files": len(files),
        "output_rows": len(paths),
        "lost_ids": lost[:20],
        "twice_ids": twice[:20],
        "duplicate_ids": too_many[:20],
        "stray_files": stray[:20],
        "failed_ids": [j for j, r in rows.items() if r.state == "failed"][:20],
    }


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--chaos-every", type=float, default=10.0, help="mean s between faults")
    parser.add_argument("--chaos-for", type=float, default=300.0, help="seconds of chaos")
    parser.add_argument("--timeout", type=float, default=1500.0, help="give up draining after")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)  # stop the stack on the way out

    tmp = Path(tempfile.mkdtemp(prefix="genq-soak-"))
    name = f"genq_soak_{uuid.uuid4().hex[:8]}"
    admin = create_engine(
        PG_URL.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_URL.rsplit("/", 1)[0] + f"/{name}"
    env = {
        "GENQ_DATABASE_URL": url,
        "GENQ_RAY_NUM_CPUS": "4",
        "GENQ_WORKER_CONCURRENCY": "4",
        "GENQ_API_WORKERS": "2",
        "GENQ_RATE_LIMITS": "false",
        "GENQ_MAX_ATTEMPTS": "10",
        "GENQ_STALL_TIMEOUT_S": str(STALL_TIMEOUT_S),
        "GENQ_HEARTBEAT_INTERVAL_S": "3",
        "GENQ_LEASE_TTL_S": "20",
        "GENQ_VISIBILITY_TIMEOUT_S": "60",
        "GENQ_REAP_INTERVAL_S": "3",
        "GENQ_RECONCILE_INTERVAL_S": "5",
        "GENQ_REPUBLISH_AFTER_S": "10",
        "GENQ_RETRY_BACKOFF_BASE_S": "0.5",
        "GENQ_RETRY_BACKOFF_MAX_S": "10",
        "GENQ_RESTART_BACKOFF_MAX_S": "8",
    }
    stack = StackProcess(tmp / "var", env)
    settings = Settings(_env_file=None, database_url=url, var_dir=tmp / "var")  # type: ignore[call-arg]
    stop = threading.Event()
    chaos = Chaos(stack, url, random.Random(args.seed))
    result: dict[str, Any] = {}
    try:
        stack.start(timeout_s=300)
        database = Database(settings)
        seed_model = submit(
            stack,
            {"kind": "train", "family": "ddpm", "dataset": "digits", "name": "soak-gen",
             "params": {**TRAIN, "seed": 0}},
        )  # fmt: skip
        assert stack.wait(seed_model, timeout_s=600)["state"] == "succeeded"
        thread = threading.Thread(
            target=run_chaos, args=(chaos, stop, args.chaos_every, args.chaos_for)
        )
        started = time.monotonic()
        chaos.started = started
        thread.start()
        jobs = submit_all(stack, args.jobs, "soak-gen")
        submitted_s = time.monotonic() - started
        ids = [j for j, _ in jobs]
        deadline = started + args.timeout
        last_print = 0.0
        while time.monotonic() < deadline:
            try:
                with database.transaction() as s:
                    left = s.scalar(
                        select(func.count()).where(Job.id.in_(ids), Job.state.notin_(TERMINAL))
                    )
            except Exception as exc:  # the chaos terminated this connection
                print(f"count failed: {type(exc).__name__}", flush=True)
                time.sleep(1)
                continue
            if not left and not thread.is_alive():
                break
            if time.monotonic() - last_print >= 30:
                last_print = time.monotonic()
                print(f"{last_print - started:.0f} s: {left} jobs not finished", flush=True)
            time.sleep(1)
        drain_s = time.monotonic() - started
        stop.set()
        thread.join()
        # What killed attempts left in the store before the periodic scheduler's stray sweep
        # (core/strays.py) ran over their jobs; then wait for the sweep to pass the last job.
        strays_at_drain = audit(database, settings.artifacts, jobs)["stray_output_files"]
        with database.read() as s:
            last_end = s.scalar(select(func.max(Job.finished_at)).where(Job.id.in_(ids)))
        swept_by = (last_end or utcnow()) + STRAY_GRACE + timedelta(seconds=2 * 5)
        while utcnow() < swept_by:
            time.sleep(1)
        client = redis.Redis(unix_socket_path=str(settings.embedded_redis_socket))
        children = {
            k.decode(): json.loads(v) for k, v in client.hgetall("genq:stack:children").items()
        }
        client.close()
        result = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "db": "postgres",
            "chaos_every_s": args.chaos_every,
            "chaos_for_s": args.chaos_for,
            "faults": dict(Counter(e["fault"] for e in chaos.log)),
            "restarts": {k: v["restarts"] for k, v in children.items()},
            "submit_s": round(submitted_s, 1),
            "drain_s": round(drain_s, 1),
            "stray_output_files_at_drain": strays_at_drain,
            **audit(database, settings.artifacts, jobs),
        }
        database.dispose()
    finally:
        stop.set()
        try:
            code, alive = stack.stop()
            result["clean_stop"] = code == 0 and not alive
        except Exception:
            result["clean_stop"] = False
        stack.kill()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    print(json.dumps(result, indent=2))
    write_result("soak", {**result, "chaos": chaos.log})


if __name__ == "__main__":
    main()
