"""Preemption at checkpoints: which running training jobs make room for a waiting job of a
higher priority class, and how a preempted attempt goes back to the queue.

The periodic scheduler calls `preempt_for_waiting` (scheduler/preemption.py). A queued job
*waits for resources* when it could start now (not in a retry backoff, its tenant under its
quotas, attempts left) and has not for `preempt_after_s`: a free slot would have claimed it.
A job may also wait *for a GPU* once claimed: its slot is free but Ray cannot place its actor
(trainer or model server) because the GPUs are held, which the runner writes on the row
(`waiting_for` `GPU` or `gpu_memory_gb`, `waiting_since`). Such a job, running and waiting
longer than `preempt_after_s`, gets as many running trainings stopped as hold what it asks
(its `num_gpus`, or its `gpu_memory_gb` when memory is short) on one node; only trainings that
hold that resource and are placed themselves qualify, and none is stopped if no node's
qualifying trainings would hold enough. For each waiting job, highest priority first then
oldest, running jobs are asked to stop if

- it is a training job (`train` or `finetune`; generation is never preempted),
- its priority class (batch 0-3 < normal 4-6 < interactive 7-9) is lower than the waiter's,
- it and its tenant are preemptible (`preemptible: false` on the job, allowed by an admin
  with the tenant's `may_opt_out`, or the tenant's own `preemptible` set false by an admin),
- it has been preempted fewer than `max_preemptions` times, and is not being stopped already.

Among those it takes the lowest priority, then the tenant furthest over its weighted share
(core/usage.py), then the most recently started (it has the least work since its start to
lose). A waiter that already has a job stopping for it, or one that stopped for it and is
held off, gets no second one.

The request is a mark on the row (`preempt_requested_at`, `preempted_by`) and a `preemption`
event; the lease keeper of the job's runner sees the mark within a second and asks the trainer
to stop at its next checkpoint (scheduler/runner.py). When the attempt ends,
`requeue_preempted` puts the job back to `queued` without using an attempt (the claim counted
one; it is given back), counts the preemption, charges the attempt's usage and records
`reason: preempted, by: <job id>` in its state event (webhook event `job.preempted`). The job
is not claimed again for `hold_s`, so the freed slot goes to the job it made room for; it
resumes from its last checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from core.jobs import add_event, change_state, priority_class
from core.leases import Lease, finish_job, held_job
from core.quotas import blocked_tenants, load_limits
from core.states import ACTIVE, JobKind, JobState
from core.tables import Job, Tenant, utcnow
from core.usage import charge_attempt, usage_of

CLASS_RANK = {"batch": 0, "normal": 1, "interactive": 2}
TRAINING_KINDS = (str(JobKind.TRAIN), str(JobKind.FINETUNE))
# Waiting jobs looked at per round (the highest priorities, then the oldest).
WAITERS_PER_ROUND = 50
# What a claimed job's actor may wait for that stopping training frees (Job.waiting_for).
GPU_WAITS = ("GPU", "gpu_memory_gb")
EPS = 1e-9


def class_rank(priority: int) -> int:
    return CLASS_RANK[priority_class(priority)]


@dataclass(frozen=True)
class Preemption:
    """A running job asked to stop for a waiting one."""

    job_id: str
    by_job_id: str
    tenant_id: str


def _waiters(session: Session, now: datetime, preempt_after_s: float) -> list[Job]:
    cutoff = now - timedelta(seconds=preempt_after_s)
    waiting = session.scalars(
        select(Job)
        .where(
            Job.state == JobState.QUEUED,
            Job.priority >= 4,  # batch jobs never preempt
            Job.created_at <= cutoff,
            or_(Job.not_before.is_(None), Job.not_before <= cutoff),
            Job.attempt < Job.max_attempts,
        )
        .order_by(Job.priority.desc(), Job.created_at, Job.id)
        .limit(WAITERS_PER_ROUND)
    ).all()
    if not waiting:
        return []
    tenants = {j.tenant_id for j in waiting}
    blocked = blocked_tenants(session, tenants, load_limits(session, tenants), now=now)
    return [j for j in waiting if j.tenant_id not in blocked]


def _placement_waiters(session: Session, now: datetime, preempt_after_s: float) -> list[Job]:
    """Claimed jobs whose actor has waited for a GPU (or GPU memory) since before the cutoff."""
    cutoff = now - timedelta(seconds=preempt_after_s)
    return list(
        session.scalars(
            select(Job)
            .where(
                Job.state == JobState.RUNNING,
                Job.priority >= 4,
                Job.waiting_for.in_(GPU_WAITS),
                Job.waiting_since <= cutoff,
                Job.waiting_since >= Job.started_at,  # this attempt's wait
                Job.preempt_requested_at.is_(None),  # being stopped itself: it leaves
            )
            .order_by(Job.priority.desc(), Job.waiting_since, Job.id)
            .limit(WAITERS_PER_ROUND)
        )
    )


def _held(job: Job, resource: str) -> float:
    """How much of `resource` a running job holds."""
    if resource == "GPU":
        return float(job.num_gpus or 0.0)
    return float(job.gpu_memory_gb or 0.0)


def _making_room(waiter: Job, candidates: list[Job]) -> list[Job]:
    """The victims for a job waiting for a GPU: best first, the trainings of a lower class on
    one node that together hold what it asks; none when no node has enough."""
    resource = waiter.waiting_for or "GPU"
    need = _held(waiter, resource) or EPS
    rank = class_rank(waiter.priority)
    by_node: dict[str, list[Job]] = {}
    held: dict[str, float] = {}
    for c in candidates:
        if class_rank(c.priority) >= rank or _held(c, resource) <= 0:
            continue
        if c.waiting_since is not None:  # not placed in this attempt: it holds nothing
            continue
        node = str((c.placement or {}).get("node_id") or "")
        by_node.setdefault(node, []).append(c)
        held[node] = held.get(node, 0.0) + _held(c, resource)
        if held[node] + EPS >= need:
            return by_node[node]
    return []


def _candidates(session: Session, max_preemptions: int, now: datetime) -> list[Job]:
    """Running training jobs that may be preempted, best victim first."""
    rows = session.execute(
        select(Job, Tenant.weight)
        .join(Tenant, Tenant.id == Job.tenant_id)
        .where(
            Job.state == JobState.RUNNING,
            Job.kind.in_(TRAINING_KINDS),
            Job.preemptible.is_(True),
            Tenant.preemptible.is_(True),
            Job.preempt_count < max_preemptions,
            Job.preempt_requested_at.is_(None),
        )
    ).all()
    if not rows:
        return []
    usage = usage_of(session, {job.tenant_id for job, _ in rows}, now)
    over = {job.tenant_id: usage[job.tenant_id].gpu_seconds / max(1, w) for job, w in rows}
    jobs = [job for job, _ in rows]
    epoch = datetime.min.replace(tzinfo=now.tzinfo)
    jobs.sort(
        key=lambda j: (
            j.priority,
            -over[j.tenant_id],
            -((j.started_at or epoch) - epoch).total_seconds(),
            j.id,
        )
    )
    return jobs


def preempt_for_waiting(
    session: Session,
    *,
    preempt_after_s: float,
    grace_s: float,
    max_preemptions: int,
    now: datetime | None = None,
) -> list[Preemption]:
    """Ask running training jobs to stop for the jobs waiting for resources (module
    docstring); returns the requests made this round."""
    now = now or utcnow()
    waiters = _waiters(session, now, preempt_after_s)
    waiters += _placement_waiters(session, now, preempt_after_s)
    if not waiters:
        return []
    waiters.sort(key=lambda w: -w.priority)  # stable: each kind stays oldest first
    candidates = _candidates(session, max_preemptions, now)
    if not candidates:
        return []
    # Waiters with a job stopping for them, or one that stopped and is held off for them.
    helped = set(
        session.scalars(
            select(Job.preempted_by).where(
                or_(
                    and_(
                        Job.state.in_([str(s) for s in ACTIVE]),
                        Job.preempt_requested_at.is_not(None),
                    ),
                    and_(
                        Job.state == JobState.QUEUED,
                        Job.preempted_by.is_not(None),
                        Job.not_before > now,
                    ),
                )
            )
        )
    )
    made = []
    for waiter in waiters:
        if waiter.id in helped:
            continue
        if waiter.state == JobState.RUNNING:  # claimed: it waits for a GPU, not a slot
            victims = _making_room(waiter, candidates)
        else:
            rank = class_rank(waiter.priority)
            victims = [c for c in candidates if class_rank(c.priority) < rank][:1]
        for victim in victims:
            candidates.remove(victim)
            _ask_to_stop(session, victim, waiter, grace_s, now)
            made.append(Preemption(victim.id, waiter.id, victim.tenant_id))
    return made


def _ask_to_stop(session: Session, victim: Job, waiter: Job, grace_s: float, now: datetime) -> None:
    victim.preempt_requested_at = now
    victim.preempted_by = waiter.id
    wants = "a GPU" if waiter.state == JobState.RUNNING else "the resources"
    add_event(
        session,
        victim,
        "preemption",
        {
            "by": waiter.id,
            "grace_s": grace_s,
            "message": f"job {waiter.id} (priority {waiter.priority}) needs {wants}; "
            f"stopping at the next checkpoint (within {grace_s:g} s)",
        },
    )


def requeue_preempted(
    session: Session, lease: Lease, *, hold_s: float, now: datetime | None = None
) -> JobState:
    """The preempted attempt ended: back to `queued` without using an attempt, not claimed
    again for `hold_s`. A job whose cancel was requested meanwhile ends canceled instead.
    Returns the state written."""
    job = held_job(session, lease)
    if job.state == JobState.CANCELING:
        return finish_job(session, lease, JobState.CANCELED, now=now)
    now = now or utcnow()
    by = job.preempted_by
    job.attempt = max(0, job.attempt - 1)
    job.preempt_count += 1
    change_state(
        session,
        job,
        JobState.QUEUED,
        reason="preempted",
        by=by,
        preemptions=job.preempt_count,
    )
    charge_attempt(session, job, now)
    job.preempt_requested_at = None
    job.lease_token = None
    job.lease_expires_at = None
    job.published_at = None
    job.not_before = now + timedelta(seconds=hold_s) if hold_s > 0 else None
    return JobState.QUEUED
