"""Per-tenant quotas: the limits on a tenant row, what a tenant uses now, the check a
submission passes, and which tenants the claim must skip.

- `max_running`: jobs running at once (all queues). Enforced inside the claim, with the
  tenant's row locked while its running jobs are counted, so no number of workers can exceed
  it; jobs over it simply wait queued. It never refuses a submission.
- `max_queued`: jobs waiting (queued or scheduled). A submission that would exceed it is
  refused with 429 whatever the policy (holding it would make the limit meaningless).
- `gpu_seconds_budget` per `budget_period_s`: run seconds x GPUs held (a fraction for a shared
  GPU; a job that holds no GPU counts as one, so a CPU-only cluster still has a budget),
  summed over the jobs that ran in the current period. Periods are fixed windows of
  `budget_period_s` from the Unix epoch (UTC); a job spanning a boundary counts its time after
  it. Over budget, `over_quota="reject"` refuses new submissions with 429; `"hold"` accepts
  them and they wait queued until the next period.
  Either way the claim starts nothing more of that tenant's work in this period.

A 429 body names the limit: `{"type": "quota-exceeded", "limit": "max_queued", "current": 10,
"allowed": 10, ...}`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import bindparam, func, or_, select
from sqlalchemy.orm import Session

from core.errors import QuotaExceededError
from core.states import ACTIVE, JobState
from core.tables import Job, Tenant, utcnow

OVER_QUOTA_POLICIES = ("reject", "hold")
WAITING = (JobState.QUEUED, JobState.SCHEDULED)


@dataclass(frozen=True)
class TenantLimits:
    tenant_id: str
    weight: int = 1
    max_running: int | None = None
    max_queued: int | None = None
    gpu_seconds_budget: float | None = None
    budget_period_s: int = 86400
    over_quota: str = "reject"


_LIMITS = select(
    Tenant.id,
    Tenant.weight,
    Tenant.max_running,
    Tenant.max_queued,
    Tenant.gpu_seconds_budget,
    Tenant.budget_period_s,
    Tenant.over_quota,
)
# Built once: every submission and every claim reads limits.
_LIMITS_OF = _LIMITS.where(Tenant.id.in_(bindparam("tenant_ids", expanding=True)))


def load_limits(
    session: Session, tenant_ids: Iterable[str] | None = None
) -> dict[str, TenantLimits]:
    # Plain rows on the connection (every claim reads limits), after the flush a Session read
    # would make, so that a tenant changed earlier in the transaction is read as it stands.
    session.flush()
    if tenant_ids is None:
        rows = session.connection().execute(_LIMITS)
    else:
        rows = session.connection().execute(_LIMITS_OF, {"tenant_ids": list(tenant_ids)})
    return {row[0]: TenantLimits(*row) for row in rows}


_LIMITS_OF_ONE = _LIMITS.where(Tenant.id == bindparam("tenant_id"))


def tenant_limits(session: Session, tenant_id: str) -> TenantLimits | None:
    """One tenant's limits (every submission reads them): a Core statement on the session's
    connection, without the ORM's statement handling."""
    row = session.connection().execute(_LIMITS_OF_ONE, {"tenant_id": tenant_id}).first()
    return TenantLimits(*row) if row is not None else None


def period_start(period_s: int, now: datetime) -> datetime:
    epoch = int(now.timestamp())
    return datetime.fromtimestamp(epoch - epoch % period_s, UTC)


def gpu_seconds_used(session: Session, tenant_id: str, period_s: int, now: datetime) -> float:
    """GPU-seconds this tenant's jobs used in the current period (running ones up to now)."""
    since = period_start(period_s, now)
    rows = session.execute(
        select(Job.started_at, Job.finished_at, Job.num_gpus).where(
            Job.tenant_id == tenant_id,
            Job.started_at.is_not(None),
            or_(Job.finished_at >= since, Job.state.in_(list(ACTIVE))),
        )
    )
    used = 0.0
    for started_at, finished_at, num_gpus in rows:
        if started_at is None:
            continue
        end = finished_at or now
        begin = max(started_at, since)
        if end > begin:
            used += (end - begin).total_seconds() * (num_gpus if num_gpus else 1.0)
    return used


