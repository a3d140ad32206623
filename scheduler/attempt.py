"""What one attempt at a job works with: the job as read right after its claim (`JobSnapshot`,
`read_snapshot`), and the worker's shared parts that the runner, the outcome rules, the token
handling and the event recorder all use (`WorkerParts`, which `Runner` provides).

This is a leaf of the scheduler's runner modules: runner.py, tokens.py, outcomes.py and
recorder.py import it, it imports none of them.
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
from core.inputfiles import resolve_input
from core.quotas import TenantLimits
from core.settings import Settings
from core.states import JobKind
from core.tables import Dataset, Job, Model, Tenant
from scheduler.enqueue import Publisher
from workers.registry import get_family


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
_MODEL_ROW = select(Model.id, Model.path, Model.config, Model.parent_id).where(
    Model.id == bindparam("model_id")
)


def read_snapshot(
    session: Session, job_id: str, limits: Mapping[str, TenantLimits] | None = None
) -> JobSnapshot:
    """The claimed job, its model (or the base that serves an adapter), its data set, whether
    its tenant has quotas, and the store keys of its input files, in the claim's transaction.
    `limits`: the tenants' limits as the claim read them (core.fairness.claim_next's
    `limits_seen`); without them the tenant's row is read."""
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
        model = session.execute(_MODEL_ROW, {"model_id": job.model_id}).one()
        snap.model_path = model.path
        snap.model_config = dict(model.config or {})
        snap.serve_model_id, snap.serve_model_path = model.id, model.path
        snap.serve_model_config = snap.model_config
        base = (
            session.execute(_MODEL_ROW, {"model_id": model.parent_id}).first()
            if model.parent_id
            else None
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
