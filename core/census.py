"""What the SQL rows say, counted for the metrics (GET /metrics): jobs by state, kind, family
and tenant, queue depth, running jobs, retried attempts, the dead-letter list, webhook
deliveries, and the histograms of queue wait (submit to start), run time and cold start.

Each figure is read from the rows when Prometheus scrapes, so every API process (and every
API host of a cluster) answers the same, and nothing is lost when a process restarts: the job
table is the counter. Each function is one aggregate query; `job_groups`, the one that reads
every job row, does it in one scan (its cost: bench/metrics_scrape.py). The caller owns the
session.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, select
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

    def plus(self, other: Histogram) -> Histogram:
        """The two series added up (same bounds), under this one's labels."""
        buckets = [(b, n + m) for (b, n), (_, m) in zip(self.buckets, other.buckets, strict=True)]
        return Histogram(self.labels, buckets, self.count + other.count, self.sum_s + other.sum_s)


@dataclass(frozen=True)
class JobGroup:
    """The jobs of one (state, kind, family, tenant): how many, their attempts after the
    first, how many are dead letters (failed with their attempts used up), and the
    histograms of their queue wait (submit to the latest start, over the jobs that started)
    and run time (start to end of the last attempt, over the finished jobs that ran)."""

    state: str
    kind: str
    family: str
    tenant_id: str
    jobs: int
    retries: int
    dead_letter: int
    wait: Histogram
    run: Histogram


def tenant_names(session: Session) -> dict[str, str]:
    """Tenant id -> name (the metrics' `tenant` label)."""
    return {row.id: row.name for row in session.execute(select(Tenant.id, Tenant.name))}


def tenant_weights(session: Session) -> dict[str, int]:
    return {row.id: row.weight for row in session.execute(select(Tenant.id, Tenant.weight))}


def model_refs(session: Session) -> dict[str, tuple[str, str]]:
    """Model id -> (name:version, family), for the model servers' labels."""
    rows = session.execute(select(Model.id, Model.name, Model.version, Model.family))
    return {row.id: (f"{row.name}:{row.version}", row.family) for row in rows}


def job_groups(session: Session) -> list[JobGroup]:
    """Every job row, grouped by (state, kind, family, tenant), in one scan of the table."""
    ran = and_(
        Job.state.in_([str(s) for s in TERMINAL]),
        Job.started_at.is_not(None),
        Job.finished_at.is_not(None),
    )
    # SQLite computes each row's two durations once in a materialized CTE (inlined, it would
    # parse the dates again for every bucket); PostgreSQL's arithmetic is cheap to repeat.
    rows = (
        select(
            Job.state,
            Job.kind,
            Job.family,
            Job.tenant_id,
            Job.attempt,
            Job.max_attempts,
            _seconds(session, Job.created_at, Job.started_at).label("wait_s"),
            case((ran, _seconds(session, Job.started_at, Job.finished_at))).label("run_s"),
        )
        .cte("job_seconds")
        .prefix_with("MATERIALIZED", dialect="sqlite")
    )
    keys = (rows.c.state, rows.c.kind, rows.c.family, rows.c.tenant_id)
    stmt = select(
        *keys,
        func.count(),
        func.sum(case((rows.c.attempt > 1, rows.c.attempt - 1), else_=0)),
        func.sum(
            case(
                (and_(rows.c.state == JobState.FAILED, rows.c.attempt >= rows.c.max_attempts), 1),
                else_=0,
            )
        ),
        *_histogram_columns(rows.c.wait_s, QUEUE_WAIT_BUCKETS_S),
        *_histogram_columns(rows.c.run_s, RUN_TIME_BUCKETS_S),
    ).group_by(*keys)
    groups = []
    for row in session.execute(stmt):
        at = len(keys) + 3
        wait_h, at = _histogram_of(row, at, QUEUE_WAIT_BUCKETS_S)
        run_h, _ = _histogram_of(row, at, RUN_TIME_BUCKETS_S)
        groups.append(
            JobGroup(
                state=row[0],
                kind=row[1],
                family=row[2],
                tenant_id=row[3],
                jobs=int(row[4]),
                retries=int(row[5] or 0),
                dead_letter=int(row[6] or 0),
                wait=wait_h,
                run=run_h,
            )
        )
    return groups


def _histogram_columns(seconds: Any, bounds: Sequence[float]) -> list[ColumnElement[Any]]:
    """count, sum, then one cumulative count per bound, over the rows where `seconds` is not
    NULL."""
    return [
        func.count(seconds),
        func.coalesce(func.sum(seconds), 0.0),
        *(func.sum(case((seconds <= b, 1), else_=0)) for b in bounds),
    ]


def _histogram_of(row: Any, at: int, bounds: Sequence[float]) -> tuple[Histogram, int]:
    count, total = int(row[at] or 0), float(row[at + 1] or 0.0)
    cumulative = [int(n or 0) for n in row[at + 2 : at + 2 + len(bounds)]]
    histogram = Histogram((), list(zip(bounds, cumulative, strict=True)), count, total)
    return histogram, at + 2 + len(bounds)


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


def cold_starts(session: Session) -> list[Histogram]:
    """Seconds jobs waited for their model server to load (the job's `metrics.load_s`, set
    only when the job waited for the load), by (family,)."""
    load_s = Job.metrics["load_s"].as_float()
    return _histogram(session, load_s, [load_s.is_not(None)], [Job.family], COLD_START_BUCKETS_S)
