"""The JSON the API returns for jobs, events, models and data sets. `job_payload` is the one
serializer of a job; `render_jobs` loads what it needs for a page of jobs in a few queries
(models, data sets, outputs, queue positions) and calls it for each.

Timestamps are ISO-8601 in UTC with a `Z`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast, overload

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from api import schemas
from core.eta import estimate_eta_s, mean_run_s, running_in
from core.jobs import priority_class
from core.positions import queue_order, queue_positions
from core.scaling import model_policy
from core.states import JobState
from core.tables import Artifact, Dataset, Job, JobEvent, Model

if TYPE_CHECKING:
    from api.polling import Figures

# The live workers' slot count, read from their Redis snapshots at most this often.
SLOTS_TTL_S = 5.0
_slots_cache: dict[int, tuple[float, int]] = {}


def worker_slots() -> int:
    """Task slots of the live Celery workers (their snapshots' concurrency), cached for a few
    seconds; without a snapshot (no worker yet, or no app) the configured concurrency."""
    import time

    from flask import has_app_context

    if not has_app_context():
        return 1
    from api.state import genq

    state = genq()
    at, slots = _slots_cache.get(id(state), (0.0, 0))
    if time.monotonic() - at < SLOTS_TTL_S:
        return slots
    slots = state.settings.worker_concurrency
    try:
        from scheduler.enqueue import read_snapshots

        found = sum(int(s.get("concurrency") or 0) for s in read_snapshots(state.publisher.redis))
        slots = found or slots
    except Exception:  # Redis unreachable: the configured figure
        pass
    _slots_cache[id(state)] = (time.monotonic(), slots)
    return slots


@overload
def iso(value: datetime) -> str: ...
@overload
def iso(value: datetime | None) -> str | None: ...
def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def artifact_url(artifact_id: str) -> str:
    return f"/v1/artifacts/{artifact_id}"


@dataclass
class JobContext:
    """What the job serializer needs beyond the row, loaded once for a page of jobs."""

    models: dict[str, Model] = field(default_factory=dict)
    datasets: dict[str, Dataset] = field(default_factory=dict)
    outputs: dict[str, list[Artifact]] = field(default_factory=lambda: defaultdict(list))
    queue_positions: dict[str, int] = field(default_factory=dict)
    eta_s: dict[str, float | None] = field(default_factory=dict)
    # With reused figures (api/polling.py): the monotonic time of the oldest one used.
    as_of: float = float("inf")

    def figure(self, figures: Figures | None, key: tuple[Any, ...], compute: Any) -> Any:
        """`compute()`, or the process's copy of it from `figures` (noting its age)."""
        if figures is None:
            return compute()
        value, at = figures.get(key, compute)
        self.as_of = min(self.as_of, at)
        return value


def queue_position(session: Session, job: Job) -> int:
    """How many queued jobs of the same queue will start before this one, in the order the
    scheduler claims them (priority, fair share between tenants, age: core/fairness.py)."""
    return queue_positions(session, [job]).get(job.id, 0)


def _estimates(
    session: Session,
    jobs: Sequence[Job],
    ctx: JobContext,
    slots: int,
    figures: Figures | None = None,
) -> None:
    """eta_s of the queued and running jobs: the model's mean run time, the queue's running
    jobs and the job's position drained through `slots` slots (core.fairness)."""
    means: dict[tuple[str | None, str], float | None] = {}
    running: dict[str, int] = {}
    now = datetime.now(UTC)
    for job in jobs:
        if job.state not in (JobState.QUEUED, JobState.RUNNING):
            continue
        key = (job.model_id, job.family)
        if key not in means:
            means[key] = ctx.figure(
                figures,
                ("mean_run_s", *key),
                lambda: mean_run_s(session, job.model_id, job.family),  # noqa: B023
            )
        mean = means[key]
        if job.state == JobState.RUNNING:
            if mean is not None and job.started_at is not None:
                left = mean - (now - job.started_at).total_seconds()
                ctx.eta_s[job.id] = round(max(0.0, left), 3)
            continue
        if job.queue not in running:
            running[job.queue] = ctx.figure(
                figures,
                ("running_in", job.queue),
                lambda: running_in(session, job.queue),  # noqa: B023
            )
        ctx.eta_s[job.id] = estimate_eta_s(
            position=ctx.queue_positions.get(job.id, 0),
            running=running[job.queue],
            slots=slots,
            mean_s=mean,
        )


# Built once: every job rendered runs them.
_MODELS = select(Model).where(Model.id.in_(bindparam("ids", expanding=True)))
_OUTPUTS = (
    select(Artifact)
    .where(Artifact.job_id.in_(bindparam("job_ids", expanding=True)))
    .order_by(Artifact.created_at)
)


def load_context(
    session: Session, jobs: Sequence[Job], slots: int = 1, figures: Figures | None = None
) -> JobContext:
    """`figures`: reuse the process's recent queue and model figures (api/polling.py)."""
    ctx = JobContext()
    model_ids = {i for j in jobs for i in (j.model_id, j.result_model_id) if i}
    if model_ids:
        for model in session.scalars(_MODELS, {"ids": list(model_ids)}):
            ctx.models[model.id] = model
    dataset_ids = {j.dataset_id for j in jobs if j.dataset_id}
    if dataset_ids:
        for dataset in session.scalars(select(Dataset).where(Dataset.id.in_(dataset_ids))):
            ctx.datasets[dataset.id] = dataset
    # A job that has never started has no outputs.
    job_ids = [j.id for j in jobs if j.attempt > 0]
    if job_ids:
        artifacts = session.scalars(_OUTPUTS, {"job_ids": job_ids})
        for artifact in artifacts:
            ctx.outputs[artifact.job_id].append(artifact)
    ctx.queue_positions = queue_positions(
        session,
        list(jobs),
        order_of=lambda queue: ctx.figure(
            figures, ("queue_order", queue), lambda: queue_order(session, queue)
        ),
    )
    _estimates(session, jobs, ctx, slots, figures)
    return ctx


def submitted_context(
    read: Callable[[], AbstractContextManager[Session]],
    job: Job,
    *,
    model: Model | None,
    dataset: Dataset | None,
    slots: int,
    figures: Figures,
    committed_at: float,
) -> JobContext:
    """`load_context` for a job just created, from what the submit already holds and the
    process's recent figures (api/polling.py): the model and data set it resolved, and the
    queue's order, the queue's running jobs and the model's mean run time as of at most the
    figures' age ago. A read transaction (`read()`) is opened only for a figure that is not
    fresh. The job's own line (its tenant's queued jobs of its priority, all older than it) is
    read from the order's counts, which include the job itself when they were computed after
    `committed_at` (time.monotonic() once its transaction committed)."""
    ctx = JobContext()
    if model is not None:
        ctx.models[model.id] = model
    if dataset is not None:
        ctx.datasets[dataset.id] = dataset
    if job.state not in (JobState.QUEUED, JobState.RUNNING):
        return ctx

    def figure(key: tuple[Any, ...], compute: Callable[[Session], Any]) -> tuple[Any, float]:
        def fresh() -> Any:
            with read() as session:
                return compute(session)

        value, at = figures.get(key, fresh)
        ctx.as_of = min(ctx.as_of, at)
        return value, at

    order, at = figure(("queue_order", job.queue), lambda s: queue_order(s, job.queue))
    line = order.counts.get(job.tenant_id, {}).get(job.priority, 0)
    own_ahead = max(0, line - 1) if at >= committed_at else line
    position = order.position(job, own_ahead)
    ctx.queue_positions[job.id] = position
    # As _estimates does for a queued job, with the same figure keys.
    mean, _ = figure(
        ("mean_run_s", job.model_id, job.family),
        lambda s: mean_run_s(s, job.model_id, job.family),
    )
    running, _ = figure(("running_in", job.queue), lambda s: running_in(s, job.queue))
    ctx.eta_s[job.id] = estimate_eta_s(position=position, running=running, slots=slots, mean_s=mean)
    return ctx


def output_payload(artifact: Artifact) -> schemas.Output:
    return {
        "id": artifact.id,
        "name": artifact.name,
        "kind": artifact.kind,
        "url": artifact_url(artifact.id),
        "content_type": artifact.content_type,
        "bytes": artifact.size_bytes,
        "meta": artifact.meta or {},
    }


def job_payload(job: Job, ctx: JobContext) -> schemas.Job:
    """The job as every endpoint returns it (typed: the document's `Job` is this shape)."""
    model = ctx.models.get(job.model_id) if job.model_id else None
    result = ctx.models.get(job.result_model_id) if job.result_model_id else None
    dataset = ctx.datasets.get(job.dataset_id) if job.dataset_id else None
    error: schemas.JobError | None = None
    if job.error_type is not None:
        error = {"type": job.error_type, "detail": job.error_detail or ""}
    return {
        "id": job.id,
        "kind": job.kind,
        "state": job.state,
        "model": model.ref if model else None,
        "family": job.family,
        "dataset": dataset.name if dataset else None,
        "name": job.target_name,
        "params": job.params or {},
        "priority": job.priority,
        "priority_class": priority_class(job.priority),
        "progress": {
            "step": job.progress_step,
            "total": job.progress_total,
            "message": job.progress_message or "",
        },
        "queue_position": ctx.queue_positions.get(job.id),
        # Seconds until it is expected to finish; null without run-time history of its model.
        "eta_s": ctx.eta_s.get(job.id),
        "attempt": job.attempt,
        "max_attempts": job.max_attempts,
        "outputs": [output_payload(a) for a in ctx.outputs.get(job.id, [])],
        "error": error,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "metrics": job.metrics or {},
        "result_model": result.ref if result else None,
        "webhook": job.webhook,
        "webhook_events": job.webhook_events,
        "deadline": iso(job.deadline),
        "run_at": iso(job.run_at),
        "timeout_s": job.timeout_s,
        "resources": {"num_gpus": job.num_gpus, "gpu_memory_gb": job.gpu_memory_gb},
        # Preemption (core/preemption.py): how often it went back to the queue to make room,
        # for which job last, and whether it is being stopped for it now.
        "preemptible": job.preemptible,
        "preemption": {
            "count": job.preempt_count,
            "by": job.preempted_by,
            "requested_at": iso(job.preempt_requested_at),
        },
        # Where its last attempt ran; null until an actor took it.
        "placement": cast(schemas.Placement | None, job.placement),
        # The batch it was submitted in (POST /v1/batches, an OpenAI batch file) and its item
        # there: the index, or the line's custom_id.
        "batch": {"id": job.batch_id, "item": job.batch_item or ""} if job.batch_id else None,
    }


def render_jobs(
    session: Session, jobs: Sequence[Job], *, slots: int | None = None
) -> list[schemas.Job]:
    """`slots`: the cluster's worker slots for eta_s (default: the live workers' snapshots)."""
    ctx = load_context(session, jobs, slots if slots is not None else worker_slots())
    return [job_payload(job, ctx) for job in jobs]


def render_job(session: Session, job: Job) -> schemas.Job:
    return render_jobs(session, [job])[0]


def event_payload(event: JobEvent) -> dict[str, Any]:
    """One history entry: its id, type and time, then the event's own fields."""
    body: dict[str, Any] = {
        "id": event.id,
        "type": event.type,
        "created_at": iso(event.created_at),
        **(event.data or {}),
    }
    if event.type == "output" and "artifact_id" in body:
        body["url"] = artifact_url(body["artifact_id"])
    return body


def model_payload(
    model: Model, datasets: dict[str, Dataset], parents: dict[str, Model]
) -> schemas.Model:
    dataset = datasets.get(model.dataset_id) if model.dataset_id else None
    parent = parents.get(model.parent_id) if model.parent_id else None
    return {
        "name": model.name,
        "version": model.version,
        "ref": model.ref,
        "family": model.family,
        "created_at": iso(model.created_at),
        # checking (a pretrained folder a worker has yet to load), ready, or failed.
        "status": model.status,
        "status_detail": model.status_detail,
        "description": (model.config or {}).get("description") or None,
        "metrics": model.metrics or {},
        "lineage": {
            "dataset": dataset.name if dataset else None,
            "parent": parent.ref if parent else None,
            "job": model.job_id,
        },
        "scaling": scaling_payload(model),
    }


def scaling_payload(model: Model) -> schemas.ModelScaling:
    """The version's replica policy in force, and which fields it sets itself (the others
    are its family's defaults and the deployment's idle delays)."""
    from flask import has_app_context

    from api.state import genq
    from core.settings import Settings
    from workers.registry import get_family

    settings = genq().settings if has_app_context() else Settings()
    policy = model_policy(get_family(model.family).scaling.as_dict(), model.serving, settings)
    return {
        "min_replicas": policy.min_replicas,
        "max_replicas": policy.max_replicas,
        "target_jobs_per_replica": policy.target_jobs_per_replica,
        "idle_unload_s": policy.idle_unload_s,
        "last_idle_unload_s": policy.last_idle_unload_s,
        "overrides": dict(model.serving or {}),
    }


def render_models(session: Session, models: Sequence[Model]) -> list[schemas.Model]:
    dataset_ids = {m.dataset_id for m in models if m.dataset_id}
    parent_ids = {m.parent_id for m in models if m.parent_id}
    datasets = (
        {d.id: d for d in session.scalars(select(Dataset).where(Dataset.id.in_(dataset_ids)))}
        if dataset_ids
        else {}
    )
    parents = (
        {p.id: p for p in session.scalars(select(Model).where(Model.id.in_(parent_ids)))}
        if parent_ids
        else {}
    )
    return [model_payload(m, datasets, parents) for m in models]


def dataset_payload(dataset: Dataset) -> schemas.Dataset:
    return {
        "id": dataset.id,
        "name": dataset.name,
        "kind": dataset.kind,
        "num_items": dataset.num_items,
        "size_bytes": dataset.size_bytes,
        "meta": dataset.meta or {},
        "created_at": iso(dataset.created_at),
    }
