"""Deleting what genq stores: a finished job (its row, events, outputs, checkpoints and a model
folder no version is registered from), one output, a model version, a data set. The DELETE
endpoints, the dashboard's buttons and the periodic retention pass (core/retention.py) all go
through here, and everything deleted is counted in `retention_counter` for /metrics.

Files live in the artifact store, rows in SQL, and the two cannot change in one transaction.
A job's or an output's files go first, then its rows (a failure leaves rows whose files are
gone, which the next attempt finds again; downloads answer 404 "gone"). A model version's or a
data set's rows go first, after the checks that it is not in use, then its files, so that no
job can start on a version whose weights are half deleted. The file steps take no session, so
that no SQL lock (SQLite's one write lock above all) is held while object storage answers.

Never deleted: a model folder a registered version is loaded from (its `path`, or the
`base_path` a LoRA adapter names), a version or a data set that a waiting or running job uses,
a folder registered from outside the artifact store (an absolute path or another bucket), and
the built-in models and data sets.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from core.artifacts import ArtifactStore
from core.errors import ConflictError, ForbiddenError
from core.states import TERMINAL, JobState
from core.tables import (
    SYSTEM_TENANT_ID,
    Artifact,
    Dataset,
    Job,
    JobEvent,
    Model,
    RetentionCounter,
    WebhookDelivery,
    utcnow,
)

# Jobs that hold on to their model version and data set.
IN_USE = (JobState.SCHEDULED, JobState.QUEUED, JobState.RUNNING, JobState.CANCELING)
FINISHED = tuple(TERMINAL)
# retention_counter.source values.
RETENTION, API = "retention", "api"
# How many of the jobs or versions in the way a 409 names.
NAMED_MAX = 10


@dataclass
class Freed:
    """What one deletion or one retention pass removed."""

    files: int = 0
    bytes: int = 0
    artifacts: int = 0
    events: int = 0
    jobs: int = 0
    models: int = 0
    datasets: int = 0

    def add(self, other: Freed) -> Freed:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @property
    def is_empty(self) -> bool:
        return not any(self.as_dict().values())


# -- counters ----------------------------------------------------------------------------------


def add_counters(session: Session, source: str, freed: Freed, *, runs: int = 0) -> None:
    """Add `freed` to the monotonic counters of `source` (one upsert per item)."""
    items = {k: v for k, v in freed.as_dict().items() if v}
    if runs:
        items["runs"] = runs
    if not items:
        return
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    now = utcnow()
    for item, value in items.items():
        stmt = insert(RetentionCounter).values(
            source=source, item=item, value=value, updated_at=now
        )
        session.execute(
            stmt.on_conflict_do_update(
                index_elements=["source", "item"],
                set_={"value": RetentionCounter.value + value, "updated_at": now},
            )
        )


def read_counters(session: Session) -> dict[str, dict[str, int]]:
    """{source: {item: total}} since the database was made."""
    totals: dict[str, dict[str, int]] = {}
    for row in session.scalars(select(RetentionCounter)):
        totals.setdefault(row.source, {})[row.item] = int(row.value)
    return totals


# -- files -------------------------------------------------------------------------------------


def is_store_key(path: str | None) -> bool:
    """Whether a Model.path is a folder inside the artifact store (trained here) rather than a
    folder registered from elsewhere (an absolute path, an s3:// URL) or nothing (built in)."""
    return bool(path) and not path.startswith(("/", "s3://"))  # type: ignore[union-attr]


def free_prefix(store: ArtifactStore, prefix: str) -> Freed:
    """Delete every object under `prefix`, counting them and their bytes."""
    found = list(store.list(prefix))
    if found:
        store.delete_prefix(prefix)
    return Freed(files=len(found), bytes=sum(size for _, size in found))


def loaded_paths(session: Session, paths: Iterable[str]) -> set[str]:
    """Those of `paths` that a registered version is loaded from: its own folder, or the base
    folder a LoRA adapter (a version with a parent) names in its config."""
    wanted = set(paths)
    if not wanted:
        return set()
    kept = set(session.scalars(select(Model.path).where(Model.path.in_(wanted))))
    for config in session.scalars(select(Model.config).where(Model.parent_id.is_not(None))):
        base = (config or {}).get("base_path")
        if base in wanted:
            kept.add(base)
    return {p for p in kept if p is not None}


def job_folders(store: ArtifactStore, tenant_id: str, job_id: str) -> list[str]:
    """Every folder a job may have written: outputs, checkpoints, the model it trained."""
    return [
        f"outputs/{tenant_id}/{job_id}",
        store.checkpoint_prefix(job_id),
        store.model_dir(job_id),
    ]


def free_job_files(store: ArtifactStore, jobs: list[tuple[str, str]], kept: set[str]) -> Freed:
    """Delete the folders of `jobs` ((job id, tenant id) pairs) but those in `kept` (see
    `loaded_paths`)."""
    freed = Freed()
    for job_id, tenant_id in jobs:
        for folder in job_folders(store, tenant_id, job_id):
            if folder not in kept:
                freed.add(free_prefix(store, folder))
    return freed


def kept_folders(session: Session, store: ArtifactStore, job_ids: Iterable[str]) -> set[str]:
    return loaded_paths(session, [store.model_dir(j) for j in job_ids])


# -- rows --------------------------------------------------------------------------------------


def delete_job_rows(session: Session, job_ids: list[str]) -> Freed:
    """Delete finished jobs' rows with their events, outputs and webhook messages (explicitly:
    the cascade is not relied on). Jobs no longer finished (retried meanwhile) stay."""
    if not job_ids:
        return Freed()
    finished = list(
        session.scalars(select(Job.id).where(Job.id.in_(job_ids), Job.state.in_(FINISHED)))
    )
    if not finished:
        return Freed()
    freed = Freed()
    freed.events = _count(session.execute(delete(JobEvent).where(JobEvent.job_id.in_(finished))))
    freed.artifacts = _count(session.execute(delete(Artifact).where(Artifact.job_id.in_(finished))))
    session.execute(delete(WebhookDelivery).where(WebhookDelivery.job_id.in_(finished)))
    freed.jobs = _count(session.execute(delete(Job).where(Job.id.in_(finished))))
    return freed


def mark_outputs_purged(session: Session, job_ids: list[str]) -> Freed:
    """After their files went: drop the finished jobs' output rows and mark them purged."""
    if not job_ids:
        return Freed()
    finished = list(
        session.scalars(select(Job.id).where(Job.id.in_(job_ids), Job.state.in_(FINISHED)))
    )
    freed = Freed()
    if finished:
        freed.artifacts = _count(
            session.execute(delete(Artifact).where(Artifact.job_id.in_(finished)))
        )
        session.execute(update(Job).where(Job.id.in_(finished)).values(outputs_purged_at=utcnow()))
    return freed


def _count(result: Any) -> int:
    return max(0, int(result.rowcount or 0))


def check_job_deletable(job: Job) -> None:
    if job.state not in FINISHED:
        raise ConflictError(
            f"job {job.id} is {job.state}: only a finished job can be deleted (cancel it first)",
            state=job.state,
        )


def check_owner(kind: str, owner: str, tenant_scope: str | None, ref: str) -> None:
    """A tenant deletes only its own; a built-in it sees belongs to the system tenant."""
    if tenant_scope is not None and owner != tenant_scope:
        raise ForbiddenError(f"{kind} {ref} is shared by every tenant: only an admin deletes it")


def _users(session: Session, column: Any, value: str) -> list[str]:
    stmt = select(Job.id).where(column == value, Job.state.in_(IN_USE)).order_by(Job.id)
    return list(session.scalars(stmt.limit(NAMED_MAX)))


def delete_model_rows(session: Session, model: Model, *, force: bool) -> list[str]:
    """Delete a version's row after the checks: refused (409) while a waiting or running job
    uses it, or while it is the parent of other versions unless `force` (the children are kept,
    their parent link cleared, and their own weights untouched). Finished jobs that ran on it
    or trained it keep their rows with the link cleared. Returns the folders to delete once
    committed: its weights, when they are in the store and no other version loads them."""
    if model.tenant_id == SYSTEM_TENANT_ID and model.path is None:
        raise ConflictError(f"model {model.ref} is built in: it cannot be deleted")
    users = _users(session, Job.model_id, model.id)
    if users:
        raise ConflictError(f"model {model.ref} is used by waiting or running jobs", job_ids=users)
    children = list(session.scalars(select(Model).where(Model.parent_id == model.id)))
    if children and not force:
        raise ConflictError(
            f"model {model.ref} is the parent of {len(children)} other versions;"
            " delete with force=true to keep them without it",
            children=[c.ref for c in children[:NAMED_MAX]],
        )
    for child in children:
        child.parent_id = None
    session.execute(update(Job).where(Job.model_id == model.id).values(model_id=None))
    session.execute(update(Job).where(Job.result_model_id == model.id).values(result_model_id=None))
    path = model.path
    session.delete(model)
    session.flush()
    if not is_store_key(path):
        return []
    assert path is not None
    return [] if loaded_paths(session, [path]) else [path]


def delete_dataset_rows(session: Session, dataset: Dataset) -> list[str]:
    """Delete a data set's row after the checks: refused (409) while a waiting or running job
    trains on it; finished jobs and the versions trained on it keep theirs with the link
    cleared. Returns its folder, to delete once committed."""
    if dataset.path is None:
        raise ConflictError(f"data set {dataset.name} is built in: it cannot be deleted")
    users = _users(session, Job.dataset_id, dataset.id)
    if users:
        raise ConflictError(
            f"data set {dataset.name} is used by waiting or running jobs", job_ids=users
        )
    session.execute(update(Job).where(Job.dataset_id == dataset.id).values(dataset_id=None))
    session.execute(update(Model).where(Model.dataset_id == dataset.id).values(dataset_id=None))
    path = dataset.path
    session.delete(dataset)
    session.flush()
    return [path]


# -- disk use ----------------------------------------------------------------------------------


def disk_use(session: Session, tenant_ids: list[str] | None = None) -> dict[str, dict[str, int]]:
    """{tenant id: {outputs_bytes, datasets_bytes, models_bytes}} from SQL alone (outputs'
    sizes as recorded, data sets' as uploaded, models' as last measured by the retention
    pass): for the tenants given, or all."""
    use: dict[str, dict[str, int]] = {}
    for name, owner, size in (
        ("outputs_bytes", Artifact.tenant_id, Artifact.size_bytes),
        ("datasets_bytes", Dataset.tenant_id, Dataset.size_bytes),
        ("models_bytes", Model.tenant_id, Model.size_bytes),
    ):
        stmt = select(owner, func.coalesce(func.sum(size), 0)).group_by(owner)
        if tenant_ids is not None:
            stmt = stmt.where(owner.in_(tenant_ids))
        for tenant_id, total in session.execute(stmt):
            use.setdefault(tenant_id, {})[name] = int(total or 0)
    empty = {"outputs_bytes": 0, "datasets_bytes": 0, "models_bytes": 0}
    return {t: {**empty, **v} for t, v in use.items()} | {
        t: dict(empty) for t in (tenant_ids or []) if t not in use
    }
