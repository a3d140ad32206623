"""The fault-injection harness (tests/faults/; its fixtures `ray_head` and `cluster` are in
tests/faults/conftest.py): a real Ray head (one per module, token auth, one declared GPU), and per
test a fresh database, the test's own Redis database, the API in this process, and `genq worker` /
`genq scheduler` subprocesses that a test can SIGKILL, SIGSTOP and restart, each in its own process
group. Leases, heartbeats, reaping and backoff are shortened so that a crash is recovered in
seconds."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis
from flask.testing import FlaskClient
from sqlalchemy import Engine

from api.app import create_app
from core.db import Database
from core.settings import Settings
from core.tables import Artifact, Job, JobEvent
from scheduler.enqueue import Publisher
from scheduler.heartbeats import SEEN_KEY
from stack.supervisor import Stack, bootstrap
from tests.support.recovery import FAST_RECOVERY, wait_until

ROOT = Path(__file__).resolve().parents[2]
TERMINAL = {"succeeded", "failed", "canceled"}

# Short enough that a crash is recovered in seconds, consistent for check_settings.
FAST = {
    **FAST_RECOVERY,
    "GENQ_CANCEL_GRACE_S": "3",
    "GENQ_WORKER_CONCURRENCY": "2",
    "GENQ_WEBHOOK_ALLOW_PRIVATE": "true",
    "GENQ_WEBHOOK_TIMEOUT_S": "2",
    "GENQ_WEBHOOK_BACKOFF_BASE_S": "0.2",
    "GENQ_WEBHOOK_POLL_S": "0.3",
    "GENQ_SECRET_KEY": "fault-tests",
    "GENQ_MAX_ATTEMPTS": "3",
}


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0; it is dead for our purposes.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
            return False
    return True


def group_pids(pgid: int) -> set[int]:
    """The live processes of a process group."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                pids.add(int(stat.parent.name))
    return pids


def file_locks() -> list[tuple[int, int]]:
    """(PID, inode) of each file lock held on this machine (/proc/locks; waiters excluded)."""
    held = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields:
            continue
        held.append((int(fields[4]), int(fields[5].rsplit(":", 1)[1])))
    return held


def in_transaction(pids: set[int], database_url: str, engine: Engine | None) -> bool:
    """Whether one of `pids` is inside a database transaction: holds SQLite's writer lock
    (core/db.py's WriterQueue: flock on `<database>.lock`), or has a PostgreSQL session with a
    transaction open (`engine` asks the server)."""
    if database_url.startswith("sqlite:///"):
        lock = os.stat(database_url[len("sqlite:///") :] + ".lock").st_ino
        return any(pid in pids and inode == lock for pid, inode in file_locks())
    assert engine is not None
    ports = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            ports |= {c.laddr.port for c in psutil.Process(pid).net_connections("tcp")}
    with engine.connect() as conn:
        sessions = conn.exec_driver_sql(
            "SELECT client_port FROM pg_stat_activity"
            " WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid()"
        )
        return any(port in ports for (port,) in sessions)


def freeze(pgid: int, database_url: str, engine: Engine | None = None) -> None:
    """SIGSTOP a process group at a moment when none of it is inside a database transaction,
    and prove it. A process frozen inside one holds its locks (SQLite's writer lock, the job's
    row on PostgreSQL) and blocks the very writes that would fence it: genq recovers a hang
    between transactions, which are milliseconds long (docs/reliability.md). Stopped inside
    one, the group is let go and stopped again."""
    for _ in range(200):
        os.killpg(pgid, signal.SIGSTOP)
        if not in_transaction(group_pids(pgid), database_url, engine):
            return
        os.killpg(pgid, signal.SIGCONT)
        time.sleep(0.02)
    raise AssertionError(f"process group {pgid} never stopped outside a database transaction")


