"""The admin dashboard through Flask's test client, on SQLite and PostgreSQL with a real Redis
(DB 9) behind a real Publisher: admin login and its cookie, CSRF on every action, the session
never authenticating `/v1`, cancel / retry / priority / keys through the core services with an
audit row each, `PATCH /v1/jobs/{id}`, the jobs table's filters and keyset pages, the job page,
the live endpoints (a job page's poll brings only what came after its cursor, from index ranges,
and a redrawn loss chart only when metric points came),
a preempted training's preemption record, and the workers' cluster snapshot.
"""

from __future__ import annotations

import json
import re
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from flask.testing import FlaskClient

from api.dashboard import queries
from core.artifacts import ArtifactStore
from core.db import Database
from core.events import Log, Metric, Output, Progress
from core.jobs import (
    Lease,
    claim_job,
    record_events,
    record_output,
    record_placement,
    record_waiting,
)
from core.preemption import preempt_for_waiting, requeue_preempted
from core.recovery import reap_expired
from core.settings import Settings
from core.states import JobState
from core.tables import ApiKey, Job, Model, utcnow
from scheduler.heartbeats import WorkerHeartbeat
from scheduler.snapshot import SNAPSHOT_KEY, SnapshotWriter
from tests.support.api import (
    BACKENDS,
    Keys,
    bearer,
    echo,
    make_settings,
    queue_depth,
    run_job,
    submit,
)
from tests.support.dashboard import audit, csrf_of, login


@pytest.fixture(params=BACKENDS)
def settings(request: pytest.FixtureRequest, tmp_path: Path, redis_db_url: str) -> Settings:
    return make_settings(
        request,
        tmp_path,
        redis_db_url,
        secret_key="test-secret-key-for-dashboard-sessions",
        max_attempts=3,
        # A snapshot lives three intervals: long enough to outlast a test on a loaded machine.
        cluster_snapshot_interval_s=60,
    )


def job_row(database: Database, job_id: str) -> Job:
    with database.transaction() as session:
        found = session.get(Job, job_id)
        assert found is not None
        return found


# -- login, cookie, CSRF, /v1 --------------------------------------------------------------------


