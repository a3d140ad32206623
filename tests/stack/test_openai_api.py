"""The OpenAI-compatible API, synchronous waits, batches and the Python client, through a real
`genq up` (SQLite, embedded Redis, Celery, local Ray, gunicorn), called with the official
`openai` package and with `genq_client`, as users call them. Tiny `charlm` and `ddpm` models
are trained first (seconds on a CPU)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from PIL import Image

from stack.supervisor import ADMIN_TENANT
from tests.support.stackproc import ROOT, StackProcess, running_stack
from tests.support.training import tiny_ddpm_params

pytestmark = pytest.mark.stack

LM = {"preset": "tiny", "steps": 4, "batch_size": 4, "checkpoint_every": 2, "seed": 1}
DDPM = tiny_ddpm_params(steps=4, batch_size=8, checkpoint_every=2)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    # A job held at its tenant's cap (test_errors_are_the_clients_own_exceptions) gets a new
    # token once its hold and the republish delay run out, at the next reconcile: seconds
    # here, not the defaults' minute and a half after the cap is lifted.
    env = {
        "GENQ_RAY_NUM_CPUS": "2",
        "GENQ_HELD_RECHECK_S": "2",
        "GENQ_REPUBLISH_AFTER_S": "2",
        "GENQ_RECONCILE_INTERVAL_S": "1",
    }
    with running_stack(
        tmp_path_factory.mktemp("openai") / "var", env, check_leftovers=False
    ) as proc:
        # The LM learns from a short upload, not the built-in `pydocs` (parsing the stdlib's
        # docstrings costs a fresh trainer ~3 CPU-s); four steps learn little from either.
        text = ("def add(a, b):\n    return a + b\n\nThe quick brown fox. " * 100).encode()
        files = {"file": ("lm.txt", text, "text/plain")}
        form = {"name": "lm-text", "kind": "text"}
        assert proc.call("POST", "/v1/datasets", data=form, files=files).status_code == 201
        # Both train at once (a CPU slot each), not one after the other.
        trainings = (("charlm", "lm", "lm-text", LM), ("ddpm", "digits", "digits", DDPM))
        jobs = [
            proc.submit({"kind": "train", "family": f, "dataset": d, "name": n, "params": p})["id"]
            for f, n, d, p in trainings
        ]
        for job_id in jobs:
            done = proc.wait(job_id)
            assert done["state"] == "succeeded", done
        yield proc


def _oa(stack: StackProcess, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{stack.url}/openai/v1", api_key=key or stack.admin_key, max_retries=0
    )


def _tenant_key(stack: StackProcess, tenant: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "stack.cli", "keys", "create", "--tenant", tenant],
        env=stack.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip()


def test_models_chat_and_completions(stack: StackProcess) -> None:
    client = _oa(stack)
    ids = {m.id for m in client.models.list()}
    assert {"lm", "lm:1", "digits", "digits:1", "echo"} <= ids
    assert client.models.retrieve("lm:1").id == "lm:1"

    raw = client.chat.completions.with_raw_response.create(
        model="lm",
        messages=[{"role": "user", "content": "def "}],
        max_tokens=12,
        seed=5,
        n=2,
        temperature=0.8,
        extra_body={"top_k": 20, "an_unknown_field": 1},
    )
    chat = raw.parse()
    assert [c.index for c in chat.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in chat.choices)
    assert chat.usage.completion_tokens == 24
    assert chat.usage.prompt_tokens == len(b"user: def \nassistant: ")
    job_ids = raw.headers["X-Genq-Job-Id"].split(", ")
    assert len(job_ids) == 2
    for job_id, choice in zip(job_ids, chat.choices, strict=True):
        job = stack.call("GET", f"/v1/jobs/{job_id}").json()
        assert job["state"] == "succeeded" and job["params"]["top_k"] == 20
        text = stack.call("GET", job["outputs"][0]["url"]).content.decode()
        assert text == choice.message.content

    first = client.completions.create(model="lm:1", prompt="The ", max_tokens=16, seed=3)
    again = client.completions.create(model="lm:1", prompt="The ", max_tokens=16, seed=3)
    assert first.choices[0].text == again.choices[0].text, "the same seed gives the same text"
    stop = first.choices[0].text[4:6]
    cut = client.completions.create(
        model="lm:1", prompt="The ", max_tokens=16, seed=3, stop=[stop], echo=True
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == "The " + first.choices[0].text[: first.choices[0].text.find(stop)]

    # Streamed with the client's own iterator: the same text, then the usage.
    stream = client.completions.create(
        model="lm:1",
        prompt="The ",
        max_tokens=16,
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == first.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16
    chat_stream = client.chat.completions.create(
        model="lm", messages=[{"role": "user", "content": "x"}], max_tokens=8, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in chat_stream if c.choices]
    assert len("".join(pieces).encode()) >= 1


def test_images_in_both_formats(stack: StackProcess) -> None:
    client = _oa(stack)
    urls = client.images.generate(model="digits", prompt="7", n=2, extra_body={"steps": 4})
    assert len(urls.data) == 2
    for image in urls.data:
        assert image.url is not None and image.url.startswith(f"{stack.url}/v1/artifacts/")
        png = stack.call("GET", image.url.removeprefix(stack.url)).content
        assert Image.open(io.BytesIO(png)).size == (16, 16)
    b64 = client.images.generate(
        model="digits",
        prompt="3",
        response_format="b64_json",
        size="16x16",
        extra_body={"steps": 2},
    )
    (only,) = b64.data
    assert Image.open(io.BytesIO(base64.b64decode(only.b64_json or ""))).size == (16, 16)


def test_errors_are_the_clients_own_exceptions(stack: StackProcess) -> None:
    client = _oa(stack)
    with pytest.raises(openai.AuthenticationError):
        _oa(stack, key="not-a-key").models.list()
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-model", prompt="x")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="lm", prompt="x", temperature=50)
    assert bad.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as wrong:
        client.images.generate(model="digits", prompt="a cat")
    assert wrong.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as size:
        client.images.generate(model="digits", prompt="1", size="1024x1024")
    assert size.value.param == "size"

    # The tenant held at zero running jobs: the call times out naming its job, which waits on.
    key = _tenant_key(stack, ADMIN_TENANT)  # a plain key of the tenant that trained the models
    held = f"/v1/tenants/{ADMIN_TENANT}"
    assert stack.call("PATCH", held, json={"max_running": 0}).status_code == 200
    with pytest.raises(openai.APIStatusError) as timeout:
        _oa(stack, key).completions.create(
            model="lm", prompt="x", max_tokens=2, extra_body={"wait_s": 1}
        )
    assert timeout.value.status_code == 504
    (job_id,) = timeout.value.response.headers["X-Genq-Job-Id"].split(", ")
    assert job_id in timeout.value.message
    assert stack.call("GET", f"/v1/jobs/{job_id}", key).json()["state"] == "queued"

    # Its queue is full: a 429 with Retry-After, the client's RateLimitError.
    assert stack.call("PATCH", held, json={"max_queued": 1}).status_code == 200
    with pytest.raises(openai.RateLimitError) as limited:
        _oa(stack, key).completions.create(model="lm", prompt="x", max_tokens=2)
    assert limited.value.response.headers["Retry-After"].isdigit()
    change = {"max_running": None, "max_queued": None}
    assert stack.call("PATCH", held, json=change).status_code == 200
    assert stack.wait(job_id, key=key)["state"] == "succeeded"


def test_prefer_wait_and_batches(stack: StackProcess) -> None:
    body = {"kind": "generate", "model": "echo", "params": {"message": "sync"}}
    waited = stack.call("POST", "/v1/jobs", json=body, headers={"Prefer": "wait=60"})
    assert waited.status_code == 200, waited.text
    assert waited.json()["state"] == "succeeded"
    assert waited.headers["Preference-Applied"] == "wait=60"
    bad = stack.call("POST", "/v1/jobs", json=body, headers={"Prefer": "wait=soon"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "Prefer"

    jobs = [body, {**body, "params": {"delay_s": -1}}, {**body, "model": "missing"}]
    refused = stack.call("POST", "/v1/batches", json={"jobs": jobs})
    assert refused.status_code == 422
    fields = [e["field"] for e in refused.json()["errors"]]
    assert fields == ["jobs.1.params.delay_s", "jobs.2.model"]

    good = {"jobs": [body, body, {**body, "params": {"message": "third"}}]}
    headers = {"Idempotency-Key": "batch-1"}
    created = stack.call("POST", "/v1/batches", json=good, headers=headers)
    assert created.status_code == 202, created.text
    batch = created.json()
    assert len({j["id"] for j in batch["jobs"]}) == 3
    replay = stack.call("POST", "/v1/batches", json=good, headers=headers)
    assert replay.status_code == 200 and replay.json()["id"] == batch["id"]
    listed = stack.call("GET", f"/v1/jobs?batch={batch['id']}").json()["items"]
    assert {j["id"] for j in listed} == {j["id"] for j in batch["jobs"]}
    assert [j["batch"] for j in batch["jobs"]] == [
        {"id": batch["id"], "item": str(i)} for i in range(3)
    ]
    for job in batch["jobs"]:
        assert stack.wait(job["id"])["state"] == "succeeded"
    counts = stack.call("GET", f"/v1/batches/{batch['id']}").json()["counts"]
    assert counts["succeeded"] == 3


def _snippets(page: str) -> list[str]:
    guide = (ROOT / "docs" / page).read_text()
    return re.findall(r"```python\n(.*?)```", guide, re.S)


@pytest.mark.parametrize("section", ["python-client.md", "openai.md"])
def test_readme_snippets_run(
    stack: StackProcess, section: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("GENQ_URL", stack.url)
    monkeypatch.setenv("GENQ_API_KEY", stack.admin_key)
    monkeypatch.chdir(tmp_path)
    snippets = _snippets(section)
    assert snippets, f"no python snippets under {section}"
    scope: dict[str, object] = {}
    for code in snippets:
        exec(compile(code, f"docs/{section}", "exec"), scope)  # noqa: S102


def test_python_client(
    stack: StackProcess, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    from genq_client import AsyncClient, Client, InvalidInput, JobFailed, NotFound

    with Client(stack.url, stack.admin_key) as genq:
        job = genq.submit(model="echo", params={"message": "hi", "progress_steps": 2}, wait_s=60)
        assert job.state == "succeeded"
        assert genq.download(job.outputs[0]) == b"hi"
        events = list(genq.events(job.id))
        assert events[-1].type == "state" and events[-1].data["to"] == "succeeded"
        resumed = list(genq.events(job.id, last_event_id=events[0].id))
        assert resumed == events[1:]
        with pytest.raises(NotFound):
            genq.get_job("00000000-0000-0000-0000-000000000000")
        with pytest.raises(InvalidInput) as invalid:
            genq.submit(model="echo", params={"delay_s": -1})
        assert invalid.value.errors[0]["field"] == "params.delay_s"
        with pytest.raises(JobFailed):
            genq.wait(genq.submit(model="echo", params={"fail": True}))
        text = Path("fox.txt")
        text.write_text("The quick brown fox. " * 20)
        uploaded = genq.upload_dataset("fox", "text", text)
        assert uploaded.kind == "text" and "fox" in [d.name for d in genq.list_datasets()]
        assert {"lm", "digits", "echo"} <= {m.name for m in genq.list_models()}
        batch = genq.submit_batch([{"kind": "generate", "model": "echo"}] * 3)
        seen = list(genq.iter_jobs(batch=batch.id, page_size=2))
        assert sorted(j.id for j in seen) == sorted(j.id for j in batch.jobs)

    async def run() -> str:
        async with AsyncClient(stack.url, stack.admin_key) as aio:
            job = await aio.submit(model="echo", params={"message": "async"})
            done = await aio.wait(job)
            return (await aio.download(done.outputs[0])).decode()

    assert asyncio.run(run()) == "async"


def _batch_file(client: openai.OpenAI, lines: list[dict[str, object]]) -> str:
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    return client.files.create(file=("in.jsonl", data), purpose="batch").id


def _line(custom_id: str, prompt: str, **body: object) -> dict[str, object]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": "lm", "prompt": prompt, "max_tokens": 6, "seed": 1, **body},
    }


def test_openai_batch_files(stack: StackProcess) -> None:
    client = _oa(stack)
    bad = _batch_file(client, [_line("a", "x"), _line("b", "y", temperature=99), _line("a", "z")])
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(
            input_file_id=bad, endpoint="/v1/completions", completion_window="24h"
        )
    assert "line 2: temperature" in refused.value.message
    assert "line 3: custom_id" in refused.value.message

    good = _batch_file(client, [_line(f"req-{i}", f"{i} ") for i in range(3)])
    batch = client.batches.create(
        input_file_id=good, endpoint="/v1/completions", completion_window="24h"
    )
    assert batch.request_counts is not None and batch.request_counts.total == 3
    jobs = stack.call("GET", f"/v1/jobs?batch={batch.id}").json()["items"]
    assert sorted(j["batch"]["item"] for j in jobs) == ["req-0", "req-1", "req-2"]
    for job in jobs:
        assert stack.wait(job["id"])["state"] == "succeeded"
    done = client.batches.retrieve(batch.id)
    assert done.status == "completed" and done.output_file_id and not done.error_file_id
    lines = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in lines) == ["req-0", "req-1", "req-2"]
    single = client.completions.create(model="lm", prompt="1 ", max_tokens=6, seed=1)
    (one,) = [x for x in lines if x["custom_id"] == "req-1"]
    assert one["response"]["body"]["choices"][0]["text"] == single.choices[0].text
    assert batch.id in [b.id for b in client.batches.list()]

    # Canceled while its tenant may run nothing: every line ends in the error file.
    held = f"/v1/tenants/{ADMIN_TENANT}"
    assert stack.call("PATCH", held, json={"max_running": 0}).status_code == 200
    try:
        stuck = client.batches.create(
            input_file_id=good, endpoint="/v1/completions", completion_window="24h"
        )
        canceled = client.batches.cancel(stuck.id)
    finally:
        assert stack.call("PATCH", held, json={"max_running": None}).status_code == 200
    assert canceled.status == "cancelled" and canceled.error_file_id
    errors = client.files.content(canceled.error_file_id).text.splitlines()
    assert len(errors) == 3 and all(json.loads(x)["error"] for x in errors)
