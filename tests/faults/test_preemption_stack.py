"""Preemption and the usage-based fair share with real workers: a real Celery worker and
periodic scheduler as subprocesses, a real Ray head and real trainers (the fault-injection
harness, tests/support/faults.py).

- An interactive job on a cluster full of batch training starts within one checkpoint
  interval of the training: the trainer stops at its next checkpoint, goes back to `queued`
  without using an attempt, then resumes from that checkpoint and ends as an uninterrupted
  run does (every step, one model version). The owner is told by webhook and in the events.
- A trainer that cannot reach a checkpoint within the grace (its process is paused) is stopped
  at the grace's end and resumes from its last checkpoint, without using an attempt.
- With a free slot but the only GPU held by batch training, an interactive training is
  claimed and waits for Ray to place it; the batch training stops at its next checkpoint for
  it, and both end as uninterrupted runs do.
- Two tenants of equal weight, one of long jobs and one of short ones, get GPU time within 10%
  of equal while both are backlogged.

Marked `faults` and `stack`, as the other tests on this harness.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from sqlalchemy import select

from core.keys import create_key, get_or_create_tenant
from core.tables import Job, Model
from tests.support.faults import Cluster, RayHead, wait_until
from tests.support.training import TEXT, tiny_charlm_job
from tests.support.webhooks import Receiver
from workers.preemption import NOTICE

pytestmark = [pytest.mark.faults, pytest.mark.stack]

CHECKPOINT_EVERY = 5
# charlm, not ddpm: preemption stops any family at its next checkpoint, and charlm's trainer
# starts without diffusers (tests/support/training.py). Its text is uploaded by `_cluster`.
TRAIN = {
    **tiny_charlm_job("preempted", steps=100, checkpoint_every=CHECKPOINT_EVERY, dataset="fox"),
    "priority": "batch",
}
INTERACTIVE_ECHO = {"kind": "generate", "model": "echo", "priority": "interactive", "params": {}}


def trainer_pids(ray_head: RayHead) -> set[int]:
    """PIDs of the processes of this Ray head that host a trainer actor (by their process
    title, and the head's token in their environment: the machine may run other heads)."""
    pids = set()
    mine = f"RAY_AUTH_TOKEN={ray_head.env['RAY_AUTH_TOKEN']}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            is_trainer = b"ray::_TrainerActor" in cmdline or b"ray::Trainer" in cmdline
            if is_trainer and mine in (proc / "environ").read_bytes().split(b"\0"):
                pids.add(int(proc.name))
        except OSError:
            continue
    return pids


@contextlib.contextmanager
def paused_trainer(cluster: Cluster, ray_head: RayHead, train_id: str) -> Iterator[int]:
    """Once the training is past its first checkpoint, its trainer's process (the PID yielded)
    SIGSTOPped for the block and let go however the block ends. The process is found once
    the training runs, so that the stop follows the checkpoint within a poll (a search of
    /proc in between could let a fast machine finish the training)."""
    wait_until(lambda: cluster.get(train_id)["progress"]["step"] >= 1, 180, "training progress")
    (pid,) = wait_until(lambda: trainer_pids(ray_head), 30, "the trainer's process")
    wait_until(
        lambda: cluster.get(train_id)["progress"]["step"] > CHECKPOINT_EVERY,
        180,
        "training past its first checkpoint",
    )
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)


def _cluster(
    tmp_path: Path, ray_head: RayHead, redis_url: str, url: str = "", **env: str
) -> Cluster:
    """A cluster on the database at `url` (else a SQLite file of the test's), with the text the
    trainings learn from uploaded."""
    url = url or f"sqlite:///{tmp_path / 'genq.db'}"
    # No process dies in these tests, so no lease has to lapse: a lease of the harness's
    # 3 seconds only lapsed when the loaded machine held up a renewal (a first training's, by
    # 7 seconds, in a fresh-clone run), and the job then ran a second attempt the test did not
    # cause. (The visibility timeout stays above twice the lease.)
    env = {"GENQ_LEASE_TTL_S": "20", **env}
    cluster = Cluster(tmp_path, url, ray_head, redis_url, extra_env=env)
    cluster.upload_text("fox", TEXT)
    return cluster


