"""Fault injection: real Redis, Ray, Celery workers and the periodic scheduler, on SQLite and
PostgreSQL. Each test injects one fault, proves that it happened (the PID is dead, the message
arrived twice, the heartbeat went stale), then checks genq's invariants: one terminal state
within a deadline, attempts within the cap, one row per output and no file without its row,
and the trainer's GPU share given back to Ray.

Marked `faults` (run alone with `pytest -m faults`); part of `make test`.
"""

from __future__ import annotations

import os
import signal
import threading
from datetime import UTC, datetime, timedelta
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from core.jobs import NewJob, create_job
from core.states import JobKind
from core.tables import Job, Model, Tenant
from scheduler.enqueue import Publication
from tests.support.faults import Cluster, RayHead, is_alive, wait_until
from tests.support.training import TEXT, tiny_charlm_job
from tests.support.webhooks import Receiver, verify

pytestmark = [pytest.mark.faults, pytest.mark.stack]

# Long enough to kill it mid-way on 2 cores, short enough for the suite. charlm, not ddpm:
# what these tests prove (a killed or canceled trainer, its checkpoint, its GPU share) is
# genq's, and charlm's trainer starts without diffusers (tests/support/training.py).
TRAIN = tiny_charlm_job("faults", steps=60, checkpoint_every=5, dataset="fox")


def train(cluster: Cluster) -> dict[str, object]:
    """TRAIN, its text uploaded to the cluster."""
    cluster.upload_text("fox", TEXT)
    return TRAIN


# Each fault runs on one database, half on SQLite and half on PostgreSQL, to keep the suite
# within a few minutes on two cores.
SQLITE = pytest.mark.parametrize("backend", ["sqlite"])
POSTGRES = pytest.mark.parametrize(
    "backend", [pytest.param("postgres", marks=pytest.mark.postgres)]
)


def progress_steps(cluster: Cluster, job_id: str) -> list[tuple[int, int]]:
    """(attempt, step) for each recorded progress event of the work, in order."""
    attempt, out = 0, []
    for event in cluster.events(job_id):
        if event.type == "state" and event.data.get("to") == "running":
            attempt = event.data["attempt"]
        elif event.type == "progress" and event.data.get("total"):
            # (A progress of total 0 only says what the attempt waits for, at step 0.)
            out.append((attempt, event.data["step"]))
    return out


@POSTGRES
def test_sigkill_worker_mid_training_resumes_from_checkpoint(cluster: Cluster) -> None:
    first = cluster.worker()
    cluster.scheduler()
    job_id = cluster.submit(train(cluster))
    wait_until(lambda: cluster.get(job_id)["progress"]["step"] >= 12, 120, "training progress")
    cluster.kill(first)  # the Celery worker process (and its Ray driver) is gone
    killed_at = max(step for _, step in progress_steps(cluster, job_id))
    cluster.worker()
    job = cluster.wait(job_id, 180)
    assert job["state"] == "succeeded", job
    assert job["attempt"] == 2 and job["result_model"] == "faults:1"
    steps = progress_steps(cluster, job_id)
    resumed = min(step for attempt, step in steps if attempt == 2)
    # The step counter never goes back more than one checkpoint interval, and attempt 2 did
    # work of its own. (No bound above killed_at: the killed worker's trainer lives on until Ray
    # sees its driver gone, and may train and checkpoint past the last step the worker recorded.)
    assert killed_at - 5 <= resumed < 60, (killed_at, steps)
    cluster.check_invariants(job_id)
    with cluster.database.transaction() as session:
        assert session.query(Model).filter(Model.job_id == job_id).count() == 1
    probe = cluster.ray.probe(job_id)
    assert not probe["trainer_alive"] and probe["gpu_free"] == probe["gpu_total"] == 1


@SQLITE
def test_same_message_to_two_workers_runs_once(cluster: Cluster) -> None:
    workers = [cluster.worker(wait=False), cluster.worker(wait=False)]  # they start together
    for worker in workers:
        cluster.wait_ready(worker)
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
    assert cluster.get(job_id)["state"] == "queued"
    scheduler = cluster.scheduler()
    job = cluster.wait(job_id, 60)
    # It ran because the reconciler found a queued job without a message and sent one.
    assert "re-publishing 1 queued jobs without a message" in scheduler.text()
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
    cluster.freeze(hung)  # alive, but neither heartbeats nor progresses
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
    wait_until(lambda: "lease lost" in hung.text(), 60, "the stale attempt to see its lease lost")
    job = cluster.get(job_id)
    assert job["state"] == "succeeded" and job["attempt"] == 2
    assert len(job["outputs"]) == 1
    cluster.check_invariants(job_id)


