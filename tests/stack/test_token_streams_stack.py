"""Streamed text through a real `genq up` (SQLite, embedded Redis, Celery, local Ray, gunicorn):
the tiny `charlm` writes 1,000 tokens while a client follows the job's events over HTTP. The
text is written at most once per 100 ms (GENQ_TOKEN_FLUSH_MS, the default), counted in the
job's own history; the client sees it in order, once, and it is the job's stored output. A
job canceled mid-stream keeps the text it made."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import requests

from core.events import without_nul
from tests.support.stackproc import StackProcess, running_stack

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    with running_stack(
        tmp_path_factory.mktemp("tokens") / "var", {"GENQ_RAY_NUM_CPUS": "2"}, check_leftovers=False
    ) as proc:
        text = ("The quick brown fox jumps over the lazy dog. " * 30).encode()
        files = {"file": ("fox.txt", text, "text/plain")}
        uploaded = proc.call("POST", "/v1/datasets", data={"name": "fox", "kind": "text"},
                             files=files)  # fmt: skip
        assert uploaded.status_code == 201, uploaded.text
        params = {"preset": "tiny", "steps": 2, "batch_size": 4}
        body = {
            "kind": "train",
            "family": "charlm",
            "dataset": "fox",
            "name": "lm",
            "params": params,
        }
        trained = proc.wait(proc.submit(body)["id"])
        assert trained["state"] == "succeeded", trained
        yield proc


def parse(lines: Iterator[str], events: list[tuple[str, dict[str, Any]]]) -> None:
    """Append each Server-Sent Event of `lines` to `events` as it comes: (type, data)."""
    kind = ""
    for line in lines:
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[6:])))


def follow(stack: StackProcess, job_id: str, events: list[tuple[str, dict[str, Any]]]) -> None:
    """Read the job's event stream as it comes, until the job ends."""
    with requests.get(
        f"{stack.url}/v1/jobs/{job_id}/events",
        headers={"Authorization": f"Bearer {stack.admin_key}"},
        stream=True,
        timeout=(10, 300),
    ) as response:
        assert response.status_code == 200
        parse(response.iter_lines(decode_unicode=True), events)


def generate(stack: StackProcess, max_tokens: int) -> tuple[str, list, threading.Thread]:
    body = {"kind": "generate", "model": "lm", "params": {"max_tokens": max_tokens, "seed": 7}}
    job_id = stack.submit(body)["id"]
    events: list[tuple[str, dict[str, Any]]] = []
    reader = threading.Thread(target=follow, args=(stack, job_id, events))
    reader.start()
    return job_id, events, reader


def seconds(job: dict[str, Any]) -> float:
    started = datetime.fromisoformat(job["started_at"])
    return (datetime.fromisoformat(job["finished_at"]) - started).total_seconds()


def test_a_thousand_tokens_are_coalesced_and_arrive_whole(stack: StackProcess) -> None:
    job_id, events, reader = generate(stack, 1000)
    job = stack.wait(job_id)
    reader.join(60)
    assert job["state"] == "succeeded", job
    deltas = [data for kind, data in events if kind == "text_delta"]
    text = "".join(d["text"] for d in deltas)
    (output,) = job["outputs"]
    assert output["name"] == "output.txt"
    stored = stack.call("GET", output["url"]).content.decode()
    # In order, once: the followed stream is the stored text (with a NUL byte, which SQL
    # cannot hold, as U+FFFD: the tiny model is barely trained and makes any byte).
    assert text == without_nul(stored)
    assert [d for kind, d in events if kind == "progress"][-1]["step"] == 1000
    # Each text write began at least 100 ms after the one before, within the attempt's run,
    # besides the first token's (it goes out at once) and the finishing one.
    assert len(deltas) <= seconds(job) / 0.1 + 2, (len(deltas), seconds(job))
    assert len(deltas) < 500  # a write per token would be 1,000
    assert {d["attempt"] for d in deltas} == {1}
    assert [kind for kind, _ in events][-1] == "state"


def test_a_cancel_mid_stream_keeps_the_text_made(stack: StackProcess) -> None:
    job_id, events, reader = generate(stack, 8192)
    for _ in range(600):  # until the first text has arrived
        if any(kind == "text_delta" for kind, _ in events):
            break
        reader.join(0.1)
    assert any(kind == "text_delta" for kind, _ in events), events
    assert stack.call("POST", f"/v1/jobs/{job_id}/cancel").status_code == 202
    job = stack.wait(job_id)
    reader.join(60)
    assert job["state"] == "canceled", job
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "state" and events[-1][1]["to"] == "canceled"
    text = "".join(data["text"] for kind, data in events if kind == "text_delta")
    assert 0 < len(text.encode()) < 8192 * 4
    # The history read afterwards holds the same text: what the stream showed was kept.
    kept: list[tuple[str, dict[str, Any]]] = []
    parse(iter(stack.call("GET", f"/v1/jobs/{job_id}/events").text.splitlines()), kept)
    assert "".join(data["text"] for kind, data in kept if kind == "text_delta") == text
