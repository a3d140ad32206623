"""Which queued job runs next: priority first, then weighted fair share between tenants, then
age. The runner's claim (`claim_next`) and the API's queue positions (core/positions.py) use
the same order.

The fair share has two policies (the setting `fair_share`):

- `usage` (the default): the tenant furthest below its weighted share of GPU-seconds goes
  first, that is the one with the lowest `usage / weight` (core/usage.py: a job's GPUs x its
  running time, CPU-only jobs by their slot time, decayed with a half-life, running jobs
  included). Ties (two tenants without usage) go to the oldest waiting job. A tenant of long
  jobs falls back while its jobs run, so tenants get equal GPU time, not equal starts. The
  order of `queue_position` under this policy is an estimate: it assumes each start costs the
  tenant its mean attempt cost so far (1 GPU-second without history).
- `starts`: start-time fair queuing, below; every start costs the same.

Under `starts` the fair share is start-time fair queuing. Each tenant has a *pass* per queue
(its row in `fair_share`): the virtual start time of its next job. A tenant's k-th queued job
(its own jobs ordered by priority, then age) starts at `pass + (k - 1) * stride`, where `stride =
STRIDE_UNIT // weight`, so a tenant of weight 2 gets two starts for every one of a tenant of
weight 1. The whole order is

    priority (higher first), virtual start (lower first), tenant id, then the tenant's own order

and the next job is always some tenant's first. Claiming a tenant's job advances its pass by
one stride, which leaves the virtual start of every other queued job unchanged: so, until jobs
arrive or quotas change, jobs start exactly in the order listed now, which is what
`queue_position` reports. The queue's *clock* (the `fair_share` row with tenant_id "") follows the
lowest virtual start among the tenants with work; a tenant that was idle starts at the clock,
not at its old pass, so idle time is not saved up into a burst, and a tenant arriving with one
job waits behind at most one job of each tenant that already has work (per free slot).

Under `starts` fair share is counted in job starts, not in run time (a tenant of long jobs
gets as many starts as one of short jobs); the running cap and the GPU-seconds budget
(`core.quotas`) bound time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Float,
    Integer,
    String,
    bindparam,
    column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from core.leases import Lease, claim_first, claim_first_statement, claim_job
from core.quotas import TenantLimits, blocked_tenants, load_limits
from core.statements import Prepared
from core.states import JobState
from core.tables import FairShare, Job, UTCDateTime, utcnow
from core.usage import half_life_of, policy_of, usage_from

# lcm(1..16): strides are exact for weights 1-16 (and integral, so consistent, for 17-100).
STRIDE_UNIT = 720720
CLOCK = ""  # the tenant_id of a queue's clock row
# A claim gives up after this many lost races or expired deadlines (another token retries).
MAX_CLAIM_TRIES = 32


def stride(weight: int) -> int:
    return STRIDE_UNIT // max(1, weight)


# The statements a claim and a queue position run, built once with bound parameters: building
# a statement costs SQLAlchemy several times what running it costs, and these run per job.
# The clock's value, locked (a plain row: the claim reads it for every job).
_CLOCK_ROW = Prepared(
    select(FairShare.pass_value)
    .where(FairShare.queue == bindparam("queue"), FairShare.tenant_id == CLOCK)
    .with_for_update()
)
_PASSES = select(FairShare).where(
    FairShare.queue == bindparam("queue"),
    FairShare.tenant_id.in_(bindparam("tenant_ids", expanding=True)),
)
_SET_PASS = (
    update(FairShare)
    .where(FairShare.queue == bindparam("in_queue"), FairShare.tenant_id == bindparam("of_tenant"))
    .values(pass_value=bindparam("new_pass"))
    .execution_options(synchronize_session=False)
)
# A tenant's first queued job in its own order that may start now. The claim runs it as a
# subquery of its UPDATE of the job table (core.leases.claim_first), hence the alias of that
# table and parameter names that are not column names (an UPDATE reserves those).
_DUE = aliased(Job, name="due")
_FIRST_DUE = Prepared(
    select(_DUE.id)
    .where(
        _DUE.state == JobState.QUEUED,
        _DUE.queue == bindparam("in_queue"),
        _DUE.tenant_id == bindparam("of_tenant"),
        or_(_DUE.not_before.is_(None), _DUE.not_before <= bindparam("due_at", type_=UTCDateTime())),
        _DUE.attempt < _DUE.max_attempts,
    )
    .order_by(_DUE.priority.desc(), _DUE.created_at, _DUE.id)
    .limit(1)
)
_CLAIM_FIRST_DUE = claim_first_statement(_FIRST_DUE.statement)


def _clock(session: Session, queue: str) -> int:
    """The queue's clock, its row locked: claims on one queue take turns (they are short).
    Read on the connection, after the flush a Session read would make (the claim's later
    plain reads count on it)."""
    session.flush()
    value = _CLOCK_ROW.run(session.connection(), {"queue": queue}).scalar()
    if value is not None:
        return int(value)
    try:
        with session.begin_nested():
            session.add(FairShare(queue=queue, tenant_id=CLOCK, pass_value=0))
    except IntegrityError:  # another claim created it first
        pass
    value = _CLOCK_ROW.run(session.connection(), {"queue": queue}).scalar()
    assert value is not None
    return int(value)


def _passes(session: Session, queue: str, tenant_ids: list[str]) -> dict[str, FairShare]:
    if not tenant_ids:
        return {}
    rows = session.scalars(_PASSES, {"queue": queue, "tenant_ids": tenant_ids})
    return {r.tenant_id: r for r in rows}


@dataclass(frozen=True)
class Head:
    """A tenant with queued work in a queue: its best priority and virtual start (its pass, or
    under the usage policy its usage / weight), and what one start adds to it."""

    tenant_id: str
    priority: int
    start: float
    stride: float
    # Under the usage policy: when its first job in line was created (the tie-break).
    oldest_at: datetime | None = None


# Each tenant with queued jobs in a queue and its best priority, by a skip scan of the claim
# index (one probe per tenant, however deep the backlog): a GROUP BY would read every row.
HEADS_SQL = Prepared(
    text(
        """
    WITH RECURSIVE tenants(tenant_id) AS (
        SELECT min(tenant_id) FROM job WHERE state = :state AND queue = :queue
        UNION ALL
        SELECT (
            SELECT min(tenant_id) FROM job
            WHERE state = :state AND queue = :queue AND tenant_id > tenants.tenant_id
        )
        FROM tenants WHERE tenants.tenant_id IS NOT NULL
    )
    SELECT tenant_id, (
        SELECT max(priority) FROM job
        WHERE state = :state AND queue = :queue AND tenant_id = tenants.tenant_id
    )
    FROM tenants WHERE tenant_id IS NOT NULL
    """
    )
)


# The same, for the usage policy, with when each tenant's first job in line (best priority,
# then oldest) was created, its tie-break (one more probe of the claim index per tenant), and
# each tenant's limits and usage row: one statement where three were (`load_limits`,
# `usage_of`), for every claim.
HEADS_AGED_SQL = Prepared(
    text(
        """
    WITH RECURSIVE tenants(tenant_id) AS (
        SELECT min(tenant_id) FROM job WHERE state = :state AND queue = :queue
        UNION ALL
        SELECT (
            SELECT min(tenant_id) FROM job
            WHERE state = :state AND queue = :queue AND tenant_id > tenants.tenant_id
        )
        FROM tenants WHERE tenants.tenant_id IS NOT NULL
    ),
    heads(tenant_id, priority) AS (
        SELECT tenant_id, (
            SELECT max(priority) FROM job
            WHERE state = :state AND queue = :queue AND tenant_id = tenants.tenant_id
        )
        FROM tenants WHERE tenant_id IS NOT NULL
    )
    SELECT heads.tenant_id, heads.priority, (
        SELECT min(created_at) FROM job
        WHERE state = :state AND queue = :queue AND tenant_id = heads.tenant_id
            AND priority = heads.priority
    ) AS oldest_at,
    tenant.weight, tenant.max_running, tenant.max_queued, tenant.gpu_seconds_budget,
    tenant.budget_period_s, tenant.over_quota,
    tenant_usage.gpu_seconds, tenant_usage.attempts, tenant_usage.as_of,
    tenant_usage.running_attempts, tenant_usage.running_rate, tenant_usage.running_rate_start
    FROM heads
    LEFT JOIN tenant ON tenant.id = heads.tenant_id
    LEFT JOIN tenant_usage ON tenant_usage.tenant_id = heads.tenant_id
    """
    ).columns(
        column("tenant_id", String),
        column("priority", Integer),
        column("oldest_at", UTCDateTime()),
        column("weight", Integer),
        column("max_running", Integer),
        column("max_queued", Integer),
        column("gpu_seconds_budget", Float),
        column("budget_period_s", Integer),
        column("over_quota", String),
        column("gpu_seconds", Float),
        column("attempts", Float),
        column("as_of", UTCDateTime()),
        column("running_attempts", Integer),
        column("running_rate", Float),
        column("running_rate_start", Float),
    )
)


def _usage_heads(
    session: Session, rows: Sequence[Any], now: datetime
) -> tuple[list[Head], dict[str, TenantLimits]]:
    """Heads in the usage policy's order: priority, usage / weight, then the oldest job; and
    the tenants' limits (rows of HEADS_AGED_SQL)."""
    half_life_s = half_life_of(session)
    heads = []
    limits = {}
    for row in rows:
        tenant_id = row.tenant_id
        weight = 1
        if row.weight is not None:  # (a tenant row exists: the job's foreign key says so)
            limits[tenant_id] = lim = TenantLimits(
                tenant_id,
                row.weight,
                row.max_running,
                row.max_queued,
                row.gpu_seconds_budget,
                row.budget_period_s,
                row.over_quota,
            )
            weight = lim.weight
        u = usage_from(tenant_id, row, now, half_life_s)
        cost = u.mean_attempt_gpu_seconds or 1.0
        heads.append(
            Head(tenant_id, int(row.priority), u.gpu_seconds / weight, cost / weight, row.oldest_at)
        )
    heads.sort(key=lambda h: (-h.priority, h.start, h.oldest_at or now, h.tenant_id))
    return heads, limits