def trainer_pids(head: RayHead) -> set[int]:
    """PIDs of the test's Ray worker processes that host a trainer actor."""
    return head.actor_pids(b"ray::_TrainerActor", b"ray::Trainer")


@SQLITE
def test_sigkill_ray_actor_mid_training_resumes(cluster: Cluster) -> None:
    cluster.worker()
    cluster.scheduler()
    job_id = cluster.submit(train(cluster))
    # The trainer's process is found once it trains, so that the kill follows step 12 within
    # a poll (a search of /proc in between could let a fast machine finish the training).
    wait_until(lambda: cluster.get(job_id)["progress"]["step"] >= 1, 120, "training progress")
    (pid,) = wait_until(lambda: trainer_pids(cluster.ray), 10, "the trainer's process")
    wait_until(lambda: cluster.get(job_id)["progress"]["step"] >= 12, 120, "training progress")
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not is_alive(pid), 10, "the trainer to die")
    job = cluster.wait(job_id, 180)
    assert job["state"] == "succeeded" and job["attempt"] == 2, job
    requeued = [e.data for e in cluster.events(job_id, "state") if e.data.get("to") == "queued"]
    assert "ActorDiedError" in requeued[-1]["reason"] or "RayActorError" in requeued[-1]["reason"]
    steps = progress_steps(cluster, job_id)
    # The last step the killed attempt recorded (read once it was over: the worker records
    # what the trainer had sent before it died).
    killed_at = max(step for attempt, step in steps if attempt == 1)
    resumed = min(step for attempt, step in steps if attempt == 2)
    assert killed_at - 5 <= resumed <= killed_at + 5, (killed_at, steps)
    cluster.check_invariants(job_id)
    probe = cluster.ray.probe(job_id)
    assert not probe["trainer_alive"] and probe["gpu_free"] == probe["gpu_total"] == 1


def model_server_pids(head: RayHead) -> set[int]:
    """PIDs of the test's Ray worker processes that host a model server actor."""
    return head.actor_pids(b"ray::ModelServer")


@SQLITE
def test_model_server_killed_before_its_first_event_is_replaced_within_the_attempt(
    cluster: Cluster,
) -> None:
    cluster.worker()
    others = model_server_pids(cluster.ray)  # servers of earlier tests on this Ray head
    warm = cluster.submit({"kind": "generate", "model": "echo", "params": {"message": "warm"}})
    assert cluster.wait(warm, 60)["state"] == "succeeded"
    (pid,) = model_server_pids(cluster.ray) - others
    job_id = cluster.submit(
        {"kind": "generate", "model": "echo", "params": {"message": "again", "delay_s": 3}}
    )
    wait_until(lambda: cluster.get(job_id)["state"] == "running", 30, "the job to start")
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not is_alive(pid), 10, "the model server to die")
    job = cluster.wait(job_id, 60)
    # Nothing had come back from the dead server: the job ran again on a new one, in the
    # same attempt, and has one output.
    assert job["state"] == "succeeded" and job["attempt"] == 1, job
    assert len(job["outputs"]) == 1
    warnings = [e.data["message"] for e in cluster.events(job_id, "log")]
    assert any("model server stopped before this job's first event" in m for m in warnings)
    assert len(model_server_pids(cluster.ray) - others) == 1 and pid not in model_server_pids(
        cluster.ray
    )
    cluster.check_invariants(job_id)


@POSTGRES
def test_whole_worker_side_killed_and_restarted_finishes_once(cluster: Cluster) -> None:
    worker, scheduler = cluster.worker(), cluster.scheduler()
    job_id = cluster.submit(
        {"kind": "generate", "model": "echo", "params": {"delay_s": 4, "progress_steps": 4}}
    )
    wait_until(lambda: cluster.get(job_id)["progress"]["step"] >= 1, 60, "progress")
    cluster.kill(worker)
    cluster.kill(scheduler)
    cluster.worker()
    cluster.scheduler()
    job = cluster.wait(job_id, 90)
    assert job["state"] == "succeeded" and job["attempt"] == 2
    assert len(job["outputs"]) == 1
    cluster.check_invariants(job_id)


