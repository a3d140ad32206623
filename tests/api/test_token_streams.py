"""Streamed text, from the recorder to the followers: a language model's tokens are written
coalesced (at most one transaction per GENQ_TOKEN_FLUSH_MS), each write wakes the job's event
streams through Redis, and the text arrives in order, once, over SSE; a cancel keeps what was
made, and an attempt that runs again is told apart.

The recorder is the runner's own (scheduler/recorder.py) on real SQL and a real Redis; the
events it records are the TextDelta events a model server sends. The runner's finishing
transaction is written here as the runner writes it (write_pending, finish, committed).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

pytest.importorskip("ray")

from api.openai_compat.errors import JobWaitError  # noqa: E402
from api.openai_compat.text_answers import ChoiceText  # noqa: E402
from core.db import READ_ONLY, Database  # noqa: E402
from core.events import Progress, TextDelta  # noqa: E402
from core.leases import Lease, claim_job, finish_job, release_job  # noqa: E402
from core.recording import record_text  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.states import JobKind, JobState  # noqa: E402
from core.tables import Job, JobEvent  # noqa: E402
from scheduler.enqueue import Publisher  # noqa: E402
from scheduler.recorder import EventRecorder  # noqa: E402
from scheduler.runner import JobSnapshot, Runner  # noqa: E402
from tests.support.api import (  # noqa: E402
    Keys,
    bearer,
    echo,
    parse_sse,  # noqa: E402
    submit,
)

TOKENS = 1000
# Longest a test waits for something that should come within milliseconds.
PATIENCE_S = 30.0


def start(client: FlaskClient, keys: Keys, database: Database) -> tuple[str, Lease]:
    job_id = submit(client, keys.acme, echo()).get_json()["id"]
    with database.transaction() as session:
        lease = claim_job(session, job_id, lease_ttl_s=60)
    assert lease is not None
    return job_id, lease


def recorder_for(
    settings: Settings, database: Database, publisher: Publisher, job_id: str, lease: Lease
) -> EventRecorder:
    with database.read() as session:
        tenant_id = session.scalar(select(Job.tenant_id).where(Job.id == job_id))
    snapshot = JobSnapshot(
        id=job_id,
        tenant_id=str(tenant_id),
        kind=JobKind.GENERATE,
        family="echo",
        queue="generate",
        priority=5,
        params={},
        target_name=None,
    )
    return EventRecorder(Runner(settings, database, publisher), snapshot, lease)


def end(database: Database, recorder: EventRecorder, lease: Lease, state: JobState) -> None:
    """The runner's last transaction of an attempt: what is pending, then the finish."""
    with database.transaction() as session:
        recorder.write_pending(session)
        finish_job(session, lease, state)
    recorder.committed()
    recorder.discard_unrecorded(succeeded=state == JobState.SUCCEEDED)


def stored_text(database: Database, job_id: str) -> list[dict[str, Any]]:
    with database.read() as session:
        return list(
            session.scalars(
                select(JobEvent.data)
                .where(JobEvent.job_id == job_id, JobEvent.type == "text_delta")
                .order_by(JobEvent.id)
            )
        )


def follow(client: FlaskClient, key: str, job_id: str) -> Iterator[str]:
    """The job's event stream, chunk by chunk as the server sends them."""
    response = client.get(f"/v1/jobs/{job_id}/events", headers=bearer(key), buffered=False)
    assert response.status_code == 200
    try:
        for chunk in response.response:
            yield chunk.decode()
    finally:
        response.close()


def test_a_long_stream_costs_a_transaction_per_interval_and_arrives_whole(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings, publisher: Publisher
) -> None:
    job_id, lease = start(client, keys, database)
    recorder = recorder_for(settings, database, publisher, job_id, lease)
    assert recorder.flush_s == 0.1  # the default, GENQ_TOKEN_FLUSH_MS=100
    pieces = [f"{i} " for i in range(TOKENS)]
    commits: list[float] = []  # write transactions (the stream's reads are read-only)

    def count(conn: sa.Connection) -> None:
        if not conn.get_execution_options().get(READ_ONLY, False):
            commits.append(time.monotonic())

    sa.event.listen(database.engine, "commit", count)
    fed: dict[str, float] = {}

    def model() -> None:
        fed["from"] = time.monotonic()
        for i, piece in enumerate(pieces):
            recorder.record(TextDelta(i, piece))
            if i % 100 == 0:
                recorder.record(Progress(i, TOKENS, "tokens"))
            time.sleep(0.001)  # a token a millisecond or so, as a fast model makes them
        fed["to"] = time.monotonic()
        end(database, recorder, lease, JobState.SUCCEEDED)

    worker = threading.Thread(target=model)
    worker.start()
    text = "".join(follow(client, keys.acme, job_id))  # ends once the job has succeeded
    worker.join()

    # Writes are at least an interval apart, so however long the feed took (a slow machine
    # only makes the bound looser): at most one per 100 ms of it, plus the first token's
    # write (it goes out at once) and the finishing one. Per token it would be 1,000.
    during = [t for t in commits if fed["from"] <= t <= fed["to"]]
    assert len(during) <= (fed["to"] - fed["from"]) / 0.1 + 2, (len(during), fed)
    rows = stored_text(database, job_id)
    assert 1 < len(rows) <= len(commits) and len(rows) < TOKENS
    assert "".join(row["text"] for row in rows) == "".join(pieces)
    assert [row["index"] for row in rows] == sorted({row["index"] for row in rows})
    assert {row["attempt"] for row in rows} == {1}

    events = parse_sse(text)
    streamed = [e["data"] for e in events if e["event"] == "text_delta"]
    assert "".join(d["text"] for d in streamed) == "".join(pieces)  # in order, once
    assert [e["id"] for e in events] == sorted({e["id"] for e in events})
    assert events[-1]["data"]["to"] == "succeeded"
    # Progress went out too (with the text, while it streamed).
    assert any(e["event"] == "progress" for e in events)


