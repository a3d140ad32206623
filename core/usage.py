"""What each tenant's jobs have cost: the currency of the usage-based fair share
(core/fairness.py) and of the usage the API, the dashboard and the metrics show.

A running attempt costs `rate x seconds`, where the rate is the GPUs the job holds (a fraction
for a shared GPU) or, for a job that holds no GPU, 1: a CPU-only job is charged its slot time.
Usage decays exponentially with the half-life `fair_share_half_life_s`, so a second of use
`age` seconds ago counts `2^(-age / half_life)` (Slurm's decayed usage; its default half-life
is 7 days, ours 1 day).

Each tenant's row in `tenant_usage` holds its decayed GPU-seconds as of `as_of`. An attempt is
added when it ends (finished, given back to the queue, preempted, or reaped), integrated with
the decay over the time it ran. The attempts still running are kept in the same row as totals,
updated when one starts (the claim) and when it ends: their number, the sum of their rates and
the sum of rate x start time, so that what they have cost by now is `rate_sum x now -
rate_start_sum` (undecayed until they end). So a long job's tenant falls back while it runs,
not only when it ends, and reading a tenant's usage is one primary-key read whatever the
number of running jobs (the claim reads it for every tenant with queued work).

The half-life and the policy are settings; `core.db.Database` puts them in each session's
`info`, so the job services that charge an attempt (core/leases.py, core/recovery.py) and the
claim need no extra argument.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Row, Table, bindparam, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.util import identity_key

from core.statements import Prepared
from core.states import ACTIVE
from core.tables import Job, TenantUsage, UTCDateTime, utcnow

HALF_LIFE_INFO = "fair_share_half_life_s"
POLICY_INFO = "fair_share"
DEFAULT_HALF_LIFE_S = 86400.0


def half_life_of(session: Session) -> float:
    """The half-life the session's Database was built with (the default for bare sessions)."""
    return float(session.info.get(HALF_LIFE_INFO, DEFAULT_HALF_LIFE_S))


def policy_of(session: Session) -> str:
    """The fair-share policy the session's Database was built with: `usage` or `starts`."""
    return str(session.info.get(POLICY_INFO, "usage"))


def rate_of(num_gpus: float | None) -> float:
    """GPU-seconds per second of running: the job's GPUs, or 1 for a CPU-only job."""
    return float(num_gpus) if num_gpus else 1.0


def decayed(value: float, elapsed_s: float, half_life_s: float) -> float:
    """`value` measured `elapsed_s` ago, as it counts now."""
    return value * 2.0 ** (-max(0.0, elapsed_s) / half_life_s)


def attempt_cost(
    rate: float, started_at: datetime, ended_at: datetime, now: datetime, half_life_s: float
) -> float:
    """Decayed GPU-seconds at `now` of running at `rate` from `started_at` to `ended_at`:
    the integral of rate x 2^(-(now - t) / half_life) over the run."""
    run_s = (ended_at - started_at).total_seconds()
    if run_s <= 0:
        return 0.0
    k = math.log(2) / half_life_s
    since_end = max(0.0, (now - ended_at).total_seconds())
    # rate/k * (e^(-k since_end) - e^(-k (since_end + run_s))), without cancellation for
    # short runs: e^(-k since_end) * (1 - e^(-k run_s)) = e^(-k since_end) * -expm1(-k run_s).
    return rate / k * math.exp(-k * since_end) * -math.expm1(-k * run_s)