def _heads(
    session: Session, queue: str, clock: int, now: datetime
) -> tuple[list[Head], dict[str, TenantLimits]]:
    """Every tenant with queued jobs in `queue`, in claim order, and those tenants' limits."""
    is_usage = policy_of(session) == "usage"
    params = {"state": str(JobState.QUEUED), "queue": queue}
    # On the connection: a plain read, without the ORM's statement handling (the claim's
    # lookup of the clock row before it flushed whatever the transaction had pending).
    rows = (HEADS_AGED_SQL if is_usage else HEADS_SQL).run(session.connection(), params).all()
    if not rows:
        return [], {}
    if is_usage:
        return _usage_heads(session, rows, now)
    limits = load_limits(session, [r[0] for r in rows])
    passes = _passes(session, queue, [r[0] for r in rows])
    heads = []
    for tenant_id, priority in rows:
        row = passes.get(tenant_id)
        start = max(row.pass_value, clock) if row is not None else clock
        weight = limits[tenant_id].weight if tenant_id in limits else 1
        heads.append(Head(tenant_id, int(priority), start, stride(weight)))
    heads.sort(key=lambda h: (-h.priority, h.start, h.tenant_id))
    return heads, limits


def _first_due(session: Session, queue: str, tenant_id: str, now: datetime) -> str | None:
    """The tenant's first queued job in its own order that may start now."""
    session.flush()  # what the Session's read would flush first; then a plain read
    params = {"in_queue": queue, "of_tenant": tenant_id, "due_at": now}
    return _FIRST_DUE.run(session.connection(), params).scalar()


