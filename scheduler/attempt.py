"""What one attempt at a job works with: the claim a broker message makes (`claim_for_token`),
the job as read right after it (`JobSnapshot`, `read_snapshot`), and the worker's shared
parts that the runner, the outcome rules, the token handling and the event recorder all use
(`WorkerParts`, which `Runner` provides).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from core.artifacts import ArtifactStore
from core.db import Database
from core.errors import GenqError
from core.fairness import claim_next
from core.inputfiles import resolve_input
from core.leases import ClaimedModel, Lease, claimed_model
from core.quotas import TenantLimits
from core.settings import Settings
from core.statements import Prepared
from core.states import JobKind
from core.tables import Dataset, Job, Model, Tenant
from scheduler.enqueue import RAY_QUEUES, Publisher
from workers.registry import get_family

# The queues that hold jobs (a message's queue hint is used only when it names one of them).
JOB_QUEUES = frozenset(RAY_QUEUES)


class WorkerParts(Protocol):
    """One per Celery worker process, shared by its task threads."""

    settings: Settings
    database: Database
    publisher: Publisher
    store: ArtifactStore
    # Set when the worker shuts down: running attempts give their jobs back at once.
    stopping: threading.Event


@dataclass
class JobSnapshot:
    """What the runner needs of the job row, read once right after the claim."""

    id: str
    tenant_id: str
    kind: JobKind
    family: str
    queue: str
    priority: int
    params: dict[str, Any]
    target_name: str | None
    model_id: str | None = None
    model_path: str | None = None
    model_config: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] | None = None
    dataset_id: str | None = None
    timeout_s: float | None = None
    num_gpus: float | None = None
    gpu_memory_gb: float | None = None
    # The tenant has a running cap or a budget: its held jobs may need a token when this ends.
    has_quota: bool = False
    # X-Request-ID of the submission (log lines carry it).
    request_id: str | None = None
    # A generate job on an adapter version (config `served_by_base`) runs on its base model's
    # servers: the base's id, path and config, and the adapter {"id", "path"} sent per job.
    serve_model_id: str | None = None
    serve_model_path: str | None = None
    serve_model_config: dict[str, Any] = field(default_factory=dict)
    adapter: dict[str, str] | None = None
    # Input files the params name (Family.input_fields): param -> key in the artifact store.
    input_keys: dict[str, str] = field(default_factory=dict)
    input_error: GenqError | None = None


# What the snapshot takes of a model: its columns, not the ORM object (the claim's
# transaction reads it once per job, and an entity's load costs several times the row's).
_MODEL_ROW = Prepared(
    select(Model.id, Model.path, Model.config, Model.parent_id).where(
        Model.id == bindparam("model_id")
    )
)


# The queue of the job a broker message names (the runner's claim; bench/claim_finish_cost.py).
QUEUE_OF = Prepared(select(Job.queue).where(Job.id == bindparam("job_id")))


class _HintMissedError(Exception):
    """The queue a message came from is not its job's: the claim made by it is undone."""


@dataclass
class Claim:
    """What a broker message's token started: the queue of the job it names (None: there is
    no such job), and the lease and snapshot of the job it claimed (None: none could start)."""

    queue: str | None
    lease: Lease | None = None
    snapshot: JobSnapshot | None = None


def claim_for_token(
    database: Database, job_id: str, queue_hint: str | None, *, lease_ttl_s: float
) -> Claim:
    """The claim a message for `job_id` makes (core/fairness.py), with the snapshot of the job
    it claimed, in one transaction. `queue_hint`: the queue the message came from, which the
    claim uses instead of reading the job's: usually the claimed job is the message's own,
    which proves the hint right. Otherwise the job's queue is read; a hint that names another
    queue (broker input may be hostile) has its claim rolled back, and the job's queue is
    used as when no hint comes. A hint that names no queue of jobs is not used at all."""
    if queue_hint in JOB_QUEUES:
        try:
            return _claim(database, job_id, queue_hint, lease_ttl_s)
        except _HintMissedError:
            pass
    return _claim(database, job_id, None, lease_ttl_s)