def running_count(session: Session, tenant_id: str) -> int:
    n = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.state.in_(list(ACTIVE)), Job.tenant_id == tenant_id)
    )
    return int(n or 0)


def waiting_count(session: Session, tenant_id: str) -> int:
    n = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.state.in_(list(WAITING)), Job.tenant_id == tenant_id)
    )
    return int(n or 0)


def blocked_tenants(
    session: Session,
    tenant_ids: Iterable[str],
    limits: dict[str, TenantLimits],
    *,
    now: datetime,
) -> set[str]:
    """The tenants among `tenant_ids` whose work may not start now: at their running cap or
    over their GPU-seconds budget. A capped tenant's row is locked first (claims of one tenant
    in several queues take turns), so the count cannot go stale before the claim commits."""
    blocked = set()
    # Locks are taken in id order, so claims on two queues never wait for each other in a
    # cycle. FOR NO KEY UPDATE (on PostgreSQL) leaves new jobs of the tenant free to reference
    # the row while the claim counts.
    for tenant_id in sorted(tenant_ids):
        lim = limits.get(tenant_id)
        if lim is None or (lim.max_running is None and lim.gpu_seconds_budget is None):
            continue
        session.scalar(
            select(Tenant.id).where(Tenant.id == tenant_id).with_for_update(key_share=True)
        )
        at_cap = lim.max_running is not None and (
            running_count(session, tenant_id) >= lim.max_running
        )
        over_budget = lim.gpu_seconds_budget is not None and (
            gpu_seconds_used(session, tenant_id, lim.budget_period_s, now) >= lim.gpu_seconds_budget
        )
        if at_cap or over_budget:
            blocked.add(tenant_id)
    return blocked


def has_submission_limit(lim: TenantLimits | None) -> bool:
    """Whether `check_submission` can refuse a submission of a tenant with these limits."""
    if lim is None:
        return False
    return lim.max_queued is not None or (
        lim.gpu_seconds_budget is not None and lim.over_quota == "reject"
    )


def check_submission(session: Session, tenant_id: str, count: int = 1) -> None:
    """Refuse (429) `count` new jobs of `tenant_id` that its quotas do not admit (all or
    none: a batch is admitted whole); see the module."""
    lim = load_limits(session, [tenant_id]).get(tenant_id)
    if lim is None:
        return
    if lim.max_queued is not None:
        waiting = waiting_count(session, tenant_id)
        if waiting + count > lim.max_queued:
            more = f" and {count} more asked for" if count > 1 else ""
            raise QuotaExceededError(
                f"this tenant already has {waiting} jobs waiting{more}; its limit is "
                f"{lim.max_queued}",
                limit="max_queued",
                current=waiting,
                allowed=lim.max_queued,
            )
    if lim.gpu_seconds_budget is not None and lim.over_quota == "reject":
        now = utcnow()
        used = gpu_seconds_used(session, tenant_id, lim.budget_period_s, now)
        if used >= lim.gpu_seconds_budget:
            reset = period_start(lim.budget_period_s, now) + timedelta(seconds=lim.budget_period_s)
            raise QuotaExceededError(
                f"this tenant used {used:.0f} of its {lim.gpu_seconds_budget:g} GPU-seconds "
                f"this period; the budget renews at {reset.isoformat()}",
                limit="gpu_seconds_budget",
                current=round(used, 3),
                allowed=lim.gpu_seconds_budget,
                resets_at=reset.isoformat().replace("+00:00", "Z"),
            )


def usage(session: Session, tenant_id: str) -> dict[str, float | int]:
    """What the tenant uses now, for the admin API and the dashboard."""
    lim = load_limits(session, [tenant_id]).get(tenant_id) or TenantLimits(tenant_id)
    return {
        "running": running_count(session, tenant_id),
        "waiting": waiting_count(session, tenant_id),
        "gpu_seconds": round(
            gpu_seconds_used(session, tenant_id, lim.budget_period_s, utcnow()), 3
        ),
    }
