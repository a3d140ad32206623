"""Event streams, logs and artifact downloads of jobs driven through the core services."""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from core.db import Database
from core.events import Progress
from core.leases import claim_job, finish_job
from core.recording import record_events
from core.settings import Settings
from core.states import JobState
from tests.support.api import (
    Keys,
    assert_problem,
    bearer,
    echo,
    parse_sse,
    run_job,
    submit,
)


def test_events_replay_and_resume_with_last_event_id(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    job = submit(client, keys.acme, echo()).get_json()
    run_job(database, settings, job["id"], outputs={"out.txt": b"hello"})
    url = f"/v1/jobs/{job['id']}/events"

    response = client.get(url, headers=bearer(keys.acme))
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    events = parse_sse(response.get_data(as_text=True))
    types = [e["event"] for e in events]
    assert types[0] == "state" and events[0]["data"]["to"] == "queued"
    assert types[-1] == "state" and events[-1]["data"]["to"] == "succeeded"
    assert {"log", "progress", "metric", "output"} <= set(types)
    output = next(e for e in events if e["event"] == "output")["data"]
    assert output["url"] == f"/v1/artifacts/{output['artifact_id']}"
    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)

    middle = ids[2]
    resumed = client.get(url, headers={**bearer(keys.acme), "Last-Event-ID": str(middle)})
    assert [e["id"] for e in parse_sse(resumed.get_data(as_text=True))] == ids[3:]
    by_query = client.get(url, query_string={"last_event_id": middle}, headers=bearer(keys.acme))
    assert [e["id"] for e in parse_sse(by_query.get_data(as_text=True))] == ids[3:]

    bad = client.get(url, headers={**bearer(keys.acme), "Last-Event-ID": "abc"})
    assert [e["field"] for e in assert_problem(bad, 422)["errors"]] == ["Last-Event-ID"]


