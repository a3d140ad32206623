"""Sweeping stray output files: files under a finished job's output folder that no artifact
row of the job names.

Outputs are written under their attempt's own key (core/artifacts.py) and become the job's only
through the fenced write of their row; an attempt that learns it lost its lease deletes what it
wrote (scheduler/recorder.py). An attempt whose Celery worker was killed outright cannot: what
it wrote before it died (a whole file, or a temporary one cut off mid-write) stays behind, and
the soak (bench/soak.py) found such files. The sweep deletes them once the job has finished and
a grace period has passed, so the store holds exactly the files the rows name.

Each finished job is swept once: the sweep keeps a watermark of the finish times it has covered
(in memory; after a restart it looks back `LOOKBACK` again). A stale attempt that wakes up
after the sweep finds its lease lost and deletes its own files.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select

from core.artifacts import ArtifactStore
from core.db import Database
from core.deletion import FINISHED, Freed
from core.tables import Artifact, Job, utcnow

log = logging.getLogger(__name__)

# How long after a job finished its folder is swept: longer than a worker takes to notice its
# lease is gone and clean up after itself, so the sweep only meets files nobody will delete.
GRACE = timedelta(seconds=60)
# How far back a sweep that has no watermark yet (a new periodic scheduler) looks.
LOOKBACK = timedelta(days=1)
# Jobs read per query.
BATCH = 500


def sweep_job(store: ArtifactStore, tenant_id: str, job_id: str, recorded: set[str]) -> Freed:
    """Delete every file under the job's output folder that `recorded` (its artifact rows'
    keys) does not name; temporary files a killed writer left behind included."""
    prefix = f"outputs/{tenant_id}/{job_id}"
    freed = Freed()
    folder = store.local_path(prefix)
    if folder is not None:
        # A local folder is walked directly: the store's listing hides temporary files.
        if not folder.is_dir():
            return freed
        for path in sorted(folder.rglob("*"), reverse=True):
            key = f"{prefix}/{path.relative_to(folder).as_posix()}"
            if path.is_file() and key not in recorded:
                size = path.stat().st_size
                path.unlink(missing_ok=True)
                freed.files += 1
                freed.bytes += size
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        return freed
    for key, size in list(store.list(prefix)):
        if key not in recorded:
            store.delete(key)
            freed.files += 1
            freed.bytes += size
    return freed


class StraySweep:
    def __init__(self, database: Database, store: ArtifactStore) -> None:
        self.database, self.store = database, store
        self.watermark: datetime | None = None

    def run(self, now: datetime | None = None) -> Freed:
        """Sweep the jobs that finished since the last sweep and at least GRACE ago, a batch
        at a time in (finish time, id) order."""
        upto = (now or utcnow()) - GRACE
        since = self.watermark or upto - LOOKBACK
        after_id = ""
        freed = Freed()
        while True:
            with self.database.read() as session:
                jobs = list(
                    session.execute(
                        select(Job.id, Job.tenant_id, Job.finished_at)
                        .where(
                            Job.state.in_(FINISHED),
                            or_(
                                Job.finished_at > since,
                                and_(Job.finished_at == since, Job.id > after_id),
                            ),
                            Job.finished_at <= upto,
                            Job.outputs_purged_at.is_(None),
                        )
                        .order_by(Job.finished_at, Job.id)
                        .limit(BATCH)
                    )
                )
                recorded: dict[str, set[str]] = {}
                for job_id, path in session.execute(
                    select(Artifact.job_id, Artifact.path).where(
                        Artifact.job_id.in_([j.id for j in jobs])
                    )
                ):
                    recorded.setdefault(job_id, set()).add(path)
            for job in jobs:
                freed.add(sweep_job(self.store, job.tenant_id, job.id, recorded.get(job.id, set())))
            if len(jobs) < BATCH:
                break
            since, after_id = jobs[-1].finished_at, jobs[-1].id
        self.watermark = upto
        if freed.files:
            log.warning("deleted %d stray output file(s) (%d bytes)", freed.files, freed.bytes)
        return freed
