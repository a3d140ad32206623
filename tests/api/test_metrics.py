"""GET /metrics against SQLite and PostgreSQL with a real Redis: who may scrape it, that its
figures are the SQL rows' (jobs, queue depth, waits, retries), that labels stay bounded (no
job id, routes as URL rules), that reaped leases are counted across processes (Redis), and
that the cluster's figures come from the workers' snapshots."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from api.metrics import SQL_CACHE_KEY
from core.db import Database
from core.leases import claim_job
from core.settings import Settings
from core.states import JobState
from core.tables import Job, Model, utcnow
from scheduler.enqueue import Publisher
from scheduler.periodic import Periodic
from scheduler.snapshot import SNAPSHOT_KEY
from tests.support.api import (
    Keys,
    assert_problem,
    bearer,
    echo,
    run_job,
    submit,
)

TOKEN = "scrape-token-0123456789"


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    # Every scrape queries SQL (no shared text), so each test sees its own changes at once.
    return {"metrics_token": TOKEN, "metrics_cache_s": 0}


@pytest.fixture
def app(settings: Settings, database: Database, publisher: Publisher) -> Flask:
    return create_app(settings, database=database, publisher=publisher)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(client: FlaskClient, key: str = TOKEN) -> Samples:
    response = client.get("/metrics", headers=bearer(key))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "text/plain"
    found: Samples = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the series of `name` whose labels include `labels` (0 when none)."""
    return sum(v for lab, v in samples.get(name, []) if labels.items() <= lab.items())


def sql_count(database: Database, *where: Any) -> int:
    with database.read() as session:
        return int(session.scalar(sa.select(sa.func.count()).select_from(Job).where(*where)) or 0)


# -- protection -----------------------------------------------------------------------------


def test_metrics_need_the_token_or_an_admin_key(client: FlaskClient, keys: Keys) -> None:
    assert "metrics token" in assert_problem(client.get("/metrics"), 401)["detail"]
    assert_problem(client.get("/metrics", headers=bearer("not-the-token")), 401)
    assert_problem(client.get("/metrics", headers=bearer(keys.revoked)), 401)
    assert_problem(client.get("/metrics", headers={"Authorization": f"Basic {TOKEN}"}), 401)
    body = assert_problem(client.get("/metrics", headers=bearer(keys.acme)), 403)
    assert "admin" in body["detail"]
    assert "genq_worker_slots" in scrape(client, TOKEN)
    assert scrape(client, keys.admin)["genq_workers"] == [({}, 0.0)]


def test_without_a_token_only_admin_keys_scrape(
    settings: Settings,
    database: Database,
    publisher: Publisher,
    keys: Keys,
) -> None:
    app = create_app(settings.model_copy(update={"metrics_token": None}), database=database,
                     publisher=publisher)  # fmt: skip
    client = app.test_client()
    assert_problem(client.get("/metrics", headers=bearer(TOKEN)), 401)
    assert scrape(client, keys.admin)["genq_workers"] == [({}, 0.0)]


def test_the_token_setting_refuses_a_short_token(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="metrics_token"):
        Settings(_env_file=None, var_dir=tmp_path, metrics_token="short")  # type: ignore[call-arg]


# -- figures match the rows ------------------------------------------------------------------