def _claim(database: Database, job_id: str, hint: str | None, lease_ttl_s: float) -> Claim:
    with database.transaction() as session:
        conn = session.connection()  # plain reads: nothing is pending in a new transaction
        queue = hint or QUEUE_OF.run(conn, {"job_id": job_id}).scalar()
        if queue is None:
            return Claim(None)
        limits: dict[str, TenantLimits] = {}
        lease = claim_next(session, queue, lease_ttl_s=lease_ttl_s, limits_seen=limits)
        # The message's own job claimed: its queue is the hint. Otherwise the job's is read.
        is_own = lease is not None and lease.job_id == job_id
        if (
            hint is not None
            and not is_own
            and hint != QUEUE_OF.run(conn, {"job_id": job_id}).scalar()
        ):
            raise _HintMissedError(job_id)
        if lease is None:
            return Claim(queue)
        model = claimed_model(session, lease)
        return Claim(queue, lease, read_snapshot(session, lease.job_id, limits, model))


def read_snapshot(
    session: Session,
    job_id: str,
    limits: Mapping[str, TenantLimits] | None = None,
    model: ClaimedModel | None = None,
) -> JobSnapshot:
    """The claimed job, its model (or the base that serves an adapter), its data set, whether
    its tenant has quotas, and the store keys of its input files, in the claim's transaction.
    `limits`: the tenants' limits as the claim read them (core.fairness.claim_next's
    `limits_seen`); without them the tenant's row is read. `model`: the job's model as the
    claim read it (core.leases.claimed_model); without it the model's row is read."""
    job = session.get(Job, job_id)  # the claim loaded it
    assert job is not None
    snap = JobSnapshot(
        id=job.id,
        tenant_id=job.tenant_id,
        kind=JobKind(job.kind),
        family=job.family,
        queue=job.queue,
        priority=job.priority,
        params=dict(job.params),
        target_name=job.target_name,
        model_id=job.model_id,
        dataset_id=job.dataset_id,
        timeout_s=job.timeout_s,
        num_gpus=job.num_gpus,
        gpu_memory_gb=job.gpu_memory_gb,
        request_id=job.request_id,
    )
    if limits is not None and job.tenant_id in limits:
        lim = limits[job.tenant_id]
        snap.has_quota = lim.max_running is not None or lim.gpu_seconds_budget is not None
    else:
        tenant = session.get(Tenant, job.tenant_id)
        snap.has_quota = tenant is not None and (
            tenant.max_running is not None or tenant.gpu_seconds_budget is not None
        )
    if job.model_id:
        # Plain reads on the connection: the ORM's handling of a Session read cost more than
        # the statement (nothing pending in the claim's transaction changes a model row).
        conn = session.connection()
        if model is None:
            model = ClaimedModel(*_MODEL_ROW.run(conn, {"model_id": job.model_id}).one())
        snap.model_path = model.path
        snap.model_config = dict(model.config or {})
        snap.serve_model_id, snap.serve_model_path = model.id, model.path
        snap.serve_model_config = snap.model_config
        base = (
            _MODEL_ROW.run(conn, {"model_id": model.parent_id}).first() if model.parent_id else None
        )
        if snap.model_config.get("served_by_base") and base is not None:
            snap.serve_model_id, snap.serve_model_path = base.id, base.path
            snap.serve_model_config = dict(base.config or {})
            snap.adapter = {"id": model.id, "path": model.path or ""}
    if snap.kind == JobKind.GENERATE:
        try:
            for name in get_family(job.family).input_fields:
                if isinstance(ref := snap.params.get(name), str):
                    snap.input_keys[name] = resolve_input(
                        session, job.tenant_id, ref, f"params.{name}"
                    )
        except GenqError as exc:  # deleted since submit: the attempt fails on it
            snap.input_error = exc
    if job.dataset_id:
        ds = session.get(Dataset, job.dataset_id)
        assert ds is not None
        # `path`: the data set's key in the store; the trainer fetches it where it runs.
        snap.dataset = {"name": ds.name, "kind": ds.kind, "path": ds.path}
    return snap