@dataclass
class RayHead:
    stack: Stack
    var_dir: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            k: v
            for k, v in self.stack.env.items()
            if k.startswith("RAY_") or k == "GENQ_RAY_ADDRESS"
        }

    def actor_pids(self, *titles: bytes) -> set[int]:
        """PIDs of this head's Ray worker processes whose title starts with one of `titles`
        (`ray::ModelServer`...). Only this head's: each Ray process inherits the head's own
        auth token in its environment, so the processes of another Ray on the machine (another
        test run's) are never picked, and never signalled."""
        mark = f"RAY_AUTH_TOKEN={self.stack.env['RAY_AUTH_TOKEN']}".encode()
        pids = set()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if not (proc / "cmdline").read_bytes().startswith(titles):
                    continue
                environ = (proc / "environ").read_bytes().split(b"\0")
            except OSError:  # gone, or not ours to read
                continue
            if mark in environ:
                pids.add(int(proc.name))
        return pids

    def probe(self, job_id: str) -> dict[str, Any]:
        """Ask Ray (from a separate driver) whether the job's trainer lives, and the GPUs."""
        code = (
            "import json, ray, sys\n"
            "ray.init(address=sys.argv[1], namespace='genq', log_to_driver=False)\n"
            "try:\n    ray.get_actor(sys.argv[2]); alive = True\n"
            "except ValueError:\n    alive = False\n"
            "print(json.dumps({'trainer_alive': alive,"
            " 'gpu_total': ray.cluster_resources().get('GPU', 0),"
            " 'gpu_free': ray.available_resources().get('GPU', 0)}))\n"
        )
        return dict(json.loads(self.driver(code, f"trainer-{job_id}").splitlines()[-1]))

    def server_jobs(self) -> set[str]:
        """The jobs this head's model servers have in hand now (running or waiting there), asked
        from a separate driver."""
        code = (
            "import json, ray, sys\n"
            "ray.init(address=sys.argv[1], namespace='genq', log_to_driver=False)\n"
            "names = [n for n in ray.util.list_named_actors() if n.startswith('model-')]\n"
            "infos = ray.get([ray.get_actor(n).info.remote() for n in names], timeout=30)\n"
            "print(json.dumps(sorted({j for info in infos for j in info['active_jobs']})))\n"
        )
        return set(json.loads(self.driver(code).splitlines()[-1]))

    def driver(self, code: str, *args: str) -> str:
        """Run `code` as a separate Ray driver of this head (python -c; sys.argv[1] is the
        head's address, then `args`) and return what it printed; it must exit 0."""
        out = subprocess.run(
            [sys.executable, "-c", code, self.env["GENQ_RAY_ADDRESS"], *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout.strip()

    @contextlib.contextmanager
    def holding_every_gpu(self, log: Path) -> Iterator[None]:
        """Hold all of this head's GPUs from a separate driver (an actor that asks for them
        all) until the block ends, so that a trainer that needs a GPU share waits for one;
        leaving the block kills that driver, and Ray hands the GPUs back."""
        code = (
            "import ray, sys\n"
            "ray.init(address=sys.argv[1], namespace='genq-test-holder', log_to_driver=False)\n"
            "gpus = ray.cluster_resources().get('GPU', 0)\n"
            "@ray.remote(num_gpus=gpus, num_cpus=0)\n"
            "class Holder:\n    def ready(self):\n        return True\n"
            "holder = Holder.remote()\nray.get(holder.ready.remote())\n"
            "print('holding', gpus, flush=True)\nsys.stdin.read()\n"
        )
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-c", code, self.env["GENQ_RAY_ADDRESS"]],
                env={**os.environ, **self.env},
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_until(
                lambda: "holding" in log.read_text() or process.poll() is not None, 120, "the GPUs"
            )
            assert process.poll() is None, log.read_text()[-3000:]
            yield
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)


@contextlib.contextmanager
def running_ray_head(var_dir: Path, node_env: dict[str, str] | None = None) -> Iterator[RayHead]:
    """A Ray head for the block (a module fixture's): four CPUs and one GPU, declared only (it
    proves that a GPU share is given back), its state in `var_dir`; its node's environment is
    this process's without GENQ_* settings, plus `node_env`."""
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        var_dir=var_dir,
        ray_num_cpus=4,
        ray_num_gpus=1,
    )
    stack = Stack(settings)
    stack.env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    stack.env.update(node_env or {})
    stack.start_ray()
    try:
        yield RayHead(stack, var_dir)
    finally:
        stack.stop()