def test_each_write_wakes_the_stream_at_once(
    app: Flask,
    client: FlaskClient,
    keys: Keys,
    database: Database,
    settings: Settings,
    publisher: Publisher,
) -> None:
    """With polling all but off, the stream still gets each write: the recorder's wake-up."""
    state = app.extensions["genq"]
    state.stream_poll_s = 3600.0
    state.stream_keepalive_s = 3600.0
    job_id, lease = start(client, keys, database)
    recorder = recorder_for(settings, database, publisher, job_id, lease)
    seen: queue.Queue[dict[str, Any]] = queue.Queue()

    def read() -> None:
        buffered = ""
        for chunk in follow(client, keys.acme, job_id):
            buffered += chunk
            *blocks, buffered = buffered.split("\n\n")
            for event in parse_sse("\n\n".join(blocks) + "\n\n"):
                seen.put(event)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def next_text() -> str:
        while True:
            event = seen.get(timeout=PATIENCE_S)
            if event["event"] == "text_delta":
                return str(event["data"]["text"])

    while seen.get(timeout=PATIENCE_S)["data"].get("to") != "running":  # the history so far
        pass
    recorder.record(TextDelta(0, "first"))  # the first token is written at once
    assert next_text() == "first"
    recorder.record(TextDelta(1, " second"))  # within the interval: the timer writes it
    recorder.record(TextDelta(2, " third"))
    text = next_text()  # both in one event, unless the timer fired between the two
    if text == " second":
        text += next_text()
    assert text == " second third"
    end(database, recorder, lease, JobState.SUCCEEDED)
    while (event := seen.get(timeout=PATIENCE_S))["event"] != "state":
        pass
    assert event["data"]["to"] == "succeeded"
    reader.join(PATIENCE_S)
    assert not reader.is_alive()


def test_a_cancel_mid_stream_keeps_the_text_made(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings, publisher: Publisher
) -> None:
    job_id, lease = start(client, keys, database)
    # A long interval: whatever the machine's pace, the text after the first piece waits.
    slow = settings.model_copy(update={"token_flush_ms": 10_000})
    recorder = recorder_for(slow, database, publisher, job_id, lease)
    pieces = [f"<{i}>" for i in range(50)]
    for i, piece in enumerate(pieces):
        recorder.record(TextDelta(i, piece))
    assert len(recorder.pending_text) == 49  # the first went out at once
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(keys.acme)).status_code == 202
    end(database, recorder, lease, JobState.CANCELED)
    assert recorder.pending_text == []
    rows = stored_text(database, job_id)
    assert "".join(row["text"] for row in rows) == "".join(pieces)
    events = parse_sse(client.get(f"/v1/jobs/{job_id}/events", headers=bearer(keys.acme)).text)
    assert events[-1]["data"]["to"] == "canceled"
    streamed = "".join(e["data"]["text"] for e in events if e["event"] == "text_delta")
    assert streamed == "".join(pieces)


def test_per_token_writes_when_coalescing_is_off(
    client: FlaskClient,
    keys: Keys,
    database: Database,
    settings: Settings,
    publisher: Publisher,
) -> None:
    """GENQ_TOKEN_FLUSH_MS=0, the baseline: a text_delta event per token, as before."""
    job_id, lease = start(client, keys, database)
    per_token = settings.model_copy(update={"token_flush_ms": 0})
    recorder = recorder_for(per_token, database, publisher, job_id, lease)
    for i in range(20):
        recorder.record(TextDelta(i, f"{i},"))
    end(database, recorder, lease, JobState.SUCCEEDED)
    rows = stored_text(database, job_id)
    assert [row["index"] for row in rows] == list(range(20))


def test_an_attempt_that_runs_again_is_told_apart_and_a_lost_commit_is_not_written_twice(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    job_id, first = start(client, keys, database)
    with database.transaction() as session:
        record_text(session, first, 0, "Once upon")
    with database.transaction() as session:
        # The same write tried again after its commit's answer was lost: it is not repeated.
        record_text(session, first, 0, "Once upon", again=True)
    with database.transaction() as session:
        release_job(session, first, reason="the worker died", backoff_s=0)
    with database.transaction() as session:
        second = claim_job(session, job_id, lease_ttl_s=60)
    assert second is not None and second.attempt == 2
    with database.transaction() as session:
        record_text(session, second, 0, "Once upon", again=True)  # another attempt's: kept
        record_text(session, second, 1, " a time")
    rows = stored_text(database, job_id)
    assert [(row["attempt"], row["text"]) for row in rows] == [
        (1, "Once upon"),
        (2, "Once upon"),
        (2, " a time"),
    ]


def test_an_openai_stream_skips_text_a_new_attempt_repeats() -> None:
    choice = ChoiceText("job-1")
    assert choice.add(1, "Once ") == "Once "
    assert choice.add(1, "upon") == "upon"
    assert choice.add(2, "Once") == ""  # the same seed makes the same text again
    assert choice.add(2, " up") == ""
    assert choice.add(2, "on a time") == " a time"
    assert choice.sent == "Once upon a time"
    other = ChoiceText("job-2")
    other.add(1, "Once upon")
    with pytest.raises(JobWaitError, match="other text"):
        other.add(2, "Twice")
