"""Who is preempted, and what a preempted attempt leaves in the row (core/preemption.py), on
real SQLite and PostgreSQL: the lowest priority class and the tenant furthest over its share
first, never a generation job, never a job or tenant that opted out, at most
`max_preemptions` times, one job per waiter; a preempted attempt goes back to `queued` without
using an attempt, says by which job, and sends the `job.preempted` webhook. A claimed job whose
actor waits for a GPU that lower-class training holds makes room too. The stop itself,
with a real trainer, is in tests/faults/test_preemption_stack.py."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from core.events import Event, Log, Progress
from core.fairness import claim_next
from core.jobs import NewJob, create_job
from core.leases import Lease, claim_job
from core.preemption import preempt_for_waiting, requeue_preempted
from core.recording import record_placement, record_waiting
from core.settings import Settings
from core.states import JobKind, JobState
from core.tables import Job, JobEvent, Tenant, WebhookDelivery, utcnow
from tests.support.jobs import tenants_database
from workers.families.base import PreemptedError
from workers.preemption import NOTICE, CheckpointStop


@pytest.fixture
def db(database_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    settings = Settings(var_dir=tmp_path / "var", database_url=database_url)
    database = tenants_database(settings, "a", "b", "c")
    yield database
    database.dispose()


def _job(db, tenant: str, kind: JobKind, priority: int, **over: object) -> str:  # type: ignore[no-untyped-def]
    generate = kind == JobKind.GENERATE
    with db.transaction() as session:
        job, _ = create_job(
            session,
            NewJob(
                tenant_id=db.tenants[tenant],
                kind=kind,
                family="echo" if generate else "charlm",
                queue="generate" if generate else "train",
                params={},
                model_id=db.echo_id if generate else None,
                priority=priority,
                **over,  # type: ignore[arg-type]
            ),
        )
        return job.id


def _running(  # type: ignore[no-untyped-def]
    db, tenant: str, kind: JobKind, priority: int, at: datetime | None = None, **over: object
) -> Lease:
    job_id = _job(db, tenant, kind, priority, **over)
    with db.transaction() as session:
        lease = claim_job(session, job_id, lease_ttl_s=7200, now=at)
    assert lease is not None
    return lease


def _placed(db, lease: Lease, node: str) -> None:  # type: ignore[no-untyped-def]
    with db.transaction() as session:
        record_placement(session, lease, {"node_id": node, "gpu_ids": ["0"]})


def _waits(db, lease: Lease, resource: str, since: datetime) -> None:  # type: ignore[no-untyped-def]
    with db.transaction() as session:
        record_waiting(session, lease, resource, now=since)


def _round(db, now: datetime | None = None, max_preemptions: int = 3) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    with db.transaction() as session:
        made = preempt_for_waiting(
            session,
            preempt_after_s=30,
            grace_s=30,
            max_preemptions=max_preemptions,
            now=now or utcnow() + timedelta(seconds=31),
        )
    return [(p.job_id, p.by_job_id) for p in made]


def test_the_lowest_class_goes_first_and_generation_never(db) -> None:  # type: ignore[no-untyped-def]
    _running(db, "a", JobKind.GENERATE, 0)  # a generation job: never preempted
    normal = _running(db, "a", JobKind.TRAIN, 5)
    batch = _running(db, "b", JobKind.TRAIN, 2)
    waiter = _job(db, "c", JobKind.GENERATE, 8)
    assert _round(db, now=utcnow() + timedelta(seconds=5)) == []  # it has not waited 30 s
    assert _round(db) == [(batch.job_id, waiter)]
    assert _round(db) == []  # one job stopping for it is enough
    with db.read() as session:
        row = session.get(Job, batch.job_id)
        assert row is not None and row.preempt_requested_at is not None
        assert row.preempted_by == waiter and row.state == JobState.RUNNING
        event = session.scalar(select(JobEvent).where(JobEvent.type == "preemption"))
        assert event is not None and event.job_id == batch.job_id and event.data["by"] == waiter
    # A second waiter of the interactive class takes the normal-class trainer.
    second = _job(db, "c", JobKind.TRAIN, 9)
    assert _round(db) == [(normal.job_id, second)]


def test_a_class_never_preempts_its_own_or_a_higher_one(db) -> None:  # type: ignore[no-untyped-def]
    _running(db, "a", JobKind.TRAIN, 4)
    _job(db, "b", JobKind.GENERATE, 6)  # normal waits behind normal: no preemption
    _job(db, "b", JobKind.GENERATE, 1)  # batch never preempts
    assert _round(db) == []


def test_opted_out_jobs_and_tenants_are_not_preempted(db) -> None:  # type: ignore[no-untyped-def]
    _running(db, "a", JobKind.TRAIN, 1, preemptible=False)
    exempt = _running(db, "b", JobKind.TRAIN, 1)
    with db.transaction() as session:
        session.execute(
            update(Tenant).where(Tenant.id == db.tenants["b"]).values(preemptible=False)
        )
    _job(db, "c", JobKind.GENERATE, 8)
    assert _round(db) == []
    with db.transaction() as session:
        session.execute(update(Tenant).where(Tenant.id == db.tenants["b"]).values(preemptible=True))
    assert [victim for victim, _ in _round(db)] == [exempt.job_id]


def test_the_tenant_furthest_over_its_share_goes_first(db) -> None:  # type: ignore[no-untyped-def]
    # b's trainer has run for an hour, a's for a minute.
    now = utcnow()
    _running(db, "a", JobKind.TRAIN, 2, at=now - timedelta(seconds=60))
    heavy = _running(db, "b", JobKind.TRAIN, 2, at=now - timedelta(seconds=3600))
    _job(db, "c", JobKind.GENERATE, 8)
    assert [victim for victim, _ in _round(db)] == [heavy.job_id]


def test_a_preempted_attempt_is_requeued_without_using_an_attempt(db) -> None:  # type: ignore[no-untyped-def]
    lease = _running(db, "a", JobKind.TRAIN, 2, webhook="https://example.com/hook")
    waiter = _job(db, "b", JobKind.GENERATE, 8)
    assert _round(db) == [(lease.job_id, waiter)]
    with db.transaction() as session:
        state = requeue_preempted(session, lease, hold_s=60)
    assert state == JobState.QUEUED
    with db.read() as session:
        job = session.get(Job, lease.job_id)
        assert job is not None
        assert job.state == JobState.QUEUED and job.attempt == 0 and job.preempt_count == 1
        assert job.preempted_by == waiter and job.preempt_requested_at is None
        assert job.lease_token is None and job.not_before is not None
        assert job.not_before > utcnow() + timedelta(seconds=50)
        events = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.type == "state")
        ).all()
        assert events[-1].data == {
            "from": "running",
            "to": "queued",
            "reason": "preempted",
            "by": waiter,
            "preemptions": 1,
        }
        hooks = session.scalars(
            select(WebhookDelivery.event).where(WebhookDelivery.job_id == job.id)
        ).all()
        assert "preempted" in hooks
    # Held off: the claim does not start it again before the hold is over.
    with db.transaction() as session:
        assert claim_next(session, "train", lease_ttl_s=60) is None


def test_a_job_is_preempted_at_most_max_preemptions_times(db) -> None:  # type: ignore[no-untyped-def]
    lease = _running(db, "a", JobKind.TRAIN, 2)
    for n in range(2):
        _job(db, "b", JobKind.GENERATE, 8)
        assert len(_round(db, max_preemptions=2)) == 1
        with db.transaction() as session:
            requeue_preempted(session, lease, hold_s=0)
        with db.transaction() as session:
            again = claim_job(session, lease.job_id, lease_ttl_s=600)
        assert again is not None and again.attempt == 1, n  # never used up
        lease = again
    _job(db, "b", JobKind.GENERATE, 8)
    assert _round(db, max_preemptions=2) == []


def test_a_trainer_stops_right_after_its_next_checkpoint(tmp_path: Path) -> None:
    """workers/preemption.py, on a stand-in family loop that checkpoints every 3 steps by
    write-then-rename, as the families do."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    closed = []

    def family() -> Iterator[Event]:
        try:
            for step in range(1, 31):
                if step % 3 == 0:
                    tmp = folder / "checkpoint.safetensors.tmp"
                    tmp.write_bytes(str(step).encode())
                    tmp.rename(folder / "checkpoint.safetensors")
                yield Progress(step, 30, "training")
        finally:
            closed.append(True)

    stop = CheckpointStop(folder)
    steps = []
    with pytest.raises(PreemptedError):
        for event in stop.until_checkpoint(family(), "job-1"):
            if isinstance(event, Progress):
                steps.append(event.step)
                if event.step == 7:  # the request arrives mid-way between checkpoints
                    stop.request()
            else:
                assert isinstance(event, Log) and event.message == NOTICE
    assert steps == list(range(1, 10))  # it went on to the checkpoint at 9, then stopped
    assert (folder / "checkpoint.safetensors").read_bytes() == b"9"
    assert closed == [True]
    # Without a request nothing stops.
    assert len(list(CheckpointStop(folder).until_checkpoint(family(), "job-2"))) == 30