_TABLE = cast(Table, TenantUsage.__table__)
# The columns of the usage rows, read as plain rows (not ORM objects): the claim reads them
# for every tenant with queued work, and the finish locks and rewrites one, for every job.
_STORED = select(_TABLE).where(_TABLE.c.tenant_id.in_(bindparam("tenant_ids", expanding=True)))
_STORED_ONE = select(TenantUsage).where(TenantUsage.tenant_id == bindparam("tenant_id"))
_LOCK_STORED_ONE = Prepared(
    select(
        _TABLE.c.gpu_seconds,
        _TABLE.c.attempts,
        _TABLE.c.as_of,
        _TABLE.c.running_attempts,
        _TABLE.c.running_rate,
        _TABLE.c.running_rate_start,
    )
    .where(_TABLE.c.tenant_id == bindparam("tenant_id"))
    .with_for_update()
)
_SET_STORED = Prepared(
    update(_TABLE)
    .where(_TABLE.c.tenant_id == bindparam("of_tenant"))
    # (Bound parameter names differ from column names, as UPDATE requires.)
    .values(
        gpu_seconds=bindparam("new_gpu_seconds"),
        attempts=bindparam("new_attempts"),
        as_of=bindparam("new_as_of", type_=UTCDateTime()),
        running_attempts=bindparam("new_running_attempts"),
        running_rate=bindparam("new_running_rate"),
        running_rate_start=bindparam("new_running_rate_start"),
    )
)


@dataclass
class _Totals:
    """A usage row's values, read and written with Core statements (charge_attempt)."""

    gpu_seconds: float
    attempts: float
    as_of: datetime
    running_attempts: int
    running_rate: float
    running_rate_start: float


def _locked_row(session: Session, tenant_id: str, at: datetime) -> TenantUsage:
    """The tenant's usage row, locked (created empty as of `at` if it has none), so that two
    attempts starting or ending at once both count."""
    # The lookup need not flush the transaction's pending changes first: they cannot change
    # which usage row this is, and a row already in the session keeps its unflushed values.
    # Without it, finishing a job flushed (and UPDATEd the job row) once more than needed.
    with session.no_autoflush:
        row = session.scalar(_STORED_ONE.with_for_update(), {"tenant_id": tenant_id})
    if row is not None:
        return row
    try:
        with session.begin_nested():
            session.add(
                TenantUsage(
                    tenant_id=tenant_id,
                    gpu_seconds=0.0,
                    attempts=0.0,
                    as_of=at,
                    running_attempts=0,
                    running_rate=0.0,
                    running_rate_start=0.0,
                )
            )
    except IntegrityError:  # another attempt of the tenant got there first
        pass
    row = session.scalar(_STORED_ONE.with_for_update(), {"tenant_id": tenant_id})
    assert row is not None
    return row


def running_cost(row: TenantUsage | Row[Any], now: datetime) -> float:
    """GPU-seconds of the tenant's attempts running now: rate x (now - started_at) summed,
    without their decay while they run (a run of an hour under a 1-day half-life counts 1.4%
    more until it ends, when `charge_attempt` adds it decayed)."""
    if not row.running_attempts:
        return 0.0
    return max(0.0, row.running_rate * now.timestamp() - row.running_rate_start)


# A start adds to the running totals in the statement that locks the row: no read first (the
# claim runs it while its queue's other claims wait). A copy of the row that the session holds
# (the claim read it for the fair share) has those totals expired by start_attempt, so a later
# read in the transaction loads the new ones: cheaper than `fetch`, which has the UPDATE
# return the row's key for every claim to look for a copy.
_START_RUNNING = Prepared(
    update(TenantUsage)
    .where(TenantUsage.tenant_id == bindparam("of_tenant"))
    .values(
        running_attempts=TenantUsage.running_attempts + 1,
        running_rate=TenantUsage.running_rate + bindparam("rate"),
        running_rate_start=TenantUsage.running_rate_start + bindparam("rate_start"),
    )
    .execution_options(synchronize_session=False)
)
_RUNNING_TOTALS = ["running_attempts", "running_rate", "running_rate_start"]