@POSTGRES
def test_poison_job_fails_after_the_attempt_cap_and_healthy_jobs_flow(
    cluster: Cluster,
) -> None:
    # Every time the poison job runs, its worker dies (SIGKILL) and a new one takes over.
    cluster.scheduler()
    # 8 s: it is still running when its worker is killed, on the busiest machine (the kill
    # follows the state seen "running" within a poll, and its 8 s start only once the echo
    # server has the call), and is asserted below (kills == 3).
    poison = cluster.submit(
        {"kind": "generate", "model": "echo", "params": {"message": "poison", "delay_s": 8}}
    )
    kills = 0
    while cluster.get(poison)["state"] not in ("failed", "succeeded", "canceled"):
        worker = cluster.worker()
        wait_until(lambda: cluster.get(poison)["state"] != "queued", 60, "the poison job to start")
        if cluster.get(poison)["state"] == "running":
            cluster.kill(worker)
            kills += 1
        wait_until(lambda: cluster.get(poison)["state"] != "running", 30, "the reaper")
    job = cluster.get(poison)
    assert job["state"] == "failed" and job["error"]["type"] == "lost", job
    assert job["attempt"] == job["max_attempts"] == 3 and kills == 3
    cluster.check_invariants(poison)
    # Each retry waited for its backoff: requeued at t, started again no sooner than t + 0.25.
    events = cluster.events(poison, "state")
    for i, event in enumerate(events):
        if event.data.get("reason") == "lease expired" and event.data.get("to") == "queued":
            restart = next(e for e in events[i:] if e.data.get("to") == "running")
            assert (restart.created_at - event.created_at).total_seconds() >= 0.25
    cluster.worker()
    healthy = [
        cluster.submit({"kind": "generate", "model": "echo", "params": {"message": str(i)}})
        for i in range(4)
    ]
    # Each retry's call ended its predecessor's on the echo server (workers/server.py), but the
    # last attempt's call may still be sleeping there, and echo runs one request at a time:
    # the healthy jobs can wait out that one (8 s).
    for job_id in healthy:
        assert cluster.wait(job_id, 120)["state"] == "succeeded"


@SQLITE
def test_canceled_running_job_stays_canceled_through_restarts(cluster: Cluster) -> None:
    worker = cluster.worker()
    cluster.scheduler()
    job_id = cluster.submit({**train(cluster), "params": {**TRAIN["params"], "steps": 100_000}})
    wait_until(lambda: cluster.get(job_id)["progress"]["step"] >= 3, 120, "training progress")
    response = cluster.client.post(f"/v1/jobs/{job_id}/cancel", headers=cluster.auth())
    assert response.status_code == 202 and response.get_json()["state"] == "canceling"
    assert cluster.wait(job_id, 60)["state"] == "canceled"
    # Restart every worker, and deliver the job's message again, as a broker might.
    cluster.kill(worker)
    cluster.worker()
    cluster.publisher.publish(cluster.database, [Publication(job_id, "train")])
    wait_until(lambda: "skipped:canceled" in cluster.logs(), 30, "the redelivery")
    cluster.wait_scheduler_rounds(2)  # reaping and reconciling: nothing may revive the job
    job = cluster.check_invariants(job_id)
    assert job["state"] == "canceled" and job["attempt"] == 1
    probe = cluster.ray.probe(job_id)
    assert not probe["trainer_alive"] and probe["gpu_free"] == probe["gpu_total"] == 1


def submit_due_soon(cluster: Cluster, body: dict[str, object]) -> str:
    """Submit `body` with a deadline 2 s ahead. A deadline that has passed by the time the API
    reads it is refused ("must be in the future"), as a machine busy enough can make one: then
    again, with twice the time ahead, until the API takes it."""
    ahead_s = 2.0
    while True:
        deadline = (datetime.now(UTC) + timedelta(seconds=ahead_s)).isoformat()
        response = cluster.client.post(
            "/v1/jobs", json={**body, "deadline": deadline}, headers=cluster.auth()
        )
        if response.status_code == 202:
            return str(response.get_json()["id"])
        problem = response.get_json()
        assert response.status_code == 422 and ahead_s < 60, problem
        assert problem["errors"] == [{"field": "deadline", "message": "must be in the future"}]
        ahead_s *= 2