def test_an_interactive_job_preempts_batch_training_at_a_checkpoint(
    tmp_path: Path, ray_head: RayHead, redis_db_url: str
) -> None:
    receiver = Receiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), receiver.handler())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # One slot, taken by the training job; the grace is long, so the stop must come from the
    # checkpoint and not from the kill at the grace's end.
    cluster = _cluster(
        tmp_path,
        ray_head,
        redis_db_url,
        GENQ_WORKER_CONCURRENCY="1",
        GENQ_PREEMPT_AFTER_S="1",
        GENQ_PREEMPTION_GRACE_S="300",
    )
    try:
        cluster.worker()
        cluster.scheduler()
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        train_id = cluster.submit({**TRAIN, "webhook": url, "webhook_events": ["preempted"]})
        # However fast the machine, the training must not end before the request reaches
        # it: its process is paused until the worker has passed the request on.
        with paused_trainer(cluster, ray_head, train_id):
            gen_id = cluster.submit(INTERACTIVE_ECHO)
            wait_until(
                lambda: "preemption requested" in cluster.logs(), 60, "the request at the worker"
            )
        assert cluster.wait(gen_id, 180)["state"] == "succeeded"
        job = cluster.wait(train_id, 300)
        deliveries = f"/v1/jobs/{train_id}/deliveries"
        try:
            wait_until(lambda: receiver.requests, 60, "the job.preempted webhook")
        except AssertionError:
            sent = cluster.client.get(deliveries, headers=cluster.auth()).get_json()
            history = [(e.type, e.data, e.created_at) for e in cluster.events(train_id)]
            raise AssertionError(f"{job}\n{sent}\n{history}") from None
    finally:
        server.shutdown()
        server.server_close()
        logs = cluster.logs()
        cluster.close()
    # The record: succeeded in its first attempt, preempted once, by the interactive job.
    assert job["state"] == "succeeded", job
    assert job["attempt"] == 1 and job["preemption"]["count"] == 1, job
    assert job["preemption"]["by"] == gen_id and job["preemption"]["requested_at"] is None
    # Stopped by reaching a checkpoint (the grace never ran out).
    assert "no checkpoint within the grace" not in logs
    events = cluster.events(train_id)
    asked = next(e for e in events if e.type == "preemption")
    assert asked.data["by"] == gen_id
    requeued = next(e for e in events if e.type == "state" and e.data.get("reason") == "preempted")
    assert requeued.data["by"] == gen_id and requeued.id > asked.id
    # The trainer says when the request reached it (the lease keeper looks once a second).
    told = next(e for e in events if e.type == "log" and e.data["message"] == NOTICE)
    assert asked.id < told.id < requeued.id
    # (A progress of total 0 only says what the attempt waits for, at step 0: not work.)
    events = [e for e in events if e.type != "progress" or e.data.get("total")]
    steps_before = [e.data["step"] for e in events if e.type == "progress" and e.id < told.id]
    steps_after = [
        e.data["step"] for e in events if e.type == "progress" and told.id < e.id < requeued.id
    ]
    # (Step 0: what the next attempt says while its trainer starts, e.g. waiting for a CPU.)
    resumed = [
        e.data["step"]
        for e in events
        if e.type == "progress" and e.id > requeued.id and e.data["step"] > 0
    ]
    # It stopped within one checkpoint interval of learning of the request, right after a
    # checkpoint, and resumed from that checkpoint: no step lost, none done twice.
    at_request = max(steps_before)
    stopped_at = max(steps_after, default=at_request)
    assert stopped_at - at_request <= CHECKPOINT_EVERY, (at_request, steps_after)
    assert stopped_at % CHECKPOINT_EVERY == 0, steps_after
    assert resumed[0] == stopped_at + 1, (stopped_at, resumed[:3])
    # The interactive job started after the training gave its slot up, before it resumed.
    with cluster.database.read() as session:
        gen = session.get(Job, gen_id)
        assert gen is not None and gen.started_at is not None
        restarts = [
            e.created_at
            for e in events
            if e.type == "state" and e.data.get("to") == "running" and e.id > requeued.id
        ]
        assert requeued.created_at <= gen.started_at <= restarts[0]
        # The same result as an uninterrupted run: every step, and one model version.
        assert max(resumed) == TRAIN["params"]["steps"]  # type: ignore[index]
        versions = session.scalars(select(Model.version).where(Model.name == "preempted")).all()
        assert versions == [1] and job["result_model"] == "preempted:1"
    # The owner is told: the webhook, and the events stream.
    (hook,) = receiver.requests
    payload = json.loads(hook["body"])
    assert payload["type"] == "job.preempted" and payload["data"]["by"] == gen_id
    stream = cluster.client.get(f"/v1/jobs/{train_id}/events", headers=cluster.auth())
    text = stream.get_data(as_text=True)
    assert "event: preemption" in text and '"reason":"preempted"' in text