def test_job_figures_are_the_rows(
    client: FlaskClient, database: Database, settings: Settings, keys: Keys
) -> None:
    acme = [submit(client, keys.acme, echo(message=f"a{i}")).get_json()["id"] for i in range(4)]
    globex = [submit(client, keys.globex, {**echo(message="g"), "priority": "interactive"})]
    globex_ids = [r.get_json()["id"] for r in globex]
    run_job(database, settings, acme[0])
    run_job(database, settings, acme[1], state=JobState.FAILED)
    with database.transaction() as session:  # one running, still holding its lease
        assert claim_job(session, acme[2], lease_ttl_s=60) is not None

    samples = scrape(client)
    assert value(samples, "genq_jobs_submitted_total", tenant="acme", kind="generate") == 4
    assert value(samples, "genq_jobs_submitted_total", tenant="globex", family="echo") == 1
    assert value(samples, "genq_jobs_finished_total", tenant="acme", state="succeeded") == 1
    assert value(samples, "genq_jobs_finished_total", tenant="acme", state="failed") == 1
    assert value(samples, "genq_jobs_running", tenant="acme") == 1
    assert sql_count(database, Job.state == JobState.RUNNING) == 1
    queued = sql_count(database, Job.state == JobState.QUEUED)
    assert value(samples, "genq_queue_depth") == queued == 2
    assert value(samples, "genq_queue_depth", tenant="globex", priority_class="interactive") == 1
    assert value(samples, "genq_queue_depth", tenant="acme", priority_class="normal") == 1
    assert value(samples, "genq_jobs", state="queued") == queued
    # The queue wait counts every job that started (3); the run time every finished one (2).
    started = sql_count(database, Job.started_at.is_not(None))
    assert value(samples, "genq_job_queue_wait_seconds_count", family="echo") == started == 3
    assert value(samples, "genq_job_queue_wait_seconds_bucket", le="+Inf") == 3
    assert value(samples, "genq_job_run_seconds_count", kind="generate") == 2
    assert value(samples, "genq_job_run_seconds_count", state="failed") == 1
    # Bounded labels: no job id anywhere, tenants by name.
    ids = set(acme) | set(globex_ids)
    for series in samples.values():
        for labels, _ in series:
            assert not ids & set(labels.values()), labels
    assert {lab["tenant"] for lab, _ in samples["genq_jobs"]} == {"acme", "globex"}


def test_deletions_are_counted_as_freed(
    client: FlaskClient, database: Database, settings: Settings, keys: Keys
) -> None:
    job_id = submit(client, keys.acme, echo(message="x")).get_json()["id"]
    run_job(database, settings, job_id, outputs={"out.txt": b"12345"})
    assert value(scrape(client), "genq_retention_freed_total", source="api") == 0
    assert client.delete(f"/v1/jobs/{job_id}", headers=bearer(keys.acme)).status_code == 204
    samples = scrape(client)
    assert value(samples, "genq_retention_freed_total", source="api", item="jobs") == 1
    assert value(samples, "genq_retention_freed_total", source="api", item="bytes") == 5


def test_histogram_buckets_place_each_wait(
    client: FlaskClient, database: Database, keys: Keys
) -> None:
    job_id = submit(client, keys.acme, echo(message="x")).get_json()["id"]
    with database.transaction() as session:  # submitted 42 s before it starts
        job = session.get(Job, job_id)
        assert job is not None
        job.created_at = utcnow() - timedelta(seconds=42)
    with database.transaction() as session:
        assert claim_job(session, job_id, lease_ttl_s=60) is not None
    samples = scrape(client)
    assert value(samples, "genq_job_queue_wait_seconds_bucket", le="30.0") == 0
    assert value(samples, "genq_job_queue_wait_seconds_bucket", le="60.0") == 1
    assert 41 < value(samples, "genq_job_queue_wait_seconds_sum") < 60


def test_cold_starts_come_from_the_jobs_load_time(
    client: FlaskClient, database: Database, keys: Keys
) -> None:
    job_id = submit(client, keys.acme, echo(message="x")).get_json()["id"]
    with database.transaction() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.metrics = {"load_s": 3.5}
    samples = scrape(client)
    assert value(samples, "genq_model_cold_start_seconds_count", family="echo") == 1
    assert value(samples, "genq_model_cold_start_seconds_bucket", le="2.5") == 0
    assert value(samples, "genq_model_cold_start_seconds_bucket", le="5.0") == 1


def test_reaped_leases_and_retries_are_counted(
    client: FlaskClient,
    database: Database,
    settings: Settings,
    publisher: Publisher,
    keys: Keys,
) -> None:
    job_id = submit(client, keys.acme, echo(message="x")).get_json()["id"]
    with database.transaction() as session:
        assert claim_job(session, job_id, lease_ttl_s=0.01) is not None
    deadline = time.monotonic() + 30
    reaped = 0
    while reaped == 0 and time.monotonic() < deadline:  # until the lease has expired
        reaped = Periodic(settings, database, publisher).reap()[0]
    assert reaped == 1
    with database.transaction() as session:  # the second attempt starts
        job = session.get(Job, job_id)
        assert job is not None and job.state == JobState.QUEUED
        job.not_before = None
    with database.transaction() as session:
        assert claim_job(session, job_id, lease_ttl_s=60) is not None
    samples = scrape(client)
    assert value(samples, "genq_leases_reaped_total", outcome="queued") == 1
    assert value(samples, "genq_job_retries_total", family="echo") == 1


