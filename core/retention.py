"""The retention pass: what the periodic scheduler deletes on its own. For each tenant, with
its own days or the defaults in settings (0 or unset: forever), counted from when a job
finished:

- outputs: the files of finished jobs (outputs, checkpoints, a model folder no registered
  version loads from) and their `artifact` rows; the job is marked `outputs_purged_at`;
- events: finished jobs' `job_event` rows (state changes, logs, metrics);
- jobs: finished jobs' rows, with whatever of the above is left.

Registered model versions and data sets are never expired (DELETE them). Each step works in
batches of settings.retention_batch_size rows, each batch in a transaction of its own and its
files deleted outside any transaction (core/deletion.py), so a large backlog never holds a lock
for long. The pass also measures the weights of model versions not measured yet (for the
tenants' disk use), then writes one audit entry (`retention.purge`, its `detail` the counts
and bytes freed; written when some retention is set) and adds the same figures to
`retention_counter` (source `retention`).
Several passes at once do no harm: a batch finds only what is still there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Select, delete, select

from core.artifacts import ArtifactStore
from core.audit import Actor, record_action
from core.db import Database
from core.deletion import (
    FINISHED,
    RETENTION,
    Freed,
    add_counters,
    delete_job_rows,
    free_job_files,
    is_store_key,
    kept_folders,
    mark_outputs_purged,
)
from core.settings import Settings
from core.tables import Job, JobEvent, Model, Tenant, utcnow

log = logging.getLogger(__name__)

# Who the audit log says acted.
RETENTION_ACTOR = Actor(key_id=None, key_prefix="retention", tenant_id=None)


@dataclass(frozen=True)
class Policy:
    """A tenant's retention in days; None: kept forever."""

    tenant_id: str
    outputs_days: int | None
    events_days: int | None
    jobs_days: int | None


def effective_days(own: int | None, default: int | None) -> int | None:
    """A tenant's own days win over the default; 0 anywhere means forever (None)."""
    days = own if own is not None else default
    return days or None


def policies(settings: Settings, tenants: list[Tenant]) -> list[Policy]:
    return [
        Policy(
            t.id,
            effective_days(t.retain_outputs_days, settings.retain_outputs_days),
            effective_days(t.retain_events_days, settings.retain_events_days),
            effective_days(t.retain_jobs_days, settings.retain_jobs_days),
        )
        for t in tenants
    ]