def test_a_trainer_that_misses_the_grace_is_stopped_and_resumes_from_its_last_checkpoint(
    tmp_path: Path, ray_head: RayHead, redis_db_url: str
) -> None:
    cluster = _cluster(
        tmp_path,
        ray_head,
        redis_db_url,
        GENQ_WORKER_CONCURRENCY="1",
        GENQ_PREEMPT_AFTER_S="1",
        GENQ_PREEMPTION_GRACE_S="2",
    )
    try:
        cluster.worker()
        cluster.scheduler()
        train_id = cluster.submit(TRAIN)
        # The fault: the trainer's process is paused, so no checkpoint can come in the grace.
        with paused_trainer(cluster, ray_head, train_id) as pid:
            gen_id = cluster.submit(INTERACTIVE_ECHO)
            wait_until(
                lambda: "no checkpoint within the grace" in cluster.logs(),
                90,
                "the stop at the grace's end",
            )
        wait_until(lambda: pid not in trainer_pids(ray_head), 60, "the trainer's process to end")
        assert cluster.wait(gen_id, 180)["state"] == "succeeded"
        job = cluster.wait(train_id, 300)
    finally:
        cluster.close()
    assert job["state"] == "succeeded", job
    assert job["attempt"] == 1 and job["preemption"]["count"] == 1, job
    events = cluster.events(train_id)
    asked = next(e for e in events if e.type == "preemption")
    requeued = next(e for e in events if e.type == "state" and e.data.get("reason") == "preempted")
    before = [e.data["step"] for e in events if e.type == "progress" and e.id < requeued.id]
    resumed = [
        e.data["step"]
        for e in events
        if e.type == "progress" and e.id > requeued.id and e.data["step"] > 0
    ]
    # (Step 0: what the new attempt said while its trainer started.) It resumed right after a
    # checkpoint it had written before it was stopped, and ran every step to the end: one
    # model version, as an uninterrupted run.
    assert asked.id < requeued.id
    assert (resumed[0] - 1) % CHECKPOINT_EVERY == 0, resumed[:3]
    assert CHECKPOINT_EVERY < resumed[0] <= max(before) + 1, (max(before), resumed[:3])
    assert max(resumed) == TRAIN["params"]["steps"]  # type: ignore[index]
    with cluster.database.read() as session:
        versions = session.scalars(select(Model.version).where(Model.name == "preempted")).all()
        assert versions == [1] and job["result_model"] == "preempted:1"


def test_a_job_waiting_for_a_gpu_held_by_batch_training_preempts_it(
    tmp_path: Path, ray_head: RayHead, redis_db_url: str
) -> None:
    # Two slots: the interactive job is claimed at once and then waits for the GPU (the
    # head declares one), which the batch training holds whole.
    cluster = _cluster(
        tmp_path,
        ray_head,
        redis_db_url,
        GENQ_WORKER_CONCURRENCY="2",
        GENQ_PREEMPT_AFTER_S="1",
        GENQ_PREEMPTION_GRACE_S="300",
    )
    whole_gpu = {"resources": {"num_gpus": 1}}
    try:
        cluster.worker()
        cluster.scheduler()
        batch_id = cluster.submit({**TRAIN, **whole_gpu})
        # Paused, it cannot end before the request reaches it.
        with paused_trainer(cluster, ray_head, batch_id):
            urgent_id = cluster.submit(
                {
                    **TRAIN,
                    **whole_gpu,
                    "name": "urgent",
                    "priority": "interactive",
                    "params": {**TRAIN["params"], "steps": 10},  # type: ignore[dict-item]
                }
            )
            wait_until(
                lambda: "preemption requested" in cluster.logs(), 60, "the request at the worker"
            )
        urgent = cluster.wait(urgent_id, 180)
        batch = cluster.wait(batch_id, 300)
        logs = cluster.logs()
    finally:
        cluster.close()
    assert urgent["state"] == "succeeded", urgent
    assert batch["state"] == "succeeded", batch
    assert batch["attempt"] == 1 and batch["preemption"]["count"] == 1, batch
    assert batch["preemption"]["by"] == urgent_id
    assert "no checkpoint within the grace" not in logs
    # The interactive job held a slot and waited for the GPU before the batch job stopped:
    # the preemption came from its wait for placement, not from a wait for a slot.
    urgent_events = cluster.events(urgent_id)
    claimed = next(e for e in urgent_events if e.type == "state" and e.data.get("to") == "running")
    waited = next(
        e
        for e in urgent_events
        if e.type == "progress" and e.data.get("message") == "waiting for a GPU"
    )
    events = cluster.events(batch_id)
    asked = next(e for e in events if e.type == "preemption")
    requeued = next(e for e in events if e.type == "state" and e.data.get("reason") == "preempted")
    assert asked.data["by"] == urgent_id and "needs a GPU" in asked.data["message"]
    assert claimed.id < waited.id < asked.id < requeued.id
    assert claimed.data["attempt"] == 1  # one attempt: it waited, it was not requeued
    # The batch training resumed from the checkpoint it stopped at: every step, one version.
    told = next(e for e in events if e.type == "log" and e.data["message"] == NOTICE)
    steps_before = [e.data["step"] for e in events if e.type == "progress" and e.id < told.id]
    stopped = [
        e.data["step"] for e in events if e.type == "progress" and told.id < e.id < requeued.id
    ]
    # (Resumed, it waits for the GPU the interactive job now holds: progress 0 meanwhile.)
    resumed = [e.data["step"] for e in events if e.type == "progress" and e.id > requeued.id]
    resumed = [step for step in resumed if step > 0]
    stopped_at = max(stopped, default=max(steps_before))
    assert stopped_at % CHECKPOINT_EVERY == 0 and resumed[0] == stopped_at + 1, resumed[:3]
    assert max(resumed) == TRAIN["params"]["steps"]  # type: ignore[index]
    with cluster.database.read() as session:
        versions = session.scalars(select(Model.version).where(Model.name == "preempted")).all()
        assert versions == [1]
        row = session.get(Job, urgent_id)
        assert row is not None and row.waiting_for is None  # placed, then finished