def test_admin_login_sets_a_strict_httponly_cookie_and_is_audited(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    assert client.get("/admin/").status_code == 302  # not logged in: to the login page
    token = csrf_of(client.get("/admin/login").get_data(as_text=True))
    response = client.post("/admin/login", data={"key": keys.admin, "csrf_token": token})
    assert response.status_code == 302 and response.headers["Location"] == "/admin/"
    cookie = response.headers["Set-Cookie"]
    assert "genq_admin=" in cookie and "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie and "Path=/admin" in cookie
    assert "Secure" not in cookie  # plain http here; https requests get Secure
    page = client.get("/admin/")
    assert page.status_code == 200 and "Celery workers" in page.get_data(as_text=True)
    [entry] = audit(database, "login")
    assert entry.key_prefix == keys.admin[:11]


def test_secure_cookie_over_https(client: FlaskClient, keys: Keys) -> None:
    token = csrf_of(client.get("/admin/login", base_url="https://localhost").get_data(True))
    response = client.post(
        "/admin/login",
        data={"key": keys.admin, "csrf_token": token},
        base_url="https://localhost",
    )
    assert response.status_code == 302
    assert "Secure" in response.headers["Set-Cookie"]


def test_a_tenant_key_or_a_revoked_key_cannot_log_in(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    token = csrf_of(client.get("/admin/login").get_data(as_text=True))
    refused = client.post("/admin/login", data={"key": keys.acme, "csrf_token": token})
    assert refused.status_code == 403
    assert "not an admin key" in refused.get_data(as_text=True)
    revoked = client.post("/admin/login", data={"key": keys.revoked, "csrf_token": token})
    assert revoked.status_code == 401
    empty = client.post("/admin/login", data={"key": "", "csrf_token": token})
    assert empty.status_code == 422
    assert client.get("/admin/").status_code == 302  # still logged out
    assert audit(database, "login") == []


def test_login_without_a_csrf_token_is_refused(client: FlaskClient, keys: Keys) -> None:
    client.get("/admin/login")
    response = client.post("/admin/login", data={"key": keys.admin})
    assert response.status_code == 403
    assert client.get("/admin/").status_code == 302


def test_a_post_without_or_with_a_wrong_token_changes_nothing(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    job_id = submit(client, keys.acme, echo(message="hi")).get_json()["id"]
    token = login(client, keys.admin)
    for data in ({}, {"csrf_token": "forged"}, {"csrf_token": token[:-1]}, {"csrf_token": "é"}):
        response = client.post(f"/admin/jobs/{job_id}/cancel", data=data)
        assert response.status_code == 403
        assert "CSRF" in response.get_data(as_text=True)
    with database.transaction() as session:
        key = session.scalar(sa.select(ApiKey).where(ApiKey.prefix == keys.acme[:11]))
        assert key is not None
        key_id = key.id
    response = client.post(f"/admin/keys/{key_id}/revoke")
    assert response.status_code == 403
    assert job_row(database, job_id).state == "queued"
    assert client.get("/v1/jobs", headers=bearer(keys.acme)).status_code == 200
    assert audit(database, "job.cancel") == [] and audit(database, "key.revoke") == []
    # The same post with the session's token works.
    ok = client.post(f"/admin/jobs/{job_id}/cancel", data={"csrf_token": token})
    assert ok.status_code == 302
    assert job_row(database, job_id).state == "canceled"


def test_the_session_cookie_does_not_authenticate_the_api(client: FlaskClient, keys: Keys) -> None:
    login(client, keys.admin)
    cookie = client.get_cookie("genq_admin", path="/admin")
    assert cookie is not None
    # The cookie's path keeps browsers from sending it to /v1; sent anyway, it is ignored.
    response = client.get("/v1/jobs", headers={"Cookie": f"genq_admin={cookie.value}"})
    assert response.status_code == 401
    assert response.mimetype == "application/problem+json"
    posted = client.post("/v1/jobs", json=echo(), headers={"Cookie": f"genq_admin={cookie.value}"})
    assert posted.status_code == 401


def test_logout_ends_the_session(client: FlaskClient, keys: Keys, database: Database) -> None:
    token = login(client, keys.admin)
    assert client.post("/admin/logout", data={"csrf_token": token}).status_code == 302
    assert client.get("/admin/").status_code == 302
    assert client.get("/admin/live/jobs?ids=x").status_code == 401
    assert len(audit(database, "logout")) == 1


# -- actions ---------------------------------------------------------------------------------


def test_cancel_a_running_job_from_the_dashboard(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    job_id = submit(client, keys.acme, echo(delay_s=60)).get_json()["id"]
    with database.transaction() as session:
        assert claim_job(session, job_id, lease_ttl_s=60) is not None
    token = login(client, keys.admin)
    page = client.get(f"/admin/jobs/{job_id}").get_data(as_text=True)
    assert 'id="cancel"' in page
    client.post(f"/admin/jobs/{job_id}/cancel", data={"csrf_token": token})
    assert job_row(database, job_id).state == "canceling"
    [entry] = audit(database, "job.cancel")
    assert entry.target_id == job_id and entry.detail == {"from": "running", "to": "canceling"}
    assert entry.key_prefix == keys.admin[:11] and entry.tenant_id is not None


def test_retry_a_failed_job_republishes_it(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings, broker: redis.Redis
) -> None:
    job_id = submit(client, keys.acme, echo()).get_json()["id"]
    run_job(database, settings, job_id, state=JobState.FAILED)
    before = queue_depth(broker, "generate")
    token = login(client, keys.admin)
    client.post(f"/admin/jobs/{job_id}/retry", data={"csrf_token": token})
    assert job_row(database, job_id).state == "queued"
    assert queue_depth(broker, "generate") == before + 1
    assert len(audit(database, "job.retry")) == 1
    # Retrying it again (now queued) is refused and recorded nowhere.
    again = client.post(f"/admin/jobs/{job_id}/retry", data={"csrf_token": token})
    assert again.status_code == 409
    assert len(audit(database, "job.retry")) == 1


def test_change_priority_from_the_dashboard(
    client: FlaskClient, keys: Keys, database: Database, broker: redis.Redis
) -> None:
    job_id = submit(client, keys.acme, echo()).get_json()["id"]
    token = login(client, keys.admin)
    for bad in ("x", "12", "-1", "", "²", "9" * 5000):  # '²' passes str.isdigit, not int()
        response = client.post(
            f"/admin/jobs/{job_id}/priority", data={"csrf_token": token, "priority": bad}
        )
        assert response.status_code == 422, bad
        assert "priority" in response.get_data(as_text=True)
    assert job_row(database, job_id).priority == 5
    assert broker.llen("generate:4") == 1  # priority 5 -> Celery step 4
    client.post(f"/admin/jobs/{job_id}/priority", data={"csrf_token": token, "priority": "9"})
    assert job_row(database, job_id).priority == 9
    # Not republished: a message is only a token for a free slot, and the claim reads the
    # priority from SQL (core/fairness.py).
    assert broker.llen("generate:4") == 1 and broker.llen("generate") == 0
    [entry] = audit(database, "job.priority")
    assert entry.detail == {"from": 5, "to": 9, "via": "dashboard"}


def test_patch_priority_over_the_api(
    client: FlaskClient, keys: Keys, database: Database, broker: redis.Redis
) -> None:
    job_id = submit(client, keys.acme, echo()).get_json()["id"]
    path = f"/v1/jobs/{job_id}"
    for body in ({"priority": 10}, {"priority": "8"}, {"priority": True}, {"priority": 8, "x": 1}):
        response = client.patch(path, json=body, headers=bearer(keys.acme))
        assert response.status_code == 422, body
        assert response.get_json()["errors"][0]["field"] == "priority"
    assert client.patch(path, json={"priority": 8}, headers=bearer(keys.globex)).status_code == 404
    assert job_row(database, job_id).priority == 5
    response = client.patch(path, json={"priority": 8}, headers=bearer(keys.acme))
    assert response.status_code == 200 and response.get_json()["priority"] == 8
    # No new message: the one token already queued serves the job at its new priority.
    assert broker.llen("generate:4") == 1 and broker.llen("generate:1") == 0
    [entry] = audit(database, "job.priority")
    assert entry.detail == {"from": 5, "to": 8, "via": "api"}
    assert entry.tenant_id == keys.acme_tenant
    with database.transaction() as session:
        assert claim_job(session, job_id, lease_ttl_s=60) is not None
    running = client.patch(path, json={"priority": 1}, headers=bearer(keys.acme))
    assert running.status_code == 409
    assert job_row(database, job_id).priority == 8


def test_create_a_key_shown_once_then_revoke_it(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    token = login(client, keys.admin)
    response = client.post(
        "/admin/keys", data={"csrf_token": token, "tenant": "initech", "label": "ci"}
    )
    assert response.status_code == 201
    assert response.headers["Cache-Control"] == "no-store"
    raw = re.search(r'id="new-key"[^>]*>(gq_[^<]+)<', response.get_data(as_text=True))
    assert raw is not None
    new_key = raw.group(1)
    assert client.get("/v1/jobs", headers=bearer(new_key)).status_code == 200
    tenants_page = client.get("/admin/tenants").get_data(as_text=True)
    assert new_key not in tenants_page and new_key[:11] in tenants_page
    [created] = audit(database, "key.create")
    assert created.detail["tenant"] == "initech" and created.detail["is_admin"] is False
    client.post(f"/admin/keys/{created.target_id}/revoke", data={"csrf_token": token})
    assert client.get("/v1/jobs", headers=bearer(new_key)).status_code == 401
    assert [e.target_id for e in audit(database, "key.revoke")] == [created.target_id]
    bad = client.post("/admin/keys", data={"csrf_token": token, "tenant": ""})
    assert bad.status_code == 422 and "tenant" in bad.get_data(as_text=True)


def test_revoking_the_admins_own_key_ends_the_session(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    token = login(client, keys.admin)
    with database.transaction() as session:
        key = session.scalar(sa.select(ApiKey).where(ApiKey.prefix == keys.admin[:11]))
        assert key is not None
        key_id = key.id
    client.post(f"/admin/keys/{key_id}/revoke", data={"csrf_token": token})
    assert client.get("/admin/").status_code == 302


# -- pages -----------------------------------------------------------------------------------


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


def test_processes_starting_together_share_one_generated_secret_key(tmp_path: Path) -> None:
    # Sessions signed by one gunicorn worker must verify in the others.
    import subprocess
    import sys

    code = (
        "import sys; from core.settings import Settings; "
        "print(Settings(_env_file=None, var_dir=sys.argv[1]).read_secret_key())"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    keys = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(keys) == 1 and len(keys.pop()) >= 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret_key"]


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


def page_cursor(page: str) -> int:
    found = re.search(r'data-live-job="[^"]+" data-state-now="[^"]+" data-after="(\d+)"', page)
    assert found, "no live cursor in the job page"
    return int(found.group(1))


def reap_and_reclaim(database: Database, job_id: str) -> Lease:
    """The worker of the running attempt stops answering: its lease expires, the reaper requeues
    the job and another worker claims it (all through the core services)."""
    with database.transaction() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.lease_expires_at = utcnow() - timedelta(seconds=1)  # the fault
        reaped = reap_expired(session)
        assert [(r.job_id, r.state) for r in reaped] == [(job_id, JobState.QUEUED)]
        lease = claim_job(session, job_id, lease_ttl_s=60)
        assert lease is not None
        return lease


def test_live_job_sends_what_changed_after_the_pages_cursor(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    job_id = submit(client, keys.acme, echo()).get_json()["id"]
    login(client, keys.admin)
    page = client.get(f"/admin/jobs/{job_id}").get_data(as_text=True)
    cursor = page_cursor(page)
    assert cursor > 0  # the "queued" event the page shows

    def poll(after: int) -> dict[str, Any]:
        response = client.get(f"/admin/live/jobs/{job_id}?after={after}")
        assert response.status_code == 200, response.get_data(as_text=True)
        return dict(response.get_json())

    quiet = poll(cursor)
    assert quiet["state"] == "queued" and quiet["attempt"] == 0 and quiet["max_attempts"] == 3
    assert (quiet["timeline"], quiet["logs"], quiet["outputs"]) == ([], [], [])
    assert quiet["cursor"] == cursor and quiet["more"] is False

    with database.transaction() as session:
        lease = claim_job(session, job_id, lease_ttl_s=60)
        assert lease is not None
    with database.transaction() as session:
        record_events(session, lease, [Log("first <b>line</b>"), Progress(1, 4, "warming up")])
    first = poll(cursor)
    assert first["state"] == "running" and first["attempt"] == 1
    assert first["step"] == 1 and first["total"] == 4 and first["message"] == "warming up"
    assert [(e["from"], e["to"], e["attempt"]) for e in first["timeline"]] == [
        ("queued", "running", 1)
    ]
    assert [line["message"] for line in first["logs"]] == ["first <b>line</b>"]
    assert first["cursor"] > cursor

    # A reaped attempt and its retry: only what came after the first poll's cursor.
    lease = reap_and_reclaim(database, job_id)
    with database.transaction() as session:
        record_events(session, lease, [Log("second attempt")])
    second = poll(first["cursor"])
    assert second["state"] == "running" and second["attempt"] == 2
    assert [(e["from"], e["to"], e["reason"], e["attempt"]) for e in second["timeline"]] == [
        ("running", "queued", "lease expired", None),
        ("queued", "running", "", 2),
    ]
    assert [line["message"] for line in second["logs"]] == ["second attempt"]
    assert second["outputs"] == []
    # From the page's own cursor the same poll brings everything since the page.
    everything = poll(cursor)
    assert len(everything["timeline"]) == 3 and len(everything["logs"]) == 2

    store = ArtifactStore(settings.artifacts)
    stored = store.write_output(keys.acme_tenant, job_id, "notes.txt", b"live <i>text</i>")
    with database.transaction() as session:
        record_output(
            session, lease, Output("notes.txt", "text", "text/plain", b"live <i>text</i>"), stored
        )
    third = poll(second["cursor"])
    [output] = third["outputs"]
    assert output["name"] == "notes.txt" and output["preview"] == "live <i>text</i>"
    assert client.get(output["url"]).data == b"live <i>text</i>"
    assert third["timeline"] == [] and third["logs"] == []
    assert poll(third["cursor"])["outputs"] == []  # nothing twice

    # A reload shows all of it, with a cursor past it.
    page = client.get(f"/admin/jobs/{job_id}").get_data(as_text=True)
    assert page_cursor(page) == third["cursor"]
    assert "lease expired" in page and "second attempt" in page and "first &lt;b&gt;" in page
    assert re.search(r"data-attempt>2<", page)

    for after in ("-1", "²", str(2**63)):  # not digits; not int(); past any SQL integer
        bad = client.get(f"/admin/live/jobs/{job_id}", query_string={"after": after})
        assert bad.status_code == 422 and bad.get_json()["errors"][0]["field"] == "after"
    missing = client.get("/admin/live/jobs/00000000-0000-0000-0000-000000000000?after=0")
    assert missing.status_code == 404 and missing.mimetype == "application/problem+json"


def test_live_job_redraws_the_loss_chart_only_when_metric_points_came(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    job_id = submit(client, keys.acme, echo()).get_json()["id"]
    with database.transaction() as session:
        lease = claim_job(session, job_id, lease_ttl_s=60)
        assert lease is not None
    login(client, keys.admin)
    page = client.get(f"/admin/jobs/{job_id}").get_data(as_text=True)
    assert "<div data-loss-box hidden>" in page and "<svg" not in page  # no point yet

    def poll(after: int) -> dict[str, Any]:
        response = client.get(f"/admin/live/jobs/{job_id}?after={after}")
        assert response.status_code == 200, response.get_data(as_text=True)
        return dict(response.get_json())

    quiet = poll(page_cursor(page))
    assert quiet["loss_chart"] is None and quiet["metrics"] is None

    with database.transaction() as session:
        record_events(session, lease, [Metric(1, {"loss": 0.9}), Log("step 1")])
    first = poll(page_cursor(page))
    assert first["loss_chart"].startswith("<svg") and first["loss_chart"].count("<circle") == 1
    assert first["metrics"] == [{"name": "loss", "step": 1, "value": 0.9}]

    # A second point, and a metric whose name is markup: drawn as text, never as an element.
    with database.transaction() as session:
        record_events(
            session, lease, [Metric(2, {"loss": 0.5, "<script>val_loss": 0.7, "lr": 0.01})]
        )
    second = poll(first["cursor"])
    chart = second["loss_chart"]
    # The whole series from the first point on, though only one event came since the cursor.
    assert chart.count("<polyline") == 2 and chart.count("<circle") == 3
    assert "&lt;script&gt;val_loss" in chart and "<script" not in chart
    assert ">lr<" not in chart  # the learning rate is a metric, not a loss
    assert second["metrics"] == [
        {"name": "<script>val_loss", "step": 2, "value": 0.7},
        {"name": "loss", "step": 2, "value": 0.5},
        {"name": "lr", "step": 2, "value": 0.01},
    ]

    # Events that are not metrics bring no chart: the page keeps the one it has.
    with database.transaction() as session:
        record_events(session, lease, [Log("no metric here"), Progress(3, 4)])
    third = poll(second["cursor"])
    assert [line["message"] for line in third["logs"]] == ["no metric here"]
    assert third["loss_chart"] is None and third["metrics"] is None

    # A reload draws the same chart and the same latest values.
    page = client.get(f"/admin/jobs/{job_id}").get_data(as_text=True)
    assert "<div data-loss-box>" in page and chart in page
    assert '<tr data-metric="lr"><th>lr</th><td>0.01 ' in page
    assert "<script>val_loss" not in page


def test_live_job_pages_through_a_burst_of_events(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    job_id = submit(client, keys.acme, echo()).get_json()["id"]
    with database.transaction() as session:
        lease = claim_job(session, job_id, lease_ttl_s=60)
        assert lease is not None
        start = queries.last_event_id(session, job_id)
    with database.transaction() as session:
        events: list[Any] = []
        for i in range(5):
            events += [Log(f"line {i}"), Progress(i, 5), Metric(i, {"loss": 1.0 / (i + 1)})]
        record_events(session, lease, events)
    seen, cursor = [], start
    with database.read() as session:
        for _ in range(10):
            batch = queries.job_updates(session, job_id, after=cursor, limit=2)
            assert batch is not None and len(batch.events) <= 2
            seen += [e.data["message"] for e in batch.events if e.type == "log"]
            assert batch.cursor >= cursor
            cursor = batch.cursor
            if not batch.has_more:
                break
        # The cursor ends past the progress events, which the page never asks for, too.
        assert cursor == queries.last_event_id(session, job_id)
    assert seen == [f"line {i}" for i in range(5)]


# SQLite's query plan only: PostgreSQL's planner may rightly scan a table this small.
@pytest.mark.parametrize("settings", ["sqlite"], indirect=True)
def test_live_job_reads_only_index_ranges(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    job_id = submit(client, keys.acme, echo()).get_json()["id"]
    run_job(database, settings, job_id, outputs={"output.txt": b"hi"})
    login(client, keys.admin)
    statements: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        statements.append((statement, params))

    sa.event.listen(database.engine, "before_cursor_execute", capture)
    try:
        body = client.get(f"/admin/live/jobs/{job_id}?after=0").get_json()
    finally:
        sa.event.remove(database.engine, "before_cursor_execute", capture)
    assert body["outputs"] and body["logs"] and body["timeline"]
    polled = [(s, p) for s, p in statements if s.lstrip().upper().startswith("SELECT")]
    # The row, the newest event id, the events, and the metric series (a metric event came).
    assert body["loss_chart"] and body["metrics"]
    assert sum("job_event" in s for s, _ in polled) == 3 and any("artifact" in s for s, _ in polled)
    with database.engine.connect() as conn:
        for statement, params in polled:
            plan = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params).all()
            details = [str(row[-1]) for row in plan]
            assert not any(d.startswith("SCAN") for d in details), (statement, details)