def claim_next(
    session: Session,
    queue: str,
    *,
    lease_ttl_s: float,
    now: datetime | None = None,
    limits_seen: dict[str, TenantLimits] | None = None,
) -> Lease | None:
    """Claim the best queued job of `queue` that may start now, or return None when there is
    none (the queue is empty, every tenant with work is at a quota, or every job waits for its
    backoff). One conditional UPDATE decides each claim (`core.leases.claim_job`), so two
    callers never get the same job; a lost race moves on to the next candidate. `now`: the
    time of the claim (a simulation's clock; the real one otherwise). `limits_seen`, when
    given, receives the limits of the tenants the claim looked at, as read in its transaction
    (the runner tells from them whether the claimed job's tenant has quotas, without reading
    its row again)."""
    now = now or utcnow()
    # Under the usage policy the clock's value goes unused, but its row lock still makes the
    # claims on a queue take turns, each reading the queue and the usage as the one before it
    # left them. On SQLite a writing transaction holds the database's one write lock from its
    # start, which does that already: the clock is not read there.
    if policy_of(session) == "usage" and session.get_bind().dialect.name == "sqlite":
        clock = 0
    else:
        clock = _clock(session, queue)
    heads, limits = _heads(session, queue, clock, now)
    if limits_seen is not None:
        limits_seen.update(limits)
    blocked = blocked_tenants(session, [h.tenant_id for h in heads], limits, now=now)
    tries = 0
    for head in heads:
        if head.tenant_id in blocked:
            continue
        while tries < MAX_CLAIM_TRIES:
            tries += 1
            # The tenant's first due job, found and claimed in one statement; when that
            # claims nothing, the two steps tell why (no job due, or a deadline passed).
            due = {"in_queue": queue, "of_tenant": head.tenant_id, "due_at": now}
            lease = claim_first(session, _CLAIM_FIRST_DUE, due, lease_ttl_s=lease_ttl_s, now=now)
            if lease is None:
                job_id = _first_due(session, queue, head.tenant_id, now)
                if job_id is None:
                    break
                lease = claim_job(session, job_id, lease_ttl_s=lease_ttl_s, now=now)
            if lease is None:  # its deadline passed, or another caller won it: next one
                continue
            if head.oldest_at is None:  # the starts policy: the tenant's pass moves on
                _advance(session, queue, head, clock, int(min(h.start for h in heads)))
            return lease
    return None


def _advance(session: Session, queue: str, head: Head, clock: int, lowest_start: int) -> None:
    """The claimed job started at `head.start`: the tenant's pass moves one stride beyond it,
    and the clock to the lowest start of any tenant with work (never past one, so that no
    waiting tenant is moved and the order already reported stays true)."""
    if lowest_start > clock:
        session.execute(
            _SET_PASS, {"in_queue": queue, "of_tenant": CLOCK, "new_pass": lowest_start}
        )
    new_pass = int(head.start + head.stride)
    updated = session.execute(
        _SET_PASS, {"in_queue": queue, "of_tenant": head.tenant_id, "new_pass": new_pass}
    )
    if getattr(updated, "rowcount", 0) == 0:
        session.add(FairShare(queue=queue, tenant_id=head.tenant_id, pass_value=new_pass))
    session.flush()
