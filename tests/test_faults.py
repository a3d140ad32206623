"""Fault injection: real Redis, Ray, Celery workers and the periodic scheduler, on SQLite and
PostgreSQL. Each test injects one fault, proves that it happened (the PID is dead, the message
arrived twice, the heartbeat went stale), then checks genq's invariants: one terminal state
within a deadline, attempts within the cap, one row per output and no file without its row,
and the trainer's GPU share given back to Ray.

Marked `faults` (run alone with `pytest -m faults`); part of `make test`.
"""

from __future__ import annotations

import signal
import time

import pytest

from core.jobs import NewJob, create_job
from core.states import JobKind
from core.tables import Job, Model, Tenant
from scheduler.enqueue import Publication
from tests.test_faults_support import Cluster, wait_until

# The `cluster` and `ray_head` fixtures.
pytest_plugins = ["tests.test_faults_support"]

pytestmark = [pytest.mark.faults, pytest.mark.stack]

# Long enough to kill it mid-way on 2 cores, short enough for the suite.
TRAIN = {
    "kind": "train",
    "family": "ddpm",
    "dataset": "digits",
    "name": "faults",
    "params": {"preset": "tiny", "steps": 60, "batch_size": 8, "checkpoint_every": 5, "seed": 1},
}


# Each fault runs on one database, half on SQLite and half on PostgreSQL, to keep the suite
# within a few minutes on two cores.
SQLITE = pytest.mark.parametrize("backend", ["sqlite"])
POSTGRES = pytest.mark.parametrize(
    "backend", [pytest.param("postgres", marks=pytest.mark.postgres)]
)


def progress_steps(cluster: Cluster, job_id: str) -> list[tuple[int, int]]:
    """(attempt, step) for each recorded progress event, in order."""
    attempt, out = 0, []
    for event in cluster.events(job_id):
        if event.type == "state" and event.data.get("to") == "running":
            attempt = event.data["attempt"]
        elif event.type == "progress":
            out.append((attempt, event.data["step"]))
    return out


@POSTGRES
def test_sigkill_worker_mid_training_resumes_from_checkpoint(cluster: Cluster) -> None:
    first = cluster.worker()
    cluster.scheduler()
    job_id = cluster.submit(TRAIN)
    wait_until(lambda: cluster.get(job_id)["progress"]["step"] >= 12, 120, "training progress")
    cluster.kill(first)  # the Celery worker process (and its Ray driver) is gone
    killed_at = max(step for _, step in progress_steps(cluster, job_id))
    cluster.worker()
    job = cluster.wait(job_id, 180)
    assert job["state"] == "succeeded", job
    assert job["attempt"] == 2 and job["result_model"] == "faults:1"
    steps = progress_steps(cluster, job_id)
    resumed = min(step for attempt, step in steps if attempt == 2)
    # The step counter never goes back more than one checkpoint interval.
    assert killed_at - 5 <= resumed <= killed_at + 5, (killed_at, steps)
    cluster.check_invariants(job_id)
    with cluster.database.transaction() as session:
        assert session.query(Model).filter(Model.job_id == job_id).count() == 1
    probe = cluster.ray.probe(job_id)
    assert not probe["trainer_alive"] and probe["gpu_free"] == probe["gpu_total"] == 1


@SQLITE
def test_same_message_to_two_workers_runs_once(cluster: Cluster) -> None:
    cluster.worker()
    cluster.worker()
    job_id = cluster.submit(
        {"kind": "generate", "model": "echo", "params": {"message": "once", "delay_s": 2}}
    )
    # The API published it once; publish it again, as a broker re-delivery would.
    with cluster.database.transaction() as session:
        queue = session.get(Job, job_id).queue  # type: ignore[union-attr]
    cluster.publisher.publish(cluster.database, [Publication(job_id, queue)])
    job = cluster.wait(job_id, 60)
    assert job["state"] == "succeeded" and job["attempt"] == 1
    assert len(job["outputs"]) == 1
    # Proof that both messages were consumed: one claimed, the other was turned away.
    wait_until(lambda: "skipped:" in cluster.logs(), 20, "the second delivery")
    assert cluster.claims(job_id) == 1
    cluster.check_invariants(job_id)


@POSTGRES
def test_crash_between_commit_and_publish_is_repaired_by_the_reconciler(
    cluster: Cluster,
) -> None:
    # A row committed by an API that died before publishing: no message, no marker.
    with cluster.database.transaction() as session:
        tenant = session.query(Tenant).first()
        model = session.query(Model).filter(Model.name == "echo").one()
        job, _ = create_job(
            session,
            NewJob(
                tenant_id=tenant.id,  # type: ignore[union-attr]
                kind=JobKind.GENERATE,
                family="echo",
                queue="generate",
                params={"message": "late", "delay_s": 0.0, "progress_steps": 0, "fail": False},
                model_id=model.id,
            ),
        )
        job_id = job.id
    assert cluster.broker.llen("generate") == 0 and cluster.publisher.has_message([job_id]) == [
        False
    ]
    cluster.worker()
    time.sleep(3)
    assert cluster.get(job_id)["state"] == "queued"  # nothing runs it without the reconciler
    cluster.scheduler()
    job = cluster.wait(job_id, 60)
    assert job["state"] == "succeeded" and job["attempt"] == 1
    cluster.check_invariants(job_id)


@SQLITE
def test_hung_worker_is_detected_by_its_stale_heartbeat_and_fenced(cluster: Cluster) -> None:
    hung = cluster.worker()
    cluster.scheduler()
    job_id = cluster.submit(
        {"kind": "generate", "model": "echo", "params": {"delay_s": 6, "progress_steps": 6}}
    )
    cluster.wait(job_id, 60, {"running"})
    cluster.kill(hung, signal.SIGSTOP)  # alive, but neither heartbeats nor progresses
    reaped = wait_until(
        lambda: [
            e for e in cluster.events(job_id, "state") if e.data.get("reason") == "lease expired"
        ],
        30,
        "the reaper to notice the stale lease",
    )  # fmt: skip
    assert reaped[0].data["from"] == "running" and reaped[0].data["to"] == "queued"
    cluster.worker()
    job = cluster.wait(job_id, 60)
    cluster.kill(hung, signal.SIGCONT)  # the old attempt wakes up: its writes are refused
    time.sleep(3)
    job = cluster.get(job_id)
    assert job["state"] == "succeeded" and job["attempt"] == 2
    assert len(job["outputs"]) == 1
    cluster.check_invariants(job_id)