def start_attempt(session: Session, job: Job) -> None:
    """The claim started an attempt of `job` (its `started_at` set): count it as running."""
    assert job.started_at is not None
    rate = rate_of(job.num_gpus)
    rate_start = rate * job.started_at.timestamp()
    params = {"of_tenant": job.tenant_id, "rate": rate, "rate_start": rate_start}
    held = session.identity_map.get(identity_key(TenantUsage, job.tenant_id))
    if held is None:
        # No copy of the row to keep in step: the statement goes on the connection, without
        # the ORM's handling of an UPDATE (the claim reads usage as plain rows: usage_of).
        if _START_RUNNING.run(session.connection(), params).rowcount:
            return
    elif getattr(session.execute(_START_RUNNING.statement, params), "rowcount", 0):
        # (the UPDATE flushed the session's changes first: none is lost)
        session.expire(held, _RUNNING_TOTALS)
        return
    # The tenant's first attempt: its row is created.
    row = _locked_row(session, job.tenant_id, job.started_at)
    row.running_attempts += 1
    row.running_rate += rate
    row.running_rate_start += rate_start


def _end_running(row: TenantUsage | _Totals, job: Job) -> None:
    assert job.started_at is not None
    row.running_attempts = max(0, row.running_attempts - 1)
    if row.running_attempts == 0:  # exact zeros, so that rounding never accumulates
        row.running_rate = row.running_rate_start = 0.0
        return
    rate = rate_of(job.num_gpus)
    row.running_rate = max(0.0, row.running_rate - rate)
    row.running_rate_start -= rate * job.started_at.timestamp()


def recount_running(session: Session) -> int:
    """Set every tenant's running totals from the job rows (for rows written other than by
    the claim: a bulk load, a repair); returns the attempts counted."""
    totals: dict[str, tuple[int, float, float]] = {}
    rows = session.execute(
        select(Job.tenant_id, Job.num_gpus, Job.started_at).where(
            Job.state.in_([str(s) for s in ACTIVE]), Job.started_at.is_not(None)
        )
    )
    for tenant_id, num_gpus, started_at in rows:
        assert started_at is not None  # the query's condition
        count, rates, rate_start = totals.get(tenant_id, (0, 0.0, 0.0))
        rate = rate_of(num_gpus)
        totals[tenant_id] = (count + 1, rates + rate, rate_start + rate * started_at.timestamp())
    now = utcnow()
    for row in session.scalars(select(TenantUsage).with_for_update()):
        row.running_attempts, row.running_rate, row.running_rate_start = 0, 0.0, 0.0
    for tenant_id, (count, rates, rate_start) in totals.items():
        row = _locked_row(session, tenant_id, now)
        row.running_attempts, row.running_rate, row.running_rate_start = count, rates, rate_start
    return sum(count for count, _, _ in totals.values())


def charge_attempt(session: Session, job: Job, ended_at: datetime) -> float:
    """The attempt of `job` that ran from its `started_at` to `ended_at` ended: it no longer
    counts as running, and its cost is added to its tenant's usage; returns the attempt's
    GPU-seconds (undecayed). The tenant's row is locked, so two attempts ending at once both
    count."""
    if job.started_at is None:
        return 0.0
    half_life_s = half_life_of(session)
    if session.identity_map.get(identity_key(TenantUsage, job.tenant_id)) is None:
        # The usual case (every finish): a locking read of the row's values and one UPDATE,
        # both Core statements on the connection, not an ORM object and its flush.
        conn = session.connection()
        found = _LOCK_STORED_ONE.run(conn, {"tenant_id": job.tenant_id}).first()
        if found is not None:
            totals = _Totals(*found)
            cost = _charge(totals, job, ended_at, half_life_s)
            new = {f"new_{name}": value for name, value in vars(totals).items()}
            _SET_STORED.run(conn, {"of_tenant": job.tenant_id, **new})
            return cost
    # A copy the session holds (its values may be unflushed), or no row yet (it is created).
    return _charge(_locked_row(session, job.tenant_id, ended_at), job, ended_at, half_life_s)