def test_events_stream_live_until_the_job_finishes(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    job = submit(client, keys.acme, echo()).get_json()
    with database.transaction() as session:
        lease = claim_job(session, job["id"], lease_ttl_s=60)
    assert lease is not None

    def work() -> None:
        for step in range(1, 4):
            time.sleep(0.1)
            with database.transaction() as session:
                record_events(session, lease, [Progress(step, 3)])
        with database.transaction() as session:
            finish_job(session, lease, JobState.SUCCEEDED)

    worker = threading.Thread(target=work)
    worker.start()
    response = client.get(f"/v1/jobs/{job['id']}/events", headers=bearer(keys.acme))
    text = response.get_data(as_text=True)  # returns once the stream ends
    worker.join()
    events = parse_sse(text)
    assert [e["data"]["step"] for e in events if e["event"] == "progress"] == [1, 2, 3]
    assert events[-1]["data"]["to"] == "succeeded"


def test_artifact_download_returns_the_bytes(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    data = b"generated text\n" * 100
    job = submit(client, keys.acme, echo()).get_json()
    run_job(database, settings, job["id"], outputs={"story.txt": data})
    body = client.get(f"/v1/jobs/{job['id']}", headers=bearer(keys.acme)).get_json()
    url = body["outputs"][0]["url"]

    response = client.get(url, headers=bearer(keys.acme))
    assert response.status_code == 200
    assert response.get_data() == data
    assert response.mimetype == "text/plain"
    assert response.headers["Content-Length"] == str(len(data))
    etag = hashlib.sha256(data).hexdigest()
    assert response.headers["ETag"] == f'"{etag}"'
    assert response.headers["Content-Disposition"] == "inline; filename=story.txt"
    response.close()

    cached = client.get(url, headers={**bearer(keys.acme), "If-None-Match": f'"{etag}"'})
    assert cached.status_code == 304

    assert_problem(client.get(url, headers=bearer(keys.globex)), 404)
    admin = client.get(url, headers=bearer(keys.admin))
    assert admin.get_data() == data
    admin.close()
    assert_problem(client.get("/v1/artifacts/nope", headers=bearer(keys.acme)), 404)


def test_an_artifact_whose_file_is_gone_is_404(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    job = submit(client, keys.acme, echo()).get_json()
    run_job(database, settings, job["id"], outputs={"a.txt": b"x"})
    body = client.get(f"/v1/jobs/{job['id']}", headers=bearer(keys.acme)).get_json()
    for path in settings.artifacts.rglob("a.txt"):
        path.unlink()
    assert_problem(client.get(body["outputs"][0]["url"], headers=bearer(keys.acme)), 404)


def test_an_idle_stream_sends_keep_alives_and_holds_no_transaction(
    app: Flask, client: FlaskClient, keys: Keys
) -> None:
    app.extensions["genq"].stream_keepalive_s = 0.1
    job = submit(client, keys.acme, echo()).get_json()
    response = client.get(f"/v1/jobs/{job['id']}/events", headers=bearer(keys.acme), buffered=False)
    chunks = iter(response.response)
    received = ""
    while ": keep-alive" not in received:
        received += next(chunks).decode()
    # The stream is paused between polls: a write now must not wait for it (on SQLite every
    # transaction takes the write lock, so a transaction held by the stream would block this).
    canceled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=bearer(keys.acme))
    assert canceled.status_code == 202
    received += "".join(chunk.decode() for chunk in chunks)  # ends once the job is terminal
    response.close()
    events = parse_sse(received)
    assert [e["data"]["to"] for e in events] == ["queued", "canceled"]


def test_past_the_stream_limit_a_stream_is_a_503_and_the_api_still_answers(
    app: Flask, client: FlaskClient, keys: Keys
) -> None:
    state = app.extensions["genq"]
    # The default: half the server's threads hold streams, the other half answer the rest.
    assert state.stream_limit == state.settings.api_threads // 2
    state.streams = threading.BoundedSemaphore(2)
    state.stream_limit = 2
    jobs = [submit(client, keys.acme, echo()).get_json()["id"] for _ in range(3)]

    def open_stream(job_id: str) -> Any:
        response = client.get(
            f"/v1/jobs/{job_id}/events", headers=bearer(keys.acme), buffered=False
        )
        assert response.status_code == 200
        next(iter(response.response))  # the stream has started and holds its slot
        return response

    first, second = open_stream(jobs[0]), open_stream(jobs[1])
    refused = client.get(f"/v1/jobs/{jobs[2]}/events", headers=bearer(keys.acme))
    body = assert_problem(refused, 503)
    assert body["type"] == "busy" and "GENQ_API_MAX_STREAMS" in body["detail"]
    assert refused.headers["Retry-After"] == "5"
    # Everything else still answers while the streams are open.
    assert client.get(f"/v1/jobs/{jobs[2]}", headers=bearer(keys.acme)).status_code == 200

    first.close()  # a client that goes away frees its slot
    third = open_stream(jobs[2])
    second.close()
    third.close()
    # Every slot is back: two more open.
    open_stream(jobs[0]).close()
    both = [open_stream(jobs[0]), open_stream(jobs[1])]
    assert_problem(client.get(f"/v1/jobs/{jobs[2]}/events", headers=bearer(keys.acme)), 503)
    for response in both:
        response.close()


def test_a_tenant_holds_at_most_its_share_of_the_streams(
    app: Flask, client: FlaskClient, keys: Keys
) -> None:
    """One tenant holding streams up to its share gets a 429; another tenant still gets one."""
    state = app.extensions["genq"]
    # The default share: half of the process's streams.
    assert state.tenant_stream_limit == state.stream_limit // 2
    state.streams = threading.BoundedSemaphore(4)
    state.stream_limit, state.tenant_stream_limit = 4, 2
    mine = [submit(client, keys.acme, echo()).get_json()["id"] for _ in range(3)]
    theirs = submit(client, keys.globex, echo()).get_json()["id"]

    def open_stream(job_id: str, key: str) -> Any:
        response = client.get(f"/v1/jobs/{job_id}/events", headers=bearer(key), buffered=False)
        assert response.status_code == 200
        next(iter(response.response))
        return response

    held = [open_stream(mine[0], keys.acme), open_stream(mine[1], keys.acme)]
    refused = client.get(f"/v1/jobs/{mine[2]}/events", headers=bearer(keys.acme))
    body = assert_problem(refused, 429)
    assert body["policy"] == "streams" and "GENQ_API_MAX_STREAMS_PER_TENANT" in body["detail"]
    assert refused.headers["Retry-After"] == "5"
    other = open_stream(theirs, keys.globex)  # the neighbour is not shut out
    held[0].close()
    held.append(open_stream(mine[2], keys.acme))  # a closed stream frees the tenant's slot
    for response in [*held, other]:
        response.close()
    assert state.streams_by_tenant == {}