class Retention:
    def __init__(self, settings: Settings, database: Database, store: ArtifactStore) -> None:
        self.settings, self.database, self.store = settings, database, store
        self.batch = settings.retention_batch_size

    def run(self, now: datetime | None = None) -> Freed:
        """One pass over every tenant; returns what it freed (also audited and counted)."""
        now = now or utcnow()
        with self.database.read() as session:
            tenants = list(session.scalars(select(Tenant).order_by(Tenant.id)))
            found = policies(self.settings, tenants)
        freed = Freed()
        for policy in found:
            if policy.outputs_days:
                freed.add(self.outputs(policy.tenant_id, now - timedelta(days=policy.outputs_days)))
            if policy.events_days:
                freed.add(self.events(policy.tenant_id, now - timedelta(days=policy.events_days)))
            if policy.jobs_days:
                freed.add(self.jobs(policy.tenant_id, now - timedelta(days=policy.jobs_days)))
        measured = self.measure_models()
        active = any(p.outputs_days or p.events_days or p.jobs_days for p in found)
        with self.database.transaction() as session:
            if active or not freed.is_empty:  # (with no retention set, a pass only measures)
                record_action(
                    session,
                    RETENTION_ACTOR,
                    "retention.purge",
                    "system",
                    "retention",
                    {**freed.as_dict(), "models_measured": measured},
                )
            add_counters(session, RETENTION, freed, runs=1)
        if not freed.is_empty:
            log.info("retention freed %s", freed.as_dict())
        return freed

    def _expired(self, tenant_id: str, cutoff: datetime) -> Select[str, str]:
        return select(Job.id, Job.tenant_id).where(
            Job.tenant_id == tenant_id,
            Job.state.in_(FINISHED),
            Job.finished_at < cutoff,
        )

    def outputs(self, tenant_id: str, cutoff: datetime) -> Freed:
        """Delete the files of the tenant's jobs that finished before `cutoff`, a batch at a
        time: files first, then the rows and the mark."""
        freed = Freed()
        stmt = (
            self._expired(tenant_id, cutoff)
            .where(Job.outputs_purged_at.is_(None))
            .order_by(Job.finished_at, Job.id)
            .limit(self.batch)
        )
        while True:
            with self.database.read() as session:
                jobs = [(r.id, r.tenant_id) for r in session.execute(stmt)]
                kept = kept_folders(session, self.store, [j for j, _ in jobs])
            if not jobs:
                return freed
            freed.add(free_job_files(self.store, jobs, kept))
            with self.database.transaction() as session:
                freed.add(mark_outputs_purged(session, [j for j, _ in jobs]))

    def events(self, tenant_id: str, cutoff: datetime) -> Freed:
        """Delete the events of the tenant's jobs that finished before `cutoff`."""
        freed = Freed()
        expired = self._expired(tenant_id, cutoff).with_only_columns(Job.id)
        stmt = (
            select(JobEvent.id)
            .where(JobEvent.job_id.in_(expired))
            .order_by(JobEvent.id)
            .limit(self.batch)
        )
        while True:
            with self.database.transaction() as session:
                ids = list(session.scalars(stmt))
                if not ids:
                    return freed
                result = session.execute(delete(JobEvent).where(JobEvent.id.in_(ids)))
                freed.events += max(0, int(result.rowcount or 0))  # type: ignore[attr-defined]

    def jobs(self, tenant_id: str, cutoff: datetime) -> Freed:
        """Delete the tenant's jobs that finished before `cutoff`: their files (unless purged
        already), then their rows."""
        freed = Freed()
        stmt = (
            self._expired(tenant_id, cutoff)
            .add_columns(Job.outputs_purged_at)
            .order_by(Job.finished_at, Job.id)
            .limit(self.batch)
        )
        while True:
            with self.database.read() as session:
                rows = list(session.execute(stmt))
                unpurged = [(r.id, r.tenant_id) for r in rows if r.outputs_purged_at is None]
                kept = kept_folders(session, self.store, [j for j, _ in unpurged])
            if not rows:
                return freed
            freed.add(free_job_files(self.store, unpurged, kept))
            with self.database.transaction() as session:
                gone = delete_job_rows(session, [r.id for r in rows])
            freed.add(gone)
            if gone.jobs == 0:  # every one of them was retried meanwhile: look again later
                return freed

    def measure_models(self) -> int:
        """Record the size of versions not measured yet, a batch at a time: the weights held in
        the artifact store; 0 for built-ins and folders registered from elsewhere."""
        measured = 0
        stmt = select(Model.id, Model.path).where(Model.size_bytes.is_(None)).limit(self.batch)
        while True:
            with self.database.read() as session:
                rows = list(session.execute(stmt))
            if not rows:
                return measured
            sizes = {r.id: self.model_bytes(r.path) for r in rows}
            with self.database.transaction() as session:
                for model in session.scalars(select(Model).where(Model.id.in_(list(sizes)))):
                    model.size_bytes = sizes[model.id]
            measured += len(rows)

    def model_bytes(self, path: str | None) -> int:
        if not is_store_key(path):
            return 0
        assert path is not None
        try:
            manifest = self.store.read_manifest(path)
            if manifest is not None:
                return manifest.size_bytes
            return sum(size for _, size in self.store.list(path))
        except Exception as exc:  # a folder gone or unreadable: counted as nothing
            log.warning("could not measure model folder %s: %s", path, exc)
            return 0
