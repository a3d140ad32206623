"""What the dashboard reads from SQL: jobs by state, queue depth, the last hour's throughput and
latency, a filtered page of jobs, a job's history, tenants' usage. Every query is an index range
scan or an aggregate over an index (see the job indexes in core/tables.py), so the pages stay fast
with hundreds of thousands of jobs; `bench/dashboard.py` measures them.

Job ids are time-ordered (core/ids.py), so a time range is an id range and the jobs table pages by
id (keyset pagination: no OFFSET, each page costs the same however deep it is).
"""

from __future__ import annotations

import re
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.deletion import disk_use
from core.states import JobState
from core.tables import ApiKey, Artifact, Job, JobEvent, Model, Tenant, utcnow
from core.usage import fair_share_report

STATES = list(JobState)


def id_at(moment: datetime) -> str:
    """The smallest job id that can have been made at `moment` (ids start with its ms)."""
    ms = int(moment.timestamp() * 1000)
    return str(uuid.UUID(int=(ms & ((1 << 48) - 1)) << 80))


def jobs_by_state(session: Session) -> dict[str, int]:
    counts = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    return {str(s): int(counts.get(s, 0)) for s in STATES}


def queue_depths(session: Session) -> dict[str, int]:
    rows = session.execute(
        select(Job.queue, func.count())
        .where(Job.state == JobState.QUEUED)
        .group_by(Job.queue)
        .order_by(Job.queue)
    ).all()
    return {str(queue): int(n) for queue, n in rows}


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, round(q / 100 * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class HourStats:
    """Jobs finished in each of the last 60 minutes, and latency per 5-minute bucket."""

    start: datetime
    per_minute: list[int] = field(default_factory=lambda: [0] * 60)
    # bucket -> (wait seconds list, run seconds list)
    wait_s: list[list[float]] = field(default_factory=lambda: [[] for _ in range(12)])
    run_s: list[list[float]] = field(default_factory=lambda: [[] for _ in range(12)])

    @property
    def finished(self) -> int:
        return sum(self.per_minute)

    def summary(self) -> dict[str, float | None]:
        waits = [v for bucket in self.wait_s for v in bucket]
        runs = [v for bucket in self.run_s for v in bucket]
        return {
            "wait_p50": percentile(waits, 50),
            "wait_p95": percentile(waits, 95),
            "run_p50": percentile(runs, 50),
            "run_p95": percentile(runs, 95),
        }


def last_hour(session: Session, now: datetime | None = None) -> HourStats:
    now = now or utcnow()
    start = now - timedelta(hours=1)
    stats = HourStats(start=start)
    rows = session.execute(
        select(Job.created_at, Job.started_at, Job.finished_at).where(Job.finished_at >= start)
    ).all()
    for created_at, started_at, finished_at in rows:
        assert finished_at is not None  # the WHERE clause
        minute = min(59, int((finished_at - start).total_seconds() // 60))
        stats.per_minute[minute] += 1
        if started_at is not None:
            bucket = minute // 5
            stats.wait_s[bucket].append((started_at - created_at).total_seconds())
            stats.run_s[bucket].append((finished_at - started_at).total_seconds())
    return stats


@dataclass(frozen=True)
class JobFilter:
    states: list[str] = field(default_factory=list)
    kind: str | None = None
    model: str | None = None
    tenant: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    id_prefix: str | None = None

    def is_empty(self) -> bool:
        return not (self.states or self.kind or self.model or self.tenant) and not (
            self.since or self.until or self.id_prefix
        )


@dataclass
class JobPage:
    jobs: list[Job]
    newer: str | None  # cursor for the page before (newer jobs), None on the first page
    older: str | None  # cursor for the page after (older jobs), None on the last page


def list_jobs(
    session: Session,
    flt: JobFilter,
    *,
    limit: int,
    before: str | None = None,
    after: str | None = None,
) -> JobPage:
    """A page of jobs, newest first. `before`: ids older than this; `after`: ids newer."""
    stmt = select(Job)
    if flt.states:
        stmt = stmt.where(Job.state.in_(flt.states))
    if flt.kind:
        stmt = stmt.where(Job.kind == flt.kind)
    if flt.model:
        stmt = stmt.where(Job.model_id.in_(select(Model.id).where(Model.name == flt.model)))
    if flt.tenant:
        stmt = stmt.where(Job.tenant_id.in_(select(Tenant.id).where(Tenant.name == flt.tenant)))
    if flt.since:
        stmt = stmt.where(Job.id >= id_at(flt.since))
    if flt.until:
        stmt = stmt.where(Job.id < id_at(flt.until))
    if flt.id_prefix:
        # "~" sorts after every character of an id, so this is a range scan of the key.
        stmt = stmt.where(Job.id >= flt.id_prefix, Job.id < flt.id_prefix + "~")
    if after is not None:
        rows = list(
            session.scalars(stmt.where(Job.id > after).order_by(Job.id.asc()).limit(limit + 1))
        )
        has_newer = len(rows) > limit
        jobs = list(reversed(rows[:limit]))
        return JobPage(
            jobs=jobs,
            newer=jobs[0].id if has_newer and jobs else None,
            older=jobs[-1].id if jobs else None,
        )
    if before is not None:
        stmt = stmt.where(Job.id < before)
    rows = list(session.scalars(stmt.order_by(Job.id.desc()).limit(limit + 1)))
    jobs = rows[:limit]
    return JobPage(
        jobs=jobs,
        newer=jobs[0].id if before is not None and jobs else None,
        older=jobs[-1].id if len(rows) > limit else None,
    )


def names_for(session: Session, jobs: list[Job]) -> tuple[dict[str, str], dict[str, str]]:
    """Model refs and tenant names for a page of jobs, in two queries."""
    model_ids = {i for j in jobs for i in (j.model_id, j.result_model_id) if i}
    tenant_ids = {j.tenant_id for j in jobs}
    models = (
        {m.id: m.ref for m in session.scalars(select(Model).where(Model.id.in_(model_ids)))}
        if model_ids
        else {}
    )
    tenants = (
        dict(session.execute(select(Tenant.id, Tenant.name).where(Tenant.id.in_(tenant_ids))).all())
        if tenant_ids
        else {}
    )
    return models, tenants


def last_event_id(session: Session, job_id: str) -> int:
    """The id of the job's newest event, 0 for none (one step down the job's event index)."""
    found = session.scalar(
        select(JobEvent.id).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc()).limit(1)
    )
    return int(found or 0)


def job_history(
    session: Session, job_id: str, *, upto: int | None = None, log_limit: int = 500
) -> dict[str, Any]:
    """A job's state changes, its last log lines, its metric points and its outputs. With
    `upto`, only events up to that id: the job page shows those and polls for the rest."""
    bound = [JobEvent.id <= upto] if upto is not None else []
    events = list(
        session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.type.in_(["state", "metric"]), *bound)
            .order_by(JobEvent.id)
        )
    )
    logs = list(
        session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.type == "log", *bound)
            .order_by(JobEvent.id.desc())
            .limit(log_limit)
        )
    )
    outputs = list(
        session.scalars(
            select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.created_at)
        )
    )
    return {
        "timeline": [e for e in events if e.type == "state"],
        "logs": list(reversed(logs)),
        "curves": _curves(e for e in events if e.type == "metric"),
        "outputs": outputs,
    }


