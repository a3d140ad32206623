"""The retention pass (core/retention.py) on SQLite and PostgreSQL, with the artifact store in
a local folder and in a real S3 server (moto_server): it frees what has outlived its tenant's
retention and nothing else, counted in files (on disk, in the bucket) and rows before and
after; it never deletes a registered model's weights; it works in bounded batches; it audits
and counts what it freed. Also the periodic scheduler's call of it, and the stray sweep
(core/strays.py) that deletes output files no artifact row names."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from core.artifacts import ArtifactStore
from core.catalog import ensure_builtins, register_model
from core.db import Database
from core.deletion import disk_use, read_counters
from core.keys import get_or_create_tenant
from core.retention import Retention
from core.settings import Settings
from core.states import JobState
from core.strays import GRACE, StraySweep
from core.tables import Artifact, AuditEntry, Job, JobEvent, Model, Tenant, utcnow

DAY = timedelta(days=1)


@dataclass
class World:
    settings: Settings
    database: Database
    store: ArtifactStore
    tenants: dict[str, str]  # name -> id

    def job(
        self,
        tenant: str,
        age_days: float,
        *,
        state: str = JobState.SUCCEEDED,
        outputs: int = 2,
        events: int = 3,
        kind: str = "generate",
        checkpoint: bool = False,
        model_folder: bool = False,
    ) -> str:
        """A job that finished `age_days` ago (or is waiting), with its files and rows."""
        tenant_id = self.tenants[tenant]
        finished = state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED)
        with self.database.transaction() as session:
            job = Job(
                tenant_id=tenant_id,
                kind=kind,
                state=state,
                queue="generate" if kind == "generate" else "train",
                family="echo" if kind == "generate" else "charlm",
                params={},
                finished_at=utcnow() - age_days * DAY if finished else None,
            )
            session.add(job)
            session.flush()
            job_id = job.id
            for n in range(events):
                session.add(JobEvent(job_id=job_id, type="log", data={"message": f"line {n}"}))
        for n in range(outputs):
            data = f"{job_id}-{n}".encode()
            stored = self.store.write_output(tenant_id, job_id, f"out-{n}.txt", data)
            with self.database.transaction() as session:
                session.add(
                    Artifact(
                        job_id=job_id,
                        tenant_id=tenant_id,
                        name=f"out-{n}.txt",
                        kind="text",
                        path=stored.path,
                        content_type="text/plain",
                        size_bytes=stored.size_bytes,
                        sha256=hashlib.sha256(data).hexdigest(),
                    )
                )
        if checkpoint:
            self.store.put_bytes(f"{self.store.checkpoint_prefix(job_id)}/step-1.pt", b"c" * 50)
        if model_folder:
            self.store.put_bytes(f"{self.store.model_dir(job_id)}/model.safetensors", b"w" * 70)
        return job_id

    def register(self, tenant: str, job_id: str, name: str) -> str:
        with self.database.transaction() as session:
            model = register_model(
                session,
                tenant_id=self.tenants[tenant],
                name=name,
                family="charlm",
                path=self.store.model_dir(job_id),
                job_id=job_id,
            )
            return model.id

    def count(self, table: Any, *where: Any) -> int:
        with self.database.read() as session:
            stmt = sa.select(sa.func.count()).select_from(table)
            return int(session.scalar(stmt.where(*where)) or 0)

    def files(self, prefix: str = "") -> set[str]:
        """Every object key in the store (under `prefix`)."""
        found: set[str] = set()
        for top in ("outputs", "checkpoints", "models", "datasets"):
            found |= {k for k, _ in self.store.list(top)}
        return {k for k in found if k.startswith(prefix)}


def bucket_keys(store: ArtifactStore) -> set[str]:
    """The objects in the bucket as S3 itself lists them (not through genq's store)."""
    import boto3

    backend: Any = store.backend
    client = boto3.client("s3")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=backend.bucket)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


@pytest.fixture(params=["local", "s3"])
def world(request: pytest.FixtureRequest, database_url: str, tmp_path: Path) -> Iterator[World]:
    store_settings: dict[str, Any] = {"artifact_root": tmp_path / "artifacts"}
    if request.param == "s3":
        store_settings["artifact_url"] = request.getfixturevalue("s3_url")
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        var_dir=tmp_path,
        database_url=database_url,
        retain_outputs_days=7,
        retain_events_days=None,
        retain_jobs_days=None,
        retention_batch_size=3,
        **store_settings,
    )
    database = Database(settings)
    with database.transaction() as session:
        ensure_builtins(session)
        tenants = {n: get_or_create_tenant(session, n).id for n in ("acme", "globex", "keeper")}
        session.get_one(Tenant, tenants["keeper"]).retain_outputs_days = 0  # forever
    yield World(settings, database, ArtifactStore.from_settings(settings), tenants)
    database.dispose()