# -- API requests and the cluster ----------------------------------------------------------


def test_requests_are_counted_by_route_not_path(client: FlaskClient, keys: Keys) -> None:
    job_id = submit(client, keys.acme, echo(message="x")).get_json()["id"]
    assert client.get(f"/v1/jobs/{job_id}", headers=bearer(keys.acme)).status_code == 200
    assert client.get("/v1/jobs/nope", headers=bearer(keys.acme)).status_code == 404
    client.get("/no/such/path")
    samples = scrape(client)
    rule = "/v1/jobs/<job_id>"
    assert value(samples, "genq_http_requests_total", route=rule, status="200") >= 1
    assert value(samples, "genq_http_requests_total", route=rule, status="404") >= 1
    assert value(samples, "genq_http_requests_total", route="unmatched") >= 1
    assert value(samples, "genq_http_request_duration_seconds_count", route=rule) >= 2
    routes = {lab["route"] for lab, _ in samples["genq_http_requests_total"]}
    assert not any(job_id in r or "nope" in r for r in routes), routes


def test_cluster_figures_come_from_the_workers_snapshots(
    client: FlaskClient, database: Database, broker: redis.Redis, keys: Keys
) -> None:
    with database.read() as session:
        model = session.scalar(sa.select(Model).where(Model.name == "echo"))
        assert model is not None
        model_id, ref = model.id, model.ref
    gpu = {"index": 0, "memory_reserved_bytes": 2**30, "memory_total_bytes": 8 * 2**30,
           "utilization_percent": 40}  # fmt: skip
    server = {"model_id": model_id, "replica": f"model-{model_id}", "gpu": gpu,
              "gpu_ids": ["1"], "node_ip": "10.0.0.7",
              "batching": {"batches": 3, "batched_jobs": 8, "solo_jobs": 2,
                           "largest_batch_jobs": 4}}  # fmt: skip
    snapshot = {
        "hostname": "celery@w1",
        "concurrency": 4,
        "taken_at": time.time(),
        "ray": {
            "connected": True,
            "nodes": [{"address": "10.0.0.7", "alive": True, "resources": {"GPU": 2.0}}],
            "cluster_resources": {"GPU": 2.0, "CPU": 8.0},
            "available_resources": {"GPU": 1.0, "CPU": 8.0},
            "model_servers": [server],
            "pool": {
                "servers": [{"model_id": model_id, "family": "echo", "ready": True}],
                "models": {model_id: {"desired": 1, "replicas": 1}},
            },  # fmt: skip
        },
    }
    broker.set(SNAPSHOT_KEY.format(hostname="celery@w1"), json.dumps(snapshot), ex=60)
    samples = scrape(client, keys.admin)
    assert value(samples, "genq_workers") == 1
    assert value(samples, "genq_worker_slots") == 4
    assert value(samples, "genq_model_servers", model=ref, ready="true") == 1
    assert value(samples, "genq_gpu_memory_used_bytes", node="10.0.0.7", gpu="1") == 2**30
    assert value(samples, "genq_gpu_utilization_percent", node="10.0.0.7", gpu="1") == 40
    assert value(samples, "genq_batch_jobs_total", model=ref, mode="batched") == 8
    assert value(samples, "genq_cluster_resources", resource="GPU", kind="available") == 1
    assert value(samples, "genq_node_gpus", node="10.0.0.7") == 2


def test_the_sql_figures_are_shared_for_the_cache_time(
    settings: Settings, database: Database, publisher: Publisher, broker: redis.Redis, keys: Keys
) -> None:
    shared = settings.model_copy(update={"metrics_cache_s": 60})
    first = create_app(shared, database=database, publisher=publisher).test_client()
    second = create_app(shared, database=database, publisher=publisher).test_client()
    assert value(scrape(first), "genq_jobs_submitted_total") == 0
    assert submit(first, keys.acme, echo(message="x")).status_code == 202
    # Another process within the cache time answers the shared text: no new query.
    assert value(scrape(second), "genq_jobs_submitted_total") == 0
    assert 0 < broker.pttl(SQL_CACHE_KEY) <= 60_000
    broker.delete(SQL_CACHE_KEY)
    assert value(scrape(second), "genq_jobs_submitted_total") == 1
