"""What several benchmarks share: a scratch PostgreSQL database made for one run and dropped
after it, the in-process setup of the benchmarks that time the job path's transactions
(`EchoJobs`), and the JSON file a run leaves in bench/results/ (named as bench/report.py reads it:
`<kind>-<UTC time>.json`, `<kind>-before-<UTC time>.json` for a baseline run)."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

RESULTS = Path(__file__).resolve().parent / "results"


def _admin(server_url: str) -> sa.Engine:
    # CREATE/DROP DATABASE cannot run inside a transaction.
    url = sa.engine.make_url(server_url).set(drivername="postgresql+psycopg")
    return sa.create_engine(url, isolation_level="AUTOCOMMIT")


@contextmanager
def scratch_postgres(server_url: str, prefix: str = "genq_bench") -> Iterator[str]:
    """A new, empty database on the PostgreSQL server of `server_url` (any database URL of that
    server, with credentials that may create databases): yields its URL and drops it afterwards,
    even with connections still open (a run that failed half-way)."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = _admin(server_url)
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        try:
            yield sa.engine.make_url(server_url).set(database=name).render_as_string(False)
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@dataclass
class EchoJobs:
    """A migrated database (a temporary SQLite file, or `database_url`), an artifact store
    beside it, the tenant `bench` and the `echo` job to create again and again, with the
    one-byte output its finish records."""

    database: Any
    store: Any
    tenant_id: str
    new: Any  # core.jobs.NewJob
    output: Any  # core.events.Output

    @classmethod
    def make(cls, database_url: str | None, prefix: str) -> EchoJobs:
        import tempfile

        import migrations
        from core.artifacts import ArtifactStore
        from core.catalog import ensure_builtins, resolve_model
        from core.db import Database
        from core.events import Output
        from core.jobs import NewJob
        from core.keys import get_or_create_tenant
        from core.settings import Settings
        from core.states import JobKind

        tmp = Path(tempfile.mkdtemp(prefix=prefix))
        settings = Settings(var_dir=tmp / "var", database_url=database_url)
        migrations.upgrade(settings)
        database = Database(settings)
        with database.transaction() as session:
            ensure_builtins(session)
            tenant_id = get_or_create_tenant(session, "bench").id
            model_id = resolve_model(session, tenant_id, "echo").id
        new = NewJob(
            tenant_id=tenant_id,
            kind=JobKind.GENERATE,
            family="echo",
            queue="generate",
            params={"message": "x"},
            model_id=model_id,
        )
        output = Output("output.txt", "text", "text/plain; charset=utf-8", b"x")
        return cls(database, ArtifactStore(tmp / "artifacts"), tenant_id, new, output)

    def create(self) -> str:
        """A new queued `echo` job; its id."""
        from core.jobs import create_job

        with self.database.transaction() as session:
            job, _ = create_job(session, self.new)
        return str(job.id)

    def store_output(self, lease: Any) -> Any:
        """The job's output file, written as the runner writes it before the finish."""
        return self.store.write_output(
            self.tenant_id, lease.job_id, self.output.name, self.output.data, lease.token
        )

    def finish(self, lease: Any, stored: Any) -> None:
        """The transaction that ends a generate job as the runner writes it: its placement,
        its output and the finish (with the tenant's usage)."""
        try:
            from core.leases import finish_job
            from core.recording import record_output, record_placement
        except ImportError:  # a checkout from before core/jobs.py was split
            from core.jobs import finish_job, record_output, record_placement  # type: ignore
        from core.states import JobState

        with self.database.transaction() as session:
            record_placement(session, lease, {"node": "bench"})
            record_output(session, lease, self.output, stored)
            finish_job(session, lease, JobState.SUCCEEDED, metrics={"load_s": 0.0})


def write_result(kind: str, result: dict[str, Any], *, before: bool = False) -> Path:
    """Save one run's figures as bench/results/<kind>[-before]-<UTC time>.json and say where."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%S")
    path = RESULTS / f"{kind}{'-before' if before else ''}-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to bench/results/{path.name}")
    return path


def machine_busy_s() -> float:
    """The CPU-seconds all CPUs have spent busy since boot: /proc/stat's user, nice, system,
    irq, softirq and steal (idle and iowait left out; guest time is already in user and nice)."""
    with open("/proc/stat") as stat:
        ticks = [int(v) for v in stat.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def checkouts_of(items: list[str] | None, current: Path) -> dict[str, Path]:
    """The trees of code a side-by-side benchmark runs, by name, from its `--checkout NAME=PATH`
    options (e.g. `before=/tmp/main-tree current=.`); none given: `current`, this one."""
    if not items:
        return {"current": current}
    return {name: Path(path).resolve() for name, _, path in (i.partition("=") for i in items)}


def wait_for_workers(stack: Any, count: int, timeout_s: float = 180) -> None:
    """Until `count` genq worker processes of `stack` (a tests.support.stackproc.StackProcess)
    consume the generate queue: readiness counts their heartbeats."""
    deadline = time.monotonic() + timeout_s
    while True:
        parts = stack.call("GET", "/v1/health/ready").json().get("parts", {})
        if parts.get("workers", {}).get("queues", {}).get("generate", {}).get("workers") == count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} genq workers did not all start: {parts}")
        time.sleep(0.2)
