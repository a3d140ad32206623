"""Where each queued job stands in its queue: how many queued jobs start before it, in the
order the claim follows (core/fairness.py), for the API's `queue_position`. A queue's order is
summarised per (tenant, priority) (`QueueOrder`), so a job's position is a sum over tenants,
not a scan of the queue per job.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, func, or_, select, tuple_
from sqlalchemy.orm import Session

from core.fairness import CLOCK, Head, stride
from core.quotas import load_limits
from core.states import JobState
from core.tables import FairShare, Job, UTCDateTime, utcnow
from core.usage import policy_of, usage_of

# Built once: the API reads them for every page of queued jobs.
_PASS_VALUES = select(FairShare.tenant_id, FairShare.pass_value).where(
    FairShare.queue == bindparam("queue"),
    FairShare.tenant_id.in_(bindparam("tenant_ids", expanding=True)),
)
_QUEUED_COUNTS = (
    select(Job.tenant_id, Job.priority, func.count())
    .where(Job.state == JobState.QUEUED, Job.queue == bindparam("queue"))
    .group_by(Job.tenant_id, Job.priority)
)


@dataclass
class QueueOrder:
    """The claim order of one queue, summarised per (tenant, priority) so that the position of
    any queued job is a sum over tenants (no scan of the whole queue per job)."""

    queue: str
    heads: dict[str, Head]
    # tenant -> {priority: number of queued jobs}
    counts: dict[str, dict[int, int]]

    def position(self, job: Job, own_ahead: int) -> int:
        """How many queued jobs of the queue start before `job`; `own_ahead` is how many of its
        tenant's jobs of the same priority are older than it."""
        p, t = job.priority, job.tenant_id
        mine = self.heads.get(t)
        if mine is None:
            return 0
        higher_own = sum(n for q, n in self.counts[t].items() if q > p)
        k = higher_own + own_ahead  # jobs of its tenant before it; it is the (k+1)-th
        start = mine.start + k * mine.stride
        ahead = 0
        for u, head in self.heads.items():
            per = self.counts[u]
            ahead += sum(n for q, n in per.items() if q > p)
            if u == t:
                ahead += own_ahead
                continue
            n_same = per.get(p, 0)
            if not n_same:
                continue
            higher = sum(n for q, n in per.items() if q > p)
            # u's jobs of priority p start at head.start + (higher + i) * stride, i = 0..n-1;
            # those before `start` (or at it, when u sorts before t) come first.
            offset = start - head.start - higher * head.stride
            if offset < 0 or (offset == 0 and u > t):
                continue
            before = int(offset // head.stride + 1 if u < t else -(-offset // head.stride))
            ahead += min(n_same, before)
        return ahead


def queue_order(session: Session, queue: str) -> QueueOrder:
    counts: dict[str, dict[int, int]] = defaultdict(dict)
    for tenant_id, priority, n in session.execute(_QUEUED_COUNTS, {"queue": queue}):
        counts[tenant_id][int(priority)] = int(n)
    if not counts:
        return QueueOrder(queue, {}, counts)
    limits = load_limits(session, list(counts))
    if policy_of(session) == "usage":
        usage = usage_of(session, list(counts), utcnow())
        heads = {}
        for tenant_id, per in counts.items():
            weight = limits[tenant_id].weight if tenant_id in limits else 1
            cost = usage[tenant_id].mean_attempt_gpu_seconds or 1.0
            start = usage[tenant_id].gpu_seconds / weight
            heads[tenant_id] = Head(tenant_id, max(per), start, cost / weight)
        return QueueOrder(queue, heads, counts)
    # The clock and the passes of the tenants with work, in one read.
    rows = session.execute(_PASS_VALUES, {"queue": queue, "tenant_ids": [CLOCK, *counts]})
    passes: dict[str, int] = {tenant_id: int(value) for tenant_id, value in rows}
    clock = passes.get(CLOCK, 0)
    heads = {}
    for tenant_id, per in counts.items():
        own = passes.get(tenant_id)
        start = max(own, clock) if own is not None else clock
        weight = limits[tenant_id].weight if tenant_id in limits else 1
        heads[tenant_id] = Head(tenant_id, max(per), start, stride(weight))
    return QueueOrder(queue, heads, counts)


def _age_param(prefix: str) -> Any:
    # A row value, so that both SQLite and PostgreSQL read it as one range of the index.
    return tuple_(bindparam(f"{prefix}_created_at", type_=UTCDateTime()), bindparam(f"{prefix}_id"))


# Queued jobs of one line (queue, tenant, priority) older than a job; and older than a job
# but younger than another one.
_OLDER_IN_LINE = (
    select(func.count())
    .select_from(Job)
    .where(
        Job.state == JobState.QUEUED,
        Job.queue == bindparam("queue"),
        Job.tenant_id == bindparam("tenant_id"),
        Job.priority == bindparam("priority"),
        tuple_(Job.created_at, Job.id) < _age_param("job"),
    )
)
_OLDER_IN_LINE_SINCE = _OLDER_IN_LINE.where(tuple_(Job.created_at, Job.id) > _age_param("since"))


def own_ahead(session: Session, jobs: list[Job]) -> dict[str, int]:
    """For each queued job: how many queued jobs of its tenant, queue and priority are older.
    Jobs of one line are counted in age order, each count covering only the gap since the
    previous one, so a page of neighbouring jobs costs one deep count per line, not one per
    job."""
    lines: dict[tuple[str, str, int], list[Job]] = defaultdict(list)
    for job in jobs:
        lines[(job.queue, job.tenant_id, job.priority)].append(job)
    out: dict[str, int] = {}
    for line in lines.values():
        line.sort(key=lambda j: (j.created_at, j.id))
        before = 0
        previous: Job | None = None
        for job in line:
            params = {
                "queue": job.queue,
                "tenant_id": job.tenant_id,
                "priority": job.priority,
                "job_created_at": job.created_at,
                "job_id": job.id,
            }
            if previous is None:
                stmt = _OLDER_IN_LINE
            else:
                stmt = _OLDER_IN_LINE_SINCE
                params.update(since_created_at=previous.created_at, since_id=previous.id)
                before += 1  # the previous job itself
            before += int(session.scalar(stmt, params) or 0)
            out[job.id] = before
            previous = job
    return out


# From this many queued jobs on a page, their lines are ranked in one window query instead of
# one count per job (fewer round trips; each line is read once either way).
WINDOW_FROM = 8


def own_ahead_ranked(session: Session, jobs: list[Job]) -> dict[str, int]:
    """`own_ahead` for many jobs at once: one ROW_NUMBER over the lines they are in."""
    lines = {(j.queue, j.tenant_id, j.priority) for j in jobs}
    rank = (
        func.row_number().over(
            partition_by=(Job.queue, Job.tenant_id, Job.priority),
            order_by=(Job.created_at, Job.id),
        )
        - 1
    )
    ranked = (
        select(Job.id.label("id"), rank.label("ahead"))
        .where(
            Job.state == JobState.QUEUED,
            or_(
                *(
                    (Job.queue == q) & (Job.tenant_id == t) & (Job.priority == p)
                    for q, t, p in lines
                )
            ),
        )
        .subquery()
    )
    ids = [j.id for j in jobs]
    rows = session.execute(select(ranked.c.id, ranked.c.ahead).where(ranked.c.id.in_(ids)))
    return {job_id: int(ahead) for job_id, ahead in rows}


def queue_positions(
    session: Session,
    jobs: list[Job],
    order_of: Callable[[str], QueueOrder] | None = None,
) -> dict[str, int]:
    """The position of each queued job in `jobs` (0 = next to start in its queue).
    `order_of`: where a queue's order comes from (default: read now; api/polling.py reuses a
    recent one)."""
    queued = [j for j in jobs if j.state == JobState.QUEUED]
    if not queued:
        return {}
    if len(queued) >= WINDOW_FROM:
        ahead = own_ahead_ranked(session, queued)
    else:
        ahead = own_ahead(session, queued)
    order_of = order_of or (lambda queue: queue_order(session, queue))
    orders = {q: order_of(q) for q in {j.queue for j in queued}}
    return {j.id: orders[j.queue].position(j, ahead[j.id]) for j in queued}