def _run_windows(cluster: Cluster, job_ids: dict[str, list[str]]) -> dict[str, float]:
    """Each tenant's running time while both still had jobs waiting: from the first start to
    the moment the first tenant's last job started."""
    runs: dict[str, list[tuple[datetime, datetime]]] = defaultdict(list)
    with cluster.database.read() as session:
        for tenant, ids in job_ids.items():
            for job in session.scalars(select(Job).where(Job.id.in_(ids))):
                assert job.started_at is not None and job.finished_at is not None
                runs[tenant].append((job.started_at, job.finished_at))
    start = min(a for spans in runs.values() for a, _ in spans)
    end = min(max(a for a, _ in spans) for spans in runs.values())
    used = {
        tenant: sum(max(0.0, (min(b, end) - max(a, start)).total_seconds()) for a, b in spans)
        for tenant, spans in runs.items()
    }
    total = sum(used.values())
    return {tenant: value / total for tenant, value in used.items()}


@pytest.mark.postgres
def test_long_and_short_jobs_share_gpu_time_with_real_workers(
    tmp_path: Path, ray_head: RayHead, redis_db_url: str, fresh_pg_url: str
) -> None:
    # The backlog is submitted in one burst from each tenant's key: no rate limit here.
    cluster = _cluster(
        tmp_path,
        ray_head,
        redis_db_url,
        fresh_pg_url,
        GENQ_WORKER_CONCURRENCY="2",
        GENQ_RATE_LIMITS="false",
    )
    try:
        keys = {}
        with cluster.database.transaction() as session:
            for name in ("long", "short"):
                tenant = get_or_create_tenant(session, name)
                keys[name] = create_key(session, tenant, label=name)[1]
        job_ids: dict[str, list[str]] = {"long": [], "short": []}
        # Both tenants are backlogged before the worker starts: 12 jobs of 1 s and 48 of 0.25 s,
        # submitted interleaved (so that neither is older as a whole).
        for i in range(48):
            for tenant, delay_s in (("long", 1.0), ("short", 0.25)):
                if tenant == "long" and i % 4:
                    continue
                response = cluster.client.post(
                    "/v1/jobs",
                    json={"kind": "generate", "model": "echo", "params": {"delay_s": delay_s}},
                    headers={"Authorization": f"Bearer {keys[tenant]}"},
                )
                assert response.status_code == 202, response.get_data(as_text=True)
                job_ids[tenant].append(response.get_json()["id"])
        cluster.worker()
        cluster.scheduler()
        for ids in job_ids.values():
            for job_id in ids:
                assert cluster.wait(job_id, 300)["state"] == "succeeded"
        shares = _run_windows(cluster, job_ids)
    finally:
        cluster.close()
    assert abs(shares["long"] - 0.5) <= 0.05, shares