def test_a_claimed_job_waiting_for_a_gpu_makes_room(db) -> None:  # type: ignore[no-untyped-def]
    """Its slot is free but the GPUs are held: the trainings of a lower class that together
    hold the GPUs it asks for, on one node, are asked to stop; a training still waiting to
    be placed itself holds nothing and is left alone."""
    now = utcnow()
    batch = [_running(db, "a", JobKind.TRAIN, 2, num_gpus=0.5) for _ in range(2)]
    for lease in batch:
        _placed(db, lease, "node-1")
    other_node = _running(db, "b", JobKind.TRAIN, 1, num_gpus=0.5)
    _placed(db, other_node, "node-2")
    unplaced = _running(db, "b", JobKind.TRAIN, 0, num_gpus=1.0)
    _waits(db, unplaced, "GPU", now)
    interactive = _running(db, "c", JobKind.TRAIN, 8, num_gpus=1.0)
    _waits(db, interactive, "GPU", now + timedelta(seconds=5))
    # A claimed job that has not waited preempt_after_s yet makes no room.
    assert _round(db, now=now + timedelta(seconds=20)) == []
    made = _round(db, now=now + timedelta(seconds=40))
    assert sorted(made) == sorted((b.job_id, interactive.job_id) for b in batch)
    assert _round(db, now=now + timedelta(seconds=41)) == []  # they are stopping for it
    with db.read() as session:
        for lease in (other_node, unplaced):
            row = session.get(Job, lease.job_id)
            assert row is not None and row.preempt_requested_at is None
        event = session.scalar(
            select(JobEvent).where(
                JobEvent.type == "preemption", JobEvent.job_id == batch[0].job_id
            )
        )
        assert event is not None and "needs a GPU" in event.data["message"]


def test_a_gpu_wait_that_lower_trainings_cannot_cover_preempts_none(db) -> None:  # type: ignore[no-untyped-def]
    """Half a GPU of batch training on each of two nodes cannot make room for a whole GPU on
    either; and a job that was placed no longer waits."""
    now = utcnow()
    for node in ("node-1", "node-2"):
        _placed(db, _running(db, "a", JobKind.TRAIN, 2, num_gpus=0.5), node)
    waiter = _running(db, "c", JobKind.GENERATE, 8, num_gpus=1.0)
    _waits(db, waiter, "GPU", now)
    assert _round(db, now=now + timedelta(seconds=40)) == []
    # Placed: a wait of a past attempt or of before the placement never counts.
    small = _running(db, "b", JobKind.GENERATE, 8, num_gpus=0.25)
    _waits(db, small, "GPU", now)
    _placed(db, small, "node-1")
    with db.read() as session:
        row = session.get(Job, small.job_id)
        assert row is not None and row.waiting_for is None and row.waiting_since is None
    assert _round(db, now=now + timedelta(seconds=40)) == []
