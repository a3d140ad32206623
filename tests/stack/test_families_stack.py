"""The new families through a real `genq up` (SQLite, embedded Redis, Celery, local Ray,
gunicorn): upload a text data set over HTTP, train the tiny `charlm` on it, fine-tune the
result on the built-in `pydocs` (a second version that names its parent), then generate and
read the streamed `text_delta` events and the downloadable text they add up to."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.support.stackproc import StackProcess, running_stack

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    with running_stack(
        tmp_path_factory.mktemp("families") / "var",
        {"GENQ_RAY_NUM_CPUS": "2"},
        check_leftovers=False,
    ) as proc:
        yield proc


def sse_events(stack: StackProcess, job_id: str) -> list[tuple[str, dict]]:
    """The finished job's whole event history from its Server-Sent Events stream."""
    response = stack.call("GET", f"/v1/jobs/{job_id}/events")
    assert response.status_code == 200
    events, kind = [], ""
    for line in response.text.splitlines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[6:])))
    return events


def test_upload_train_finetune_and_stream_text(stack: StackProcess) -> None:
    text = ("The quick brown fox jumps over the lazy dog. " * 30).encode()
    files = {"file": ("fox.txt", text, "text/plain")}
    uploaded = stack.call("POST", "/v1/datasets", data={"name": "fox", "kind": "text"}, files=files)
    assert uploaded.status_code == 201, uploaded.text

    params = {"preset": "tiny", "steps": 4, "batch_size": 4, "checkpoint_every": 2}
    train = {"kind": "train", "family": "charlm", "dataset": "fox", "name": "lm", "params": params}
    done = stack.wait(stack.submit(train)["id"])
    assert done["state"] == "succeeded", done
    assert done["result_model"] == "lm:1"
    assert "bits_per_char" in done["metrics"]

    tune = {
        "kind": "finetune",
        "model": "lm:1",
        "dataset": "pydocs",
        "name": "lm",
        "params": {"steps": 2, "batch_size": 4},
    }
    tuned = stack.wait(stack.submit(tune)["id"])
    assert tuned["state"] == "succeeded", tuned
    assert tuned["result_model"] == "lm:2"
    versions = stack.call("GET", "/v1/models/lm").json()["items"]
    assert [v["lineage"]["parent"] for v in versions] == [None, "lm:1"]
    assert [v["lineage"]["dataset"] for v in versions] == ["fox", "pydocs"]

    body = {
        "kind": "generate",
        "model": "lm:2",
        "params": {"prompt": "The ", "max_tokens": 16, "seed": 3},
    }
    job = stack.wait(stack.submit(body)["id"])
    assert job["state"] == "succeeded", job
    deltas = [data for kind, data in sse_events(stack, job["id"]) if kind == "text_delta"]
    assert deltas, "the tokens were streamed as text_delta events"
    (output,) = job["outputs"]
    downloaded = stack.call("GET", output["url"])
    assert downloaded.status_code == 200
    assert downloaded.content.decode() == "".join(d["text"] for d in deltas)