def test_expired_outputs_go_and_nothing_else(world: World) -> None:
    old = [world.job("acme", 10) for _ in range(4)]  # more than one batch of 3
    fresh = world.job("acme", 2)
    waiting = world.job("acme", 0, state=JobState.QUEUED)
    kept_forever = world.job("keeper", 30)
    # An old training job whose model is registered, and a failed one that left a model folder
    # no version loads from.
    trained = world.job("globex", 10, kind="train", checkpoint=True, model_folder=True)
    model_id = world.register("globex", trained, "poet")
    failed = world.job(
        "globex", 10, state=JobState.FAILED, kind="train", checkpoint=True, model_folder=True
    )
    files_before = world.files()
    assert len(files_before) == 2 * 9 + 4  # two outputs a job, and the training folders
    if not world.store.is_local:
        assert len(bucket_keys(world.store)) == len(files_before)
    artifacts_before = world.count(Artifact)

    freed = Retention(world.settings, world.database, world.store).run()

    gone = {f for f in files_before if any(j in f for j in [*old, trained, failed])}
    gone -= {f for f in gone if f.startswith(world.store.model_dir(trained))}
    assert world.files() == files_before - gone
    if not world.store.is_local:
        assert len(bucket_keys(world.store)) == len(files_before) - len(gone)
    # The registered version's weights stay; the unregistered folder and checkpoints went.
    assert world.files(world.store.model_dir(trained))
    assert not world.files(world.store.model_dir(failed))
    assert not world.files(world.store.checkpoint_prefix(trained))
    for job_id in (fresh, waiting, kept_forever):
        assert len([f for f in world.files("outputs/") if job_id in f]) == 2
    assert world.count(Artifact) == artifacts_before - 2 * 6
    assert world.count(Job) == 9 and world.count(JobEvent) == 9 * 3  # rows and events stay
    assert world.count(Model, Model.id == model_id) == 1
    purged = Job.outputs_purged_at.is_not(None)
    assert world.count(Job, purged) == 6
    assert freed.files == len(gone) and freed.artifacts == 12 and freed.jobs == 0
    outputs = sum(len(f"{j}-{n}") for j in [*old, trained, failed] for n in (0, 1))
    assert freed.bytes == outputs + 2 * 50 + 70  # two checkpoints, one unregistered model

    with world.database.read() as session:
        entry = session.scalars(
            sa.select(AuditEntry).where(AuditEntry.action == "retention.purge")
        ).one()
        counters = read_counters(session)["retention"]
    assert entry.detail["files"] == freed.files and entry.detail["bytes"] == freed.bytes
    assert counters["files"] == freed.files and counters["runs"] == 1

    # A second pass finds nothing more.
    again = Retention(world.settings, world.database, world.store).run()
    assert again.files == 0 and again.artifacts == 0 and world.files() == files_before - gone


def test_jobs_and_events_expire_in_bounded_batches(world: World) -> None:
    tenant = world.tenants["acme"]
    with world.database.transaction() as session:
        acme = session.get_one(Tenant, tenant)
        acme.retain_events_days, acme.retain_jobs_days = 3, 20
    for_events = [world.job("acme", 5, outputs=0, events=4) for _ in range(5)]
    for_rows = [world.job("acme", 25, outputs=1) for _ in range(7)]  # 7 > the batch of 3
    fresh = world.job("acme", 1, outputs=1, events=2)
    trained = world.job("acme", 25, kind="train", model_folder=True, outputs=0)
    world.register("acme", trained, "poet")
    running = world.job("acme", 0, state=JobState.RUNNING, events=2)
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE FROM JOB "):
            statements.append(statement)

    sa.event.listen(world.database.engine, "before_cursor_execute", seen)
    try:
        freed = Retention(world.settings, world.database, world.store).run()
    finally:
        sa.event.remove(world.database.engine, "before_cursor_execute", seen)

    assert freed.jobs == 8  # the 7 and the training job, whose model stays
    assert len(statements) >= 3  # ceil(8 / 3) batches
    assert world.count(Job) == 5 + 1 + 1
    assert world.count(JobEvent, JobEvent.job_id.in_(for_events)) == 0
    assert world.count(JobEvent, JobEvent.job_id == fresh) == 2
    assert world.count(JobEvent, JobEvent.job_id == running) == 2
    assert not any(j in f for f in world.files() for j in for_rows)
    assert world.files(world.store.model_dir(trained))  # the registered version's weights
    assert world.count(Model, Model.name == "poet") == 1
    assert freed.events == 5 * 4 + 7 * 3 + 3