# What a training family logs when an attempt resumes from its last checkpoint.
_RESUMED = re.compile(r"resumed from step (\d+)")
# Log lines looked at after a preemption for the resume line (it is among the first).
_RESUME_LOOKAHEAD = 20


@dataclass(frozen=True)
class Preempted:
    """One preemption of a job: when it went back to the queue, for which job, the last step
    it reported before it stopped, and the checkpoint step it resumed from (None: not yet)."""

    at: datetime
    by: str | None
    stopped_step: int | None
    resumed_step: int | None


def preemptions(session: Session, job: Job) -> list[Preempted]:
    """The job's preemptions, oldest first, from its events (core/preemption.py writes them):
    a few indexed reads per preemption, and a job is preempted at most `max_preemptions`
    times."""
    if not job.preempt_count:
        return []
    requeues = [
        e
        for e in session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job.id, JobEvent.type == "state")
            .order_by(JobEvent.id)
        )
        if e.data.get("reason") == "preempted"
    ]
    out = []
    for event in requeues:
        last = session.scalar(
            select(JobEvent)
            .where(JobEvent.job_id == job.id, JobEvent.type == "progress", JobEvent.id < event.id)
            .order_by(JobEvent.id.desc())
            .limit(1)
        )
        resumed = None
        for log in session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job.id, JobEvent.type == "log", JobEvent.id > event.id)
            .order_by(JobEvent.id)
            .limit(_RESUME_LOOKAHEAD)
        ):
            found = _RESUMED.search(str(log.data.get("message", "")))
            if found:
                resumed = int(found.group(1))
                break
        stopped = int(last.data["step"]) if last is not None and last.data.get("step") else None
        out.append(Preempted(event.created_at, event.data.get("by"), stopped, resumed))
    return out


def _curves(events: Iterable[JobEvent]) -> dict[str, list[tuple[int, float]]]:
    """Metric events as one (step, value) series per metric name, in event order."""
    curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for event in events:
        step = int(event.data.get("step", 0))
        for name, value in (event.data.get("values") or {}).items():
            if isinstance(value, int | float):
                curves[name].append((step, float(value)))
    return dict(curves)