@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Cluster:
    """One test's genq: the database, the test's own Redis database, the API in-process,
    worker and scheduler subprocesses on the module's Ray head."""

    tmp: Path
    database_url: str
    ray: RayHead
    redis_url: str
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    admin_key: str = ""

    def __post_init__(self) -> None:
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("GENQ_")},
            **self.ray.env,
            **FAST,
            "GENQ_VAR_DIR": str(self.tmp / "var"),
            "GENQ_DATABASE_URL": self.database_url,
            "GENQ_REDIS_URL": self.redis_url,
            "GENQ_ARTIFACT_ROOT": str(self.tmp / "artifacts"),
            **self.extra_env,
        }
        self.settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            **{k[5:].lower(): v for k, v in self.env.items() if k.startswith("GENQ_")},
        )
        self.broker = redis.Redis.from_url(self.redis_url)
        self.broker.flushdb()
        key = bootstrap(self.settings)
        assert key is not None
        self.admin_key = key
        self.database = Database(self.settings)
        self.publisher = Publisher(self.settings)
        self.app = create_app(self.settings, database=self.database, publisher=self.publisher)
        self.client: FlaskClient = self.app.test_client()
        self.counter = 0

    # -- processes -------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> Proc:
        self.counter += 1
        log = self.tmp / f"{name}-{self.counter}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "stack.cli", *argv],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )
        proc = Proc(name, process, log)
        self.procs.append(proc)
        return proc

    def worker(self, wait: bool = True) -> Proc:
        proc = self._spawn("worker", ["worker", f"--hostname=w{self.counter + 1}@faults"])
        if wait:
            self.wait_ready(proc)
        return proc

    def wait_ready(self, proc: Proc) -> None:
        """Wait until a worker started with `worker(wait=False)` takes messages. A worker that
        exits or does not get ready fails the test with the ends of its log and of its Ray
        node's."""
        try:
            wait_until(lambda: "ready." in proc.text() or proc.process.poll() is not None, 90,
                       "the worker")  # fmt: skip
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.worker_logs(proc)}") from None
        assert proc.process.poll() is None, self.worker_logs(proc)

    def worker_logs(self, proc: Proc) -> str:
        node_log = self.tmp / "var" / "logs" / "ray-node.log"
        node = node_log.read_text(errors="replace")[-3000:] if node_log.exists() else "(none)"
        return f"worker log:\n{proc.text()[-3000:]}\nits Ray node's log ({node_log}):\n{node}"

    def scheduler(self) -> Proc:
        return self._spawn("scheduler", ["scheduler"])

    def kill(self, proc: Proc, sig: int = signal.SIGKILL) -> None:
        """Signal the process's whole group and, for SIGKILL, prove that it died."""
        os.killpg(proc.pid, sig)
        if sig == signal.SIGKILL:
            proc.process.wait(30)
            assert not is_alive(proc.pid)

    def freeze(self, proc: Proc) -> None:
        """SIGSTOP the process's group outside any database transaction (`freeze`)."""
        freeze(proc.pid, self.database_url, self.database.engine)

    def close(self) -> None:
        for proc in self.procs:
            if proc.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGCONT)
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.process.wait(30)
        self.publisher.close()
        self.database.dispose()
        self.broker.flushdb()
        self.broker.close()

    def wait_scheduler_rounds(self, count: int = 2, timeout_s: float = 60) -> None:
        """Wait until the periodic scheduler has finished `count` more rounds (reaping,
        reconciling): each finished round rewrites its heartbeat, at most once a second."""
        seen: list[bytes | None] = [self.broker.hget(SEEN_KEY, "scheduler")]

        def advanced() -> bool:
            now = self.broker.hget(SEEN_KEY, "scheduler")
            if now != seen[-1]:
                seen.append(now)
            return len(seen) > count

        wait_until(advanced, timeout_s, f"{count} rounds of the periodic scheduler")

    def logs(self) -> str:
        return "\n".join(f"--- {p.log.name}\n{p.text()[-4000:]}" for p in self.procs)

    # -- the API ---------------------------------------------------------------------------

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}

    def submit(self, body: dict[str, Any]) -> str:
        response = self.client.post("/v1/jobs", json=body, headers=self.auth())
        assert response.status_code == 202, response.get_data(as_text=True)
        return str(response.get_json()["id"])

    def upload_text(self, name: str, data: bytes) -> None:
        """Upload `data` as the text data set `name` (what a charlm training reads)."""
        form = {"name": name, "kind": "text", "file": (io.BytesIO(data), f"{name}.txt")}
        response = self.client.post(
            "/v1/datasets", data=form, headers=self.auth(), content_type="multipart/form-data"
        )
        assert response.status_code == 201, response.get_data(as_text=True)

    def get(self, job_id: str) -> dict[str, Any]:
        return dict(self.client.get(f"/v1/jobs/{job_id}", headers=self.auth()).get_json())

    def wait(
        self, job_id: str, timeout_s: float = 90, states: set[str] = TERMINAL
    ) -> dict[str, Any]:
        try:
            return dict(wait_until(lambda: (j := self.get(job_id))["state"] in states and j,
                                   timeout_s, f"job {job_id} to reach {states}"))  # fmt: skip
        except AssertionError:
            raise AssertionError(f"{self.get(job_id)}\n{self.logs()}") from None

    # -- what SQL says ---------------------------------------------------------------------

    def events(self, job_id: str, type_: str | None = None) -> list[JobEvent]:
        with self.database.transaction() as session:
            query = session.query(JobEvent).filter(JobEvent.job_id == job_id)
            if type_:
                query = query.filter(JobEvent.type == type_)
            return list(query.order_by(JobEvent.id))

    def claims(self, job_id: str) -> int:
        """How many attempts started: state events into running."""
        return sum(1 for e in self.events(job_id, "state") if e.data.get("to") == "running")

    def check_invariants(self, job_id: str) -> dict[str, Any]:
        """One terminal state, attempts within the cap, one row per output name, and no output
        file without its row."""
        job = self.get(job_id)
        assert job["state"] in TERMINAL
        assert job["attempt"] <= job["max_attempts"]
        assert self.claims(job_id) == job["attempt"]
        terminal = [e for e in self.events(job_id, "state") if e.data.get("to") in TERMINAL]
        assert len(terminal) == 1, [e.data for e in terminal]
        with self.database.transaction() as session:
            rows = session.query(Artifact).filter(Artifact.job_id == job_id).all()
            assert session.get(Job, job_id) is not None
            paths = {r.path for r in rows}
            names = [r.name for r in rows]
        assert len(names) == len(set(names))
        folder = self.settings.artifacts / "outputs"
        files = {
            str(p.relative_to(self.settings.artifacts))
            for p in folder.rglob("*")
            if p.is_file() and job_id in p.parts
        }
        assert files <= paths, files - paths
        return job