def test_models_are_measured_for_disk_use(world: World) -> None:
    trained = world.job("acme", 1, kind="train", model_folder=True, outputs=1)
    world.register("acme", trained, "poet")
    Retention(world.settings, world.database, world.store).run()
    with world.database.read() as session:
        use = disk_use(session, [world.tenants["acme"]])[world.tenants["acme"]]
        assert session.scalar(sa.select(Model.size_bytes).where(Model.name == "echo")) == 0
    assert use["models_bytes"] == 70
    assert use["outputs_bytes"] == len(f"{trained}-0")


def test_without_retention_nothing_is_deleted(world: World, tmp_path: Path) -> None:
    settings = world.settings.model_copy(update={"retain_outputs_days": None})
    old = world.job("acme", 3650)
    before = world.files()
    freed = Retention(settings, world.database, world.store).run()
    assert freed.files == 0 and world.files() == before and any(old in f for f in before)
    with world.database.read() as session:
        entries = session.scalars(sa.select(AuditEntry)).all()
    assert entries == []  # nothing is set: the pass only measured


def test_the_periodic_scheduler_runs_the_pass(world: World, redis_db_url: str) -> None:
    import threading
    import time

    from scheduler.enqueue import Publisher
    from scheduler.periodic import Periodic

    settings = world.settings.model_copy(update={"redis_url": redis_db_url})
    old = world.job("acme", 10)
    publisher = Publisher(settings)
    stop = threading.Event()
    loop = threading.Thread(
        target=Periodic(settings, world.database, publisher).run_forever, args=(stop,)
    )
    loop.start()
    try:
        deadline = time.monotonic() + 60
        while world.count(AuditEntry, AuditEntry.action == "retention.purge") == 0:
            assert time.monotonic() < deadline, "no retention pass within a minute"
            time.sleep(0.1)
    finally:
        stop.set()
        loop.join(timeout=30)
        publisher.close()
    assert not loop.is_alive()
    assert not any(old in f for f in world.files())
    assert world.count(Artifact, Artifact.job_id == old) == 0


def test_retention_days_count_from_the_end_of_the_job(world: World) -> None:
    # Finished 6.9 days ago against 7 days kept: stays; a retried job's earlier end is gone.
    almost = world.job("acme", 6.9)
    freed = Retention(world.settings, world.database, world.store).run(now=utcnow())
    assert freed.files == 0 and any(almost in f for f in world.files())
    later: datetime = utcnow() + timedelta(hours=3)
    freed = Retention(world.settings, world.database, world.store).run(now=later)
    assert freed.files == 2


def test_the_stray_sweep_deletes_files_no_row_names(world: World) -> None:
    """What an attempt whose worker was killed wrote (a whole file, or a temporary one cut off
    mid-write) is deleted once its job has finished and the grace has passed; the job's
    recorded outputs and the files of jobs still running or just finished stay."""
    tenant = world.tenants["acme"]
    done = world.job("acme", 0.01)  # finished about a quarter of an hour ago
    recent = world.job("acme", 0)  # finished just now: within the grace
    running = world.job("acme", 0, state=JobState.RUNNING)
    strays = {
        job: world.store.write_output(tenant, job, "output.txt", b"stale", attempt="dead").path
        for job in (done, recent, running)
    }
    half = world.store.local_path(f"outputs/{tenant}/{done}/dead")
    if half is not None:  # a writer killed mid-write leaves its temporary file (hidden by list)
        (half / ".output.txt.x1y2.tmp").write_bytes(b"hal")
    before = world.files()
    if not world.store.is_local:
        assert len(bucket_keys(world.store)) == len(before)
    recorded = world.count(Artifact)

    sweep = StraySweep(world.database, world.store)
    freed = sweep.run()

    assert world.files() == before - {strays[done]}
    assert len([f for f in world.files() if done in f]) == 2  # its two recorded outputs
    if half is not None:
        assert not half.exists()  # the attempt's folder went with its temporary file
    else:
        assert len(bucket_keys(world.store)) == len(before) - 1
    assert freed.files == (2 if half is not None else 1)
    assert freed.bytes == len(b"stale") + (3 if half is not None else 0)
    assert world.count(Artifact) == recorded

    # Past the grace the just-finished job is swept too; the running one never is.
    sweep.run(now=utcnow() + 2 * GRACE)
    assert world.files() == before - {strays[done], strays[recent]}
    assert strays[running] in world.files()