def metric_curves(
    session: Session, job_id: str, *, upto: int
) -> dict[str, list[tuple[int, float]]]:
    """The job's metric series up to event id `upto`, for a chart redrawn when new points come
    (a range of the job's event index)."""
    return _curves(
        session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.type == "metric", JobEvent.id <= upto)
            .order_by(JobEvent.id)
        )
    )


# What the job page adds as it happens; progress comes from the job row. A metric event only
# tells the page to redraw its loss chart and latest metrics (`metric_curves`).
LIVE_EVENT_TYPES = ("state", "log", "output", "metric")


@dataclass
class JobUpdates:
    """What changed on a job since the event id a page already shows."""

    job: Any  # a row: state, progress, attempt, max_attempts
    events: list[JobEvent]  # state, log, output and metric events after the cursor, in order
    outputs: dict[str, Artifact]  # the artifacts the output events name, by id
    cursor: int  # the event id to ask from next time
    has_more: bool  # the batch was full: ask again at once


def job_updates(
    session: Session, job_id: str, *, after: int, limit: int = 500
) -> JobUpdates | None:
    """The job's row and its events after `after`, or None for no such job.

    The row is read before the events, so a job seen final here has all its events in the
    query after it (every writer of a job's events holds its row lock, so their ids commit
    in order and `id > after` misses none). The events come from a range of the job's event
    index up to its newest id, so the cursor moves past the progress events this page does not
    add as well, and no poll reads them twice.
    """
    job = session.execute(
        select(
            Job.state,
            Job.attempt,
            Job.max_attempts,
            Job.progress_step,
            Job.progress_total,
            Job.progress_message,
        ).where(Job.id == job_id)
    ).one_or_none()
    if job is None:
        return None
    newest = last_event_id(session, job_id)
    if newest <= after:
        return JobUpdates(job, [], {}, after, False)
    events = list(
        session.scalars(
            select(JobEvent)
            .where(
                JobEvent.job_id == job_id,
                JobEvent.id > after,
                JobEvent.id <= newest,
                JobEvent.type.in_(LIVE_EVENT_TYPES),
            )
            .order_by(JobEvent.id)
            .limit(limit)
        )
    )
    has_more = len(events) == limit
    ids = [str(e.data.get("artifact_id")) for e in events if e.type == "output"]
    outputs = (
        {a.id: a for a in session.scalars(select(Artifact).where(Artifact.id.in_(ids)))}
        if ids
        else {}
    )
    cursor = events[-1].id if has_more else newest
    return JobUpdates(job, events, outputs, cursor, has_more)


ACTIVE_STATES = [JobState.SCHEDULED, JobState.QUEUED, JobState.RUNNING, JobState.CANCELING]


def tenant_usage(session: Session, now: datetime | None = None) -> list[dict[str, Any]]:
    """Each tenant with its keys and its usage: jobs in all (an index-only count), jobs of
    the last 24 hours by state (an id range), and jobs waiting or running now (the state
    index). A count of every job by tenant and state would read every row."""
    since = (now or utcnow()) - timedelta(hours=24)
    tenants = list(session.scalars(select(Tenant).order_by(Tenant.name)))
    totals = dict(
        session.execute(select(Job.tenant_id, func.count()).group_by(Job.tenant_id)).all()
    )
    recent: dict[str, dict[str, int]] = defaultdict(dict)
    for tenant_id, state, n in session.execute(
        select(Job.tenant_id, Job.state, func.count())
        .where(Job.id >= id_at(since))
        .group_by(Job.tenant_id, Job.state)
    ):
        recent[tenant_id][state] = int(n)
    active: dict[str, dict[str, int]] = defaultdict(dict)
    # Grouped state first, so that SQLite's planner reads the state index, not every row.
    for state, tenant_id, n in session.execute(
        select(Job.state, Job.tenant_id, func.count())
        .where(Job.state.in_(ACTIVE_STATES))
        .group_by(Job.state, Job.tenant_id)
    ):
        active[tenant_id][state] = int(n)
    keys: dict[str, list[ApiKey]] = defaultdict(list)
    for key in session.scalars(select(ApiKey).order_by(ApiKey.created_at)):
        keys[key.tenant_id].append(key)
    shares = fair_share_report(session, now or utcnow(), {t.id: t.weight for t in tenants})
    disk = disk_use(session, [t.id for t in tenants])
    return [
        {
            "tenant": t,
            "fair_share": shares[t.id],
            "total": int(totals.get(t.id, 0)),
            "last_day": recent.get(t.id, {}),
            "active": active.get(t.id, {}),
            "keys": keys.get(t.id, []),
            "disk": disk[t.id],
        }
        for t in tenants
    ]
