"""What the SQL rows say, counted for the metrics (GET /metrics): jobs by state, kind, family
and tenant, queue depth, running jobs, retried attempts, the dead-letter list, webhook
deliveries, and the histograms of queue wait (submit to start), run time and cold start.

Each figure is read from the rows when Prometheus scrapes, so every API process (and every
API host of a cluster) answers the same, and nothing is lost when a process restarts: the job
table is the counter. Each function is one aggregate query; the caller owns the session.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.orm import Session

from core.states import ACTIVE, TERMINAL, JobState
from core.tables import Job, Model, Tenant, WebhookDelivery

# Upper bounds (seconds) of the histograms' buckets: from an interactive generation's
# sub-second wait to a training run of a day.
QUEUE_WAIT_BUCKETS_S = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400)
RUN_TIME_BUCKETS_S = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)
COLD_START_BUCKETS_S = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


@dataclass(frozen=True)
class Histogram:
    """One labelled histogram series: cumulative counts per upper bound, count and sum."""

    labels: tuple[str, ...]
    buckets: list[tuple[float, int]]
    count: int
    sum_s: float


def tenant_names(session: Session) -> dict[str, str]:
    """Tenant id -> name (the metrics' `tenant` label)."""
    return {row.id: row.name for row in session.execute(select(Tenant.id, Tenant.name))}


def tenant_weights(session: Session) -> dict[str, int]:
    return {row.id: row.weight for row in session.execute(select(Tenant.id, Tenant.weight))}


def model_refs(session: Session) -> dict[str, tuple[str, str]]:
    """Model id -> (name:version, family), for the model servers' labels."""
    rows = session.execute(select(Model.id, Model.name, Model.version, Model.family))
    return {row.id: (f"{row.name}:{row.version}", row.family) for row in rows}


def jobs_by_state(session: Session) -> list[tuple[str, str, str, str, int]]:
    """(state, kind, family, tenant id, jobs) over every job row."""
    stmt = select(Job.state, Job.kind, Job.family, Job.tenant_id, func.count()).group_by(
        Job.state, Job.kind, Job.family, Job.tenant_id
    )
    return [(r[0], r[1], r[2], r[3], int(r[4])) for r in session.execute(stmt)]


def queue_depth(session: Session) -> list[tuple[str, int, str, int]]:
    """(queue, priority 0-9, tenant id, queued jobs)."""
    stmt = (
        select(Job.queue, Job.priority, Job.tenant_id, func.count())
        .where(Job.state == JobState.QUEUED)
        .group_by(Job.queue, Job.priority, Job.tenant_id)
    )
    return [(r[0], int(r[1]), r[2], int(r[3])) for r in session.execute(stmt)]


def running_jobs(session: Session) -> list[tuple[str, str, str, int]]:
    """(queue, kind, tenant id, jobs running or canceling)."""
    stmt = (
        select(Job.queue, Job.kind, Job.tenant_id, func.count())
        .where(Job.state.in_([str(s) for s in ACTIVE]))
        .group_by(Job.queue, Job.kind, Job.tenant_id)
    )
    return [(r[0], r[1], r[2], int(r[3])) for r in session.execute(stmt)]


def retried_attempts(session: Session) -> list[tuple[str, str, int]]:
    """(kind, family, attempts after each job's first): retries after transient failures and
    reaped leases, and retries asked for."""
    stmt = (
        select(Job.kind, Job.family, func.sum(Job.attempt - 1))
        .where(Job.attempt > 1)
        .group_by(Job.kind, Job.family)
    )
    return [(r[0], r[1], int(r[2] or 0)) for r in session.execute(stmt)]


def dead_letter(session: Session) -> list[tuple[str, int]]:
    """(tenant id, failed jobs that used up their attempts): GET /v1/dead-letter's list."""
    stmt = (
        select(Job.tenant_id, func.count())
        .where(Job.state == JobState.FAILED, Job.attempt >= Job.max_attempts)
        .group_by(Job.tenant_id)
    )
    return [(r[0], int(r[1])) for r in session.execute(stmt)]


def webhook_deliveries(session: Session) -> list[tuple[str, str, int, int]]:
    """(event, state: pending | delivered | failed, messages, send attempts)."""
    stmt = select(
        WebhookDelivery.event,
        WebhookDelivery.state,
        func.count(),
        func.coalesce(func.sum(WebhookDelivery.attempts), 0),
    ).group_by(WebhookDelivery.event, WebhookDelivery.state)
    return [(r[0], r[1], int(r[2]), int(r[3])) for r in session.execute(stmt)]


def _seconds(session: Session, start: Any, end: Any) -> ColumnElement[Any]:
    if session.get_bind().dialect.name == "postgresql":
        return func.extract("epoch", end - start)
    # SQLite keeps datetimes as text; julianday() reads them as fractional days.
    return (func.julianday(end) - func.julianday(start)) * 86400.0


def _histogram(
    session: Session,
    seconds: ColumnElement[Any],
    where: Sequence[ColumnElement[bool]],
    groups: Sequence[Any],
    bounds: Sequence[float],
) -> list[Histogram]:
    inner = select(*groups, seconds.label("d")).where(*where).subquery()
    keys = [inner.c[g.key] for g in groups]
    stmt = select(
        *keys,
        func.count(),
        func.coalesce(func.sum(inner.c.d), 0.0),
        *(func.sum(case((inner.c.d <= b, 1), else_=0)) for b in bounds),
    ).group_by(*keys)
    found = []
    for row in session.execute(stmt):
        labels = tuple(str(v) for v in row[: len(keys)])
        count, total = int(row[len(keys)]), float(row[len(keys) + 1])
        cumulative = [int(n or 0) for n in row[len(keys) + 2 :]]
        found.append(Histogram(labels, list(zip(bounds, cumulative, strict=True)), count, total))
    return found


def queue_waits(session: Session) -> list[Histogram]:
    """Submit to start (of the latest attempt) of every job that started, by (family, kind)."""
    return _histogram(
        session,
        _seconds(session, Job.created_at, Job.started_at),
        [Job.started_at.is_not(None)],
        [Job.family, Job.kind],
        QUEUE_WAIT_BUCKETS_S,
    )


def run_times(session: Session) -> list[Histogram]:
    """Start to finish (of the last attempt) of every finished job that ran, by (family, kind,
    state)."""
    return _histogram(
        session,
        _seconds(session, Job.started_at, Job.finished_at),
        [
            Job.state.in_([str(s) for s in TERMINAL]),
            Job.started_at.is_not(None),
            Job.finished_at.is_not(None),
        ],
        [Job.family, Job.kind, Job.state],
        RUN_TIME_BUCKETS_S,
    )


def cold_starts(session: Session) -> list[Histogram]:
    """Seconds jobs waited for their model server to load (the job's `metrics.load_s`, set
    only when the job waited for the load), by (family,)."""
    load_s = Job.metrics["load_s"].as_float()
    return _histogram(session, load_s, [load_s.is_not(None)], [Job.family], COLD_START_BUCKETS_S)
