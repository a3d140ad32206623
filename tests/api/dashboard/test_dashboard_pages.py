"""The admin dashboard's pages through Flask's test client, on SQLite and PostgreSQL with a real
Redis: the jobs table's filters and keyset pages, the job page (timeline, outputs, logs, loss,
a preempted training's preemption record), the live jobs list, and the workers' cluster
snapshot and heartbeats on the overview and health pages.
"""

from __future__ import annotations

import json
import re
import time
from datetime import timedelta

import redis
import sqlalchemy as sa
from flask.testing import FlaskClient

from core.db import Database
from core.events import Log, Progress
from core.leases import claim_job
from core.preemption import preempt_for_waiting, requeue_preempted
from core.recording import record_events, record_placement, record_waiting
from core.settings import Settings
from core.tables import Job, Model, utcnow
from scheduler.heartbeats import WorkerHeartbeat
from scheduler.snapshot import SNAPSHOT_KEY, SnapshotWriter
from tests.support.api import Keys, echo, run_job, submit
from tests.support.dashboard import login


def test_jobs_table_filters_and_keyset_pages(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    ids = [submit(client, keys.acme, echo()).get_json()["id"] for _ in range(60)]
    other = [submit(client, keys.globex, echo()).get_json()["id"] for _ in range(5)]
    run_job(database, settings, ids[0])
    login(client, keys.admin)
    seen: list[str] = []
    url = "/admin/jobs?tenant=acme"
    while url:
        page = client.get(url).get_data(as_text=True)
        seen += re.findall(r'data-job-row="([^"]+)"', page)
        older = re.search(r'rel="next" href="([^"]+)"', page)
        url = older.group(1).replace("&amp;", "&") if older else ""
    assert seen == sorted(ids, reverse=True)  # every acme job once, newest first
    # A page back from the second one is the first one.
    second = client.get(f"/admin/jobs?tenant=acme&before={seen[49]}").get_data(as_text=True)
    newer = re.search(r'rel="prev" href="([^"]+)"', second)
    assert newer is not None
    first = client.get(newer.group(1).replace("&amp;", "&")).get_data(as_text=True)
    assert re.findall(r'data-job-row="([^"]+)"', first) == seen[:50]
    done = client.get("/admin/jobs?state=succeeded").get_data(as_text=True)
    assert re.findall(r'data-job-row="([^"]+)"', done) == [ids[0]]
    by_prefix = client.get(f"/admin/jobs?q={other[2][:30]}").get_data(as_text=True)
    assert re.findall(r'data-job-row="([^"]+)"', by_prefix) == [other[2]]
    assert client.get(f"/admin/jobs?q={other[2]}").headers["Location"].endswith(other[2])
    recent = client.get("/admin/jobs?window=1h&kind=generate&model=echo").get_data(as_text=True)
    assert len(re.findall(r'data-job-row="', recent)) == 50
    future = client.get("/admin/jobs?since=2999-01-01T00:00").get_data(as_text=True)
    assert "no jobs match" in future
    for query, field in (
        ("state=done", "state"),
        ("kind=paint", "kind"),
        ("window=3h", "window"),
        ("since=yesterday", "since"),
        ("before=nope", "before"),
        ("q=zz", "q"),
    ):
        response = client.get(f"/admin/jobs?{query}")
        assert response.status_code == 422, query
        assert f"<code>{field}</code>" in response.get_data(as_text=True)


def test_job_page_shows_timeline_outputs_logs_and_loss(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    job_id = submit(client, keys.acme, echo(message="hello")).get_json()["id"]
    run_job(database, settings, job_id, outputs={"output.txt": b"hello from the job"})
    login(client, keys.admin)
    page = client.get(f"/admin/jobs/{job_id}").get_data(as_text=True)
    assert "hello from the job" in page  # the text output, inline
    assert "loading" in page and "done" in page  # log lines
    assert "<svg" in page and "loss" in page  # the loss curve from the metric event
    assert "queued" in page and "succeeded" in page  # the timeline
    artifact = re.search(r'href="(/admin/artifacts/[^"]+)"', page)
    assert artifact is not None
    file = client.get(artifact.group(1))
    assert file.status_code == 200 and file.data == b"hello from the job"
    assert "sandbox" in file.headers["Content-Security-Policy"]
    assert client.get("/admin/jobs/0000").status_code == 404
    for path in ("/admin/models", "/admin/datasets", "/admin/tenants"):
        assert client.get(path).status_code == 200, path
    assert "digits" in client.get("/admin/datasets").get_data(as_text=True)


def test_job_page_shows_the_preemption_record(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    """A batch training holds the GPU an interactive job waits for (both claimed through the
    core services, as workers do): a preemption round asks it to stop, it goes back to the
    queue at step 20 and resumes from that checkpoint; the page says so at each stage."""
    train = {
        "kind": "train",
        "family": "ddpm",
        "dataset": "digits",
        "name": "preempted",
        "priority": "batch",
        "params": {"preset": "tiny", "steps": 40, "checkpoint_every": 20},
    }
    victim_id = submit(client, keys.acme, train).get_json()["id"]
    waiter_id = submit(client, keys.globex, {**echo(), "priority": "interactive"}).get_json()["id"]
    leases = {}
    with database.transaction() as session:
        for job_id in (victim_id, waiter_id):
            row = session.get(Job, job_id)
            assert row is not None
            row.num_gpus = 1.0  # both want the whole GPU
            lease = claim_job(session, job_id, lease_ttl_s=300)
            assert lease is not None
            leases[job_id] = lease
    with database.transaction() as session:
        record_placement(session, leases[victim_id], {"node_id": "n1", "gpu_ids": ["0"]})
        record_events(session, leases[victim_id], [Progress(20, 40, "training")])
        record_waiting(session, leases[waiter_id], "GPU")
    login(client, keys.admin)
    page = client.get(f"/admin/jobs/{victim_id}").get_data(as_text=True)
    assert "never preempted" in page and "data-preempted=" not in page

    with database.transaction() as session:
        later = utcnow() + timedelta(seconds=120)  # it has waited 2 minutes
        made = preempt_for_waiting(
            session, preempt_after_s=60, grace_s=30, max_preemptions=3, now=later
        )
    assert [(p.job_id, p.by_job_id) for p in made] == [(victim_id, waiter_id)]
    page = client.get(f"/admin/jobs/{victim_id}").get_data(as_text=True)
    asked = re.search(r"<p data-preempt-requested>(.*?)</p>", page, re.S)
    assert asked is not None and f"/admin/jobs/{waiter_id}" in asked.group(1)

    with database.transaction() as session:
        requeue_preempted(session, leases[victim_id], hold_s=3600)
    page = client.get(f"/admin/jobs/{victim_id}").get_data(as_text=True)
    assert "preempted <span data-preempt-count>1</span> time<" in page
    assert re.search(r"<td data-resumed-step>\s*not yet\s*</td>", page)
    with database.transaction() as session:
        again = claim_job(session, victim_id, lease_ttl_s=300)
        assert again is not None and again.attempt == 1  # the preemption used no attempt
        record_events(session, again, [Log("resumed from step 20"), Progress(21, 40, "")])
    page = client.get(f"/admin/jobs/{victim_id}").get_data(as_text=True)
    assert "data-preempt-requested" not in page
    assert page.count("<tr data-preempted=") == 1
    assert f'data-preempted-by="{waiter_id}"' in page
    assert re.search(r"<td data-stopped-step>\s*20\s*</td>", page)
    assert re.search(r"<td data-resumed-step>\s*step 20\s*</td>", page)
    # A generation job's page has no such section.
    assert "data-preemption" not in client.get(f"/admin/jobs/{waiter_id}").get_data(as_text=True)


def test_live_jobs_reports_progress(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    job_id = submit(client, keys.acme, echo()).get_json()["id"]
    login(client, keys.admin)
    live = client.get(f"/admin/live/jobs?ids={job_id}").get_json()
    assert live[job_id] == {"state": "queued", "step": 0, "total": 0, "message": ""}
    run_job(database, settings, job_id)
    live = client.get(f"/admin/live/jobs?ids={job_id}").get_json()
    assert live[job_id]["state"] == "succeeded" and live[job_id]["total"] == 2
    overview = client.get("/admin/live/overview").get_json()
    assert overview["counts"]["succeeded"] == 1 and overview["workers"] == 0


def test_a_workers_snapshot_shows_on_the_overview_until_it_stops(
    client: FlaskClient, keys: Keys, settings: Settings, broker: redis.Redis
) -> None:
    writer = SnapshotWriter(settings, broker, hostname="celery@test-host")
    snapshot = writer.write_once()
    key = SNAPSHOT_KEY.format(hostname="celery@test-host")
    assert 0 < broker.ttl(key) <= 180  # three intervals of 60 s
    assert snapshot["ray"]["connected"] is False  # this process never joined Ray
    login(client, keys.admin)
    page = client.get("/admin/").get_data(as_text=True)
    assert "celery@test-host" in page and "no GPUs" in page
    assert client.get("/admin/live/overview").get_json()["workers"] == 1
    writer.stop()
    assert broker.get(key) is None
    assert "celery@test-host" not in client.get("/admin/").get_data(as_text=True)


def test_the_health_page_shows_each_worker_and_why_it_is_not_ready(
    client: FlaskClient, keys: Keys, settings: Settings, broker: redis.Redis
) -> None:
    assert client.get("/admin/health").status_code in (302, 303)  # the login page first
    login(client, keys.admin)
    page = client.get("/admin/health").get_data(as_text=True)
    assert 'data-ready="no"' in page
    assert 'data-part="workers" data-status="down"' in page
    assert "no worker is consuming" in page and "no periodic scheduler is running" in page
    heartbeat = WorkerHeartbeat(settings, broker, "celery@health-host", ("generate",))
    heartbeat.probe_once()  # this process never joined Ray
    heartbeat.write_once()
    try:
        page = client.get("/admin/health").get_data(as_text=True)
        assert "celery@health-host" in page and "not connected to Ray" in page
        assert 'data-queue="generate" data-status="no worker reaches ray"' in page
        assert 'data-part="ray" data-status="unreachable"' in page
    finally:
        heartbeat.stop()
    assert "celery@health-host" not in client.get("/admin/health").get_data(as_text=True)


def test_overview_shows_gpus_and_warm_models_as_the_snapshot_reports_them(
    client: FlaskClient, keys: Keys, database: Database, broker: redis.Redis
) -> None:
    # A snapshot as a worker on a GPU node writes it (scheduler/snapshot.py's format).
    with database.transaction() as session:
        echo_model = session.scalar(sa.select(Model).where(Model.name == "echo"))
        assert echo_model is not None
        echo_id = echo_model.id
    gpu = {
        "index": 0,
        "name": "NVIDIA H200",
        "memory_allocated_bytes": 2**30,
        "memory_reserved_bytes": 3 * 2**30,
        "memory_total_bytes": 140 * 2**30,
        "utilization_percent": 37,
    }
    snapshot = {
        "hostname": "celery@gpu-1",
        "pid": 4242,
        "concurrency": 8,
        "active_job_ids": [],
        "taken_at": time.time(),
        "ray": {
            "connected": True,
            "nodes": [
                {
                    "node_id": "abc123",
                    "address": "10.0.0.7",
                    "alive": True,
                    "resources": {
                        "CPU": 16.0,
                        "GPU": 1.0,
                        "gpu_memory_gb": 141.0,
                        "memory": 64 * 2**30,
                    },
                }
            ],
            "cluster_resources": {"CPU": 16.0, "GPU": 1.0},
            "available_resources": {"CPU": 15.0, "GPU": 0.75},
            "model_servers": [
                {
                    "model_id": echo_id,
                    "family": "echo",
                    "device": "cuda",
                    "load_s": 1.5,
                    "jobs_served": 12,
                    "active_jobs": [],
                    "resources": {"CPU": 1.0, "GPU": 0.25},
                    "gpu": gpu,
                }
            ],
        },
    }
    broker.set(SNAPSHOT_KEY.format(hostname="celery@gpu-1"), json.dumps(snapshot), ex=10)
    login(client, keys.admin)
    page = client.get("/admin/").get_data(as_text=True)
    assert "GPUs: 1.0 declared to Ray, 0.25 in use" in page
    assert "NVIDIA H200" in page and "3.0 of 140.0 GiB reserved" in page and "37% busy" in page
    assert "echo:1" in page and "celery@gpu-1" in page
    assert "141.0 GB" in page and "10.0.0.7" in page  # the node's declared GPU memory
    assert "no GPUs" not in page