def _charge(row: TenantUsage | _Totals, job: Job, ended_at: datetime, half_life_s: float) -> float:
    """charge_attempt's arithmetic on the row's values (the caller writes them)."""
    assert job.started_at is not None
    _end_running(row, job)
    if ended_at <= job.started_at:
        return 0.0
    rate = rate_of(job.num_gpus)
    # Both terms are brought to the later of the two times (ends may be recorded out of order).
    at = max(row.as_of, ended_at)
    since_s = (at - row.as_of).total_seconds()
    row.gpu_seconds = decayed(row.gpu_seconds, since_s, half_life_s) + attempt_cost(
        rate, job.started_at, ended_at, at, half_life_s
    )
    row.attempts = decayed(row.attempts, since_s, half_life_s) + decayed(
        1.0, (at - ended_at).total_seconds(), half_life_s
    )
    row.as_of = at
    return rate * (ended_at - job.started_at).total_seconds()


@dataclass(frozen=True)
class Usage:
    """A tenant's decayed usage now: GPU-seconds (running attempts included), the part of it
    that running attempts make, and the decayed mean cost of one attempt (None without
    history)."""

    tenant_id: str
    gpu_seconds: float
    running_gpu_seconds: float
    mean_attempt_gpu_seconds: float | None


def usage_of(session: Session, tenant_ids: Iterable[str], now: datetime) -> dict[str, Usage]:
    """Each tenant's usage at `now` (tenants without any are at 0)."""
    ids = list(tenant_ids)
    if not ids:
        return {}
    half_life_s = half_life_of(session)
    # Plain rows on the connection; the flush a Session read would make comes first, so
    # usage changed earlier in the transaction is read as it now stands.
    session.flush()
    rows = session.connection().execute(_STORED, {"tenant_ids": ids})
    stored = {r.tenant_id: r for r in rows}
    return {
        tenant_id: usage_from(tenant_id, stored.get(tenant_id), now, half_life_s)
        for tenant_id in ids
    }


def usage_from(tenant_id: str, row: Row[Any] | None, now: datetime, half_life_s: float) -> Usage:
    """A tenant's usage at `now` from its usage row's columns (`row` has them by name, as
    `TenantUsage` does; None, or a row whose `as_of` is NULL from an outer join: no usage)."""
    past = running = 0.0
    mean = None
    if row is not None and row.as_of is not None:
        since_s = (now - row.as_of).total_seconds()
        past = decayed(row.gpu_seconds, since_s, half_life_s)
        attempts = decayed(row.attempts, since_s, half_life_s)
        mean = past / attempts if attempts > 1e-9 else None
        running = running_cost(row, now)
    return Usage(tenant_id, past + running, running, mean)


def fair_share_report(
    session: Session, now: datetime, weights: dict[str, int]
) -> dict[str, dict[str, float | None]]:
    """For the API, the dashboard and the metrics: each tenant's decayed GPU-seconds (running
    attempts included, and apart), its weighted share (its weight over the weights of the
    tenants that have usage: `weights` lists every tenant), its share of the usage, and the
    ratio of the two (below 1: under its share, so it goes first)."""
    ids = set(session.scalars(select(TenantUsage.tenant_id))) & set(weights)
    usage = usage_of(session, ids, now)
    active = {t for t, u in usage.items() if u.gpu_seconds > 1e-6}
    total_weight = sum(weights[t] for t in active) or 1
    total_usage = sum(usage[t].gpu_seconds for t in active)
    out: dict[str, dict[str, float | None]] = {}
    for tenant_id, weight in weights.items():
        u = usage.get(tenant_id)
        used = u.gpu_seconds if u is not None else 0.0
        share = weight / (total_weight + (0 if tenant_id in active else weight))
        used_share = used / total_usage if total_usage > 0 else 0.0
        out[tenant_id] = {
            "gpu_seconds": round(used, 3),
            "running_gpu_seconds": round(u.running_gpu_seconds, 3) if u is not None else 0.0,
            "share": round(share, 4),
            "usage_share": round(used_share, 4),
            "ratio": round(used_share / share, 4),
        }
    return out
