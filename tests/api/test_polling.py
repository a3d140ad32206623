"""Polling (`GET /v1/jobs/{id}`) answered from documents kept in Redis (api/polling.py) and API
keys trusted for a moment per process (api/auth.py), on SQLite and PostgreSQL with a real
Redis. Two apps on one database and one Redis stand for two API processes.

- a poll is never older than settings.status_staleness_s: a job a worker starts or finishes,
  and the queue position of the job behind it, show by the first poll after the bound;
- a change made through the API (cancel, priority) shows at once, through either process;
- a document read before a change cannot replace the changed one;
- another tenant's job is a 404 from a stored document too; an ETag answers 304;
- a revoked key stops at once in the process that revoked it, within settings.auth_cache_s in
  the other;
- without Redis every poll is answered from SQL.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from api import polling
from api.app import create_app
from core.artifacts import ArtifactStore
from core.db import Database
from core.events import Output
from core.leases import claim_job, finish_job
from core.recording import record_output
from core.settings import Settings
from core.states import JobState
from core.tables import ApiKey, Job
from scheduler.enqueue import Publisher
from tests.support.api import (
    Keys,
    assert_problem,
    bearer,
    echo,
    submit,
)


@pytest.fixture
def other(settings: Settings, database: Database, app: Flask) -> Iterator[FlaskClient]:  # noqa: F811
    """A second API process: its own app, publisher, key cache and queue figures."""
    own = Publisher(settings)
    try:
        yield create_app(settings, database=database, publisher=own).test_client()
    finally:
        own.close()


def poll(client: FlaskClient, job_id: str, key: str) -> dict:  # noqa: F811
    response = client.get(f"/v1/jobs/{job_id}", headers=bearer(key))
    assert response.status_code == 200, response.get_data(as_text=True)
    return dict(response.get_json())


def wait_out(since: float, bound_s: float) -> None:
    """Until the bound has passed since `since` (a monotonic time)."""
    time.sleep(max(0.0, since + bound_s - time.monotonic()) + 0.01)


def test_a_worker_s_changes_show_by_the_first_poll_after_the_bound(
    client: FlaskClient,  # noqa: F811
    other: FlaskClient,
    keys: Keys,  # noqa: F811
    database: Database,  # noqa: F811
    settings: Settings,  # noqa: F811
) -> None:
    bound = settings.status_staleness_s
    assert bound == 1.0  # the documented default
    first = submit(client, keys.acme, echo()).get_json()["id"]
    second = submit(client, keys.acme, echo()).get_json()["id"]
    time.sleep(bound)  # the submits' own queue figures have run out
    assert poll(client, second, keys.acme)["queue_position"] == 1
    seen = poll(client, first, keys.acme)
    assert seen["state"] == "queued"
    # A worker starts the first job, outside the API.
    with database.transaction() as session:
        lease = claim_job(session, first, lease_ttl_s=60)
    assert lease is not None
    started = time.monotonic()
    # Within the bound the stored document may still answer (that is the point of it).
    assert poll(other, first, keys.acme)["state"] in ("queued", "running")
    wait_out(started, bound)
    for api in (client, other):
        assert poll(api, first, keys.acme)["state"] == "running"
        assert poll(api, second, keys.acme)["queue_position"] == 0
    # It finishes with an output: the next poll after the bound has both.
    stored = ArtifactStore(settings.artifacts).write_output(
        keys.acme_tenant, first, "out.txt", b"hello"
    )
    with database.transaction() as session:
        record_output(session, lease, Output("out.txt", "text", "text/plain", b"hello"), stored)
        finish_job(session, lease, JobState.SUCCEEDED)
    finished = time.monotonic()
    wait_out(finished, bound)
    for api in (client, other):
        done = poll(api, first, keys.acme)
        assert done["state"] == "succeeded"
        assert [o["name"] for o in done["outputs"]] == ["out.txt"]


def test_a_change_through_the_api_shows_at_once_in_every_process(
    client: FlaskClient,  # noqa: F811
    other: FlaskClient,
    keys: Keys,  # noqa: F811
) -> None:
    job = submit(client, keys.acme, echo()).get_json()["id"]
    for api in (client, other):  # both have polled it: a document is stored
        assert poll(api, job, keys.acme)["priority"] == 5
    changed = client.patch(f"/v1/jobs/{job}", json={"priority": 8}, headers=bearer(keys.acme))
    assert changed.status_code == 200
    assert poll(other, job, keys.acme)["priority"] == 8
    canceled = other.post(f"/v1/jobs/{job}/cancel", headers=bearer(keys.acme))
    assert canceled.status_code == 202
    for api in (client, other):
        body = poll(api, job, keys.acme)
        assert body["state"] == "canceled" and body["queue_position"] is None


def test_a_document_read_before_a_change_cannot_replace_it(
    app: Flask,  # noqa: F811
    client: FlaskClient,  # noqa: F811
    keys: Keys,  # noqa: F811
    database: Database,  # noqa: F811
) -> None:
    job = submit(client, keys.acme, echo()).get_json()["id"]
    before = poll(client, job, keys.acme)
    with database.read() as session:
        old_version = polling.version_of(session.get_one(Job, job).updated_at)
    assert client.post(f"/v1/jobs/{job}/cancel", headers=bearer(keys.acme)).status_code == 202
    # A poll that read the row before the cancel stores its document after it.
    with app.test_request_context():
        polling.documents().write(
            job,
            version=old_version,
            tenant_id=keys.acme_tenant,
            payload=before,
            as_of=time.monotonic(),
        )
    assert poll(client, job, keys.acme)["state"] == "canceled"


def test_another_tenants_job_is_404_from_a_stored_document_too(
    client: FlaskClient,  # noqa: F811
    keys: Keys,  # noqa: F811
) -> None:
    job = submit(client, keys.acme, echo()).get_json()["id"]
    assert poll(client, job, keys.acme)["id"] == job  # stored now
    refused = client.get(f"/v1/jobs/{job}", headers=bearer(keys.globex))
    assert assert_problem(refused, 404)["detail"] == f"no job {job}"
    assert poll(client, job, keys.admin)["id"] == job  # an admin sees every tenant's


def test_an_etag_answers_304_until_the_job_changes(
    client: FlaskClient,  # noqa: F811
    keys: Keys,  # noqa: F811
) -> None:
    job = submit(client, keys.acme, echo()).get_json()["id"]
    first = client.get(f"/v1/jobs/{job}", headers=bearer(keys.acme))
    etag = first.headers["ETag"]
    again = client.get(f"/v1/jobs/{job}", headers={**bearer(keys.acme), "If-None-Match": etag})
    assert again.status_code == 304 and again.get_data() == b""
    assert client.post(f"/v1/jobs/{job}/cancel", headers=bearer(keys.acme)).status_code == 202
    after = client.get(f"/v1/jobs/{job}", headers={**bearer(keys.acme), "If-None-Match": etag})
    assert after.status_code == 200 and after.headers["ETag"] != etag
    assert after.get_json()["state"] == "canceled"


def test_a_revoked_key_stops_at_once_here_and_within_the_bound_elsewhere(
    client: FlaskClient,  # noqa: F811
    other: FlaskClient,
    keys: Keys,  # noqa: F811
    database: Database,  # noqa: F811
    settings: Settings,  # noqa: F811
) -> None:
    for api in (client, other):  # both processes have checked (and now trust) the key
        assert api.get("/v1/jobs", headers=bearer(keys.acme)).status_code == 200
    with database.read() as session:
        key_id = session.scalar(select(ApiKey.id).where(ApiKey.prefix == keys.acme[:11]))
    revoked = client.delete(f"/v1/keys/{key_id}", headers=bearer(keys.admin))
    assert revoked.status_code == 200
    at = time.monotonic()
    assert_problem(client.get("/v1/jobs", headers=bearer(keys.acme)), 401)
    wait_out(at, settings.auth_cache_s)
    assert_problem(other.get("/v1/jobs", headers=bearer(keys.acme)), 401)


def test_without_redis_polls_are_answered_from_sql(
    settings: Settings,  # noqa: F811
    database: Database,  # noqa: F811
    client: FlaskClient,  # noqa: F811
    keys: Keys,  # noqa: F811
) -> None:
    job = submit(client, keys.acme, echo()).get_json()["id"]
    down = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    own = Publisher(down)
    try:
        api = create_app(down, database=database, publisher=own).test_client()
        assert poll(api, job, keys.acme)["state"] == "queued"
        assert api.post(f"/v1/jobs/{job}/cancel", headers=bearer(keys.acme)).status_code == 202
        assert poll(api, job, keys.acme)["state"] == "canceled"
    finally:
        own.close()