@SQLITE
def test_timeout_and_deadline_end_as_failed_with_their_types(cluster: Cluster) -> None:
    cluster.scheduler()
    late = submit_due_soon(cluster, {"kind": "generate", "model": "echo"})
    # No worker yet: the deadline passes while it waits, and it is never started.
    job = cluster.wait(late, 90)
    assert job["state"] == "failed" and job["error"]["type"] == "deadline"
    assert job["attempt"] == 0 and job["started_at"] is None
    cluster.worker()
    slow = cluster.submit(
        {"kind": "generate", "model": "echo", "params": {"delay_s": 60}, "timeout_s": 2}
    )
    job = cluster.wait(slow, 60)
    assert job["state"] == "failed" and job["error"]["type"] == "timeout", job
    assert job["attempt"] == 1
    cluster.check_invariants(slow)


@POSTGRES
def test_webhooks_are_sent_from_their_own_queue_signed_and_logged(cluster: Cluster) -> None:
    receiver = Receiver(fail_first=1)  # the retry must carry the same id
    server = ThreadingHTTPServer(("127.0.0.1", 0), receiver.handler())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cluster.worker()
        cluster.scheduler()
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        job_id = cluster.submit(
            {"kind": "generate", "model": "echo", "webhook": url, "webhook_events": ["completed"]}
        )
        assert cluster.wait(job_id, 60)["state"] == "succeeded"
        path = f"/v1/jobs/{job_id}/deliveries"
        log = wait_until(
            lambda: [
                d
                for d in cluster.client.get(path, headers=cluster.auth()).get_json()["items"]
                if d["state"] == "delivered"
            ],
            30,
            "the retry to be delivered",
        )
    finally:
        server.shutdown()
        server.server_close()
    (delivery,) = log
    assert delivery["attempts"] == 2 and [e["status"] for e in delivery["log"]] == [500, 204]
    assert {r["headers"]["webhook-id"] for r in receiver.requests} == {delivery["id"]}
    secret = cluster.client.get("/v1/webhook-secret", headers=cluster.auth()).get_json()["secret"]
    for request in receiver.requests:
        headers = {k.lower(): v for k, v in request["headers"].items()}
        assert verify(secret, headers, request["body"])
    assert "genq.deliver_webhook" in cluster.logs()  # sent by a worker, from the webhooks queue


def test_training_longer_than_the_visibility_timeout_runs_once(
    tmp_path: Path, ray_head: RayHead, redis_db_url: str
) -> None:
    env = {"GENQ_VISIBILITY_TIMEOUT_S": "11", "GENQ_LEASE_TTL_S": "5"}
    cluster = Cluster(
        tmp_path, f"sqlite:///{tmp_path / 'genq.db'}", ray_head, redis_db_url, extra_env=env
    )
    try:
        cluster.worker()
        cluster.scheduler()
        # The job must still be running when the broker hands its unacknowledged message out
        # again, however fast the machine: every GPU of the head is held elsewhere, so the job
        # is claimed and its lease renewed while its trainer waits for a GPU share, until the
        # re-delivery has been seen; then the GPUs are let go and the training runs.
        with cluster.ray.holding_every_gpu(tmp_path / "holder.log"):
            job_id = cluster.submit(train(cluster))
            cluster.wait(job_id, 60, {"running"})
            wait_until(
                lambda: cluster.get(job_id)["progress"].get("message") == "waiting for a GPU",
                60,
                "the trainer to wait for a GPU",
            )
            wait_until(lambda: "skipped:running" in cluster.logs(), 90, "the re-delivery")
            assert cluster.get(job_id)["state"] == "running"
        job = cluster.wait(job_id, 180)
        states = [e.data for e in cluster.events(job_id, "state")]
        assert job["state"] == "succeeded" and job["attempt"] == 1, states
        assert cluster.claims(job_id) == 1
        cluster.check_invariants(job_id)
    finally:
        cluster.close()
