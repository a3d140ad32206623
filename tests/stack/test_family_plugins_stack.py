"""The example plug-in family (`examples/genq-family-ngram`, installed in the test environment)
through a real `genq up` (SQLite, embedded Redis, Celery, local Ray, gunicorn), next to broken
plug-ins that must not stop it: it is listed in `/v1/families` and on the dashboard, trains on
the built-in `pydocs`, generates, batches several generate jobs on one warm server, and a
cancel takes one job out of its batch while the others finish."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.stackproc import StackProcess, running_stack

pytestmark = pytest.mark.stack

BATCH = 4
# The lengths of the batch's other jobs (the victim asks for 4,096 bytes): long enough that they
# still run when the cancel lands.
SHORT = 2048


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, plugin_site: Callable[[list[str]], Path]
) -> Iterator[StackProcess]:
    site = plugin_site(["crashes", "future"])
    env = {
        "GENQ_RAY_NUM_CPUS": "2",
        # Jobs submitted together wait for each other this long to share a batch.
        "GENQ_BATCH_MAX_WAIT_MS": "3000",
        "PYTHONPATH": str(site),
    }
    with running_stack(
        tmp_path_factory.mktemp("plugins") / "var", env, check_leftovers=False
    ) as proc:
        yield proc


def test_families_lists_the_plugin_and_the_broken_ones(stack: StackProcess) -> None:
    items = {f["name"]: f for f in stack.call("GET", "/v1/families").json()["items"]}
    ngram = items["ngram"]
    assert ngram["status"] == "ok" and ngram["source"] == "genq-family-ngram 0.1.0"
    assert ngram["kinds"] == ["generate", "train"] and ngram["api_version"] == 1
    assert ngram["params"]["generate"]["properties"]["max_tokens"]["maximum"] == 4096
    assert items["echo"]["source"] == "genq (built in)"
    crashes, future = items["crashes"], items["future"]
    assert crashes["status"] == "broken" and crashes["source"] == "genq-test-plugins 1.0"
    assert crashes["error"] == "ImportError: libfoo.so.1: cannot open shared object file"
    assert "written for family interface 99" in future["error"]
    assert "model family 'crashes' from genq-test-plugins 1.0 is not loaded" in stack.log_text()
    # A job naming a broken family is refused with the reason, naming the field.
    body = {"kind": "train", "family": "crashes", "dataset": "pydocs", "name": "x", "params": {}}
    refused = stack.call("POST", "/v1/jobs", json=body)
    assert refused.status_code == 422
    (error,) = [e for e in refused.json()["errors"] if e["field"] == "family"]
    assert "is broken: ImportError: libfoo" in error["message"]
    # The dashboard's models page shows them.
    page = stack.session.get(stack.url + "/admin/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token
    login = stack.session.post(
        stack.url + "/admin/login", data={"key": stack.admin_key, "csrf_token": token.group(1)}
    )
    assert login.status_code == 200, login.text[-500:]
    html = stack.session.get(stack.url + "/admin/models").text
    assert 'id="family-ngram"' in html and "genq-family-ngram 0.1.0" in html
    row = html[html.index('id="family-crashes"') :].split("</tr>")[0]
    assert "broken" in row and "libfoo.so.1" in row


def test_train_generate_batch_and_cancel_the_plugin_family(stack: StackProcess) -> None:
    # Wide enough that generating the victim's 4,096 bytes takes seconds (1.4 ms a step alone
    # on this 2-core machine, against 0.26 for the default width), far longer than a cancel
    # takes to reach the server: the cancel lands mid-generation.
    shape = {"context": 16, "embedding": 64, "hidden": 2048}
    params = {"steps": 30, "batch_size": 32, "checkpoint_every": 10, "seed": 2, **shape}
    train = {
        "kind": "train",
        "family": "ngram",
        "dataset": "pydocs",
        "name": "ng",
        "params": params,
    }
    done = stack.wait(stack.submit(train)["id"])
    assert done["state"] == "succeeded", done
    assert done["result_model"] == "ng:1" and "bits_per_char" in done["metrics"]

    first = stack.wait(stack.submit(_generate(16, seed=1))["id"])  # warms the server
    assert first["state"] == "succeeded", first
    text = stack.call("GET", first["outputs"][0]["url"]).content.decode()
    assert len(text.encode()) >= 1 and first["progress"]["step"] == first["progress"]["total"]

    # Several jobs at once share one batch; the one canceled mid-batch stops alone. The others
    # are shorter, so they finish without waiting for the victim to be stopped.
    lengths = [SHORT, 4096] + [SHORT] * (BATCH - 2)
    ids = [stack.submit(_generate(n, seed=10 + i))["id"] for i, n in enumerate(lengths)]
    victim = ids[1]
    deadline = time.monotonic() + 120
    # The job's progress events straight from SQL: a poll may be up to a second old
    # (GENQ_STATUS_STALENESS_S), long enough for the whole generation to end.
    while True:
        steps = [d["step"] for kind, d, _ in stack.events(victim) if kind == "progress"]
        if any(0 < step < 4096 for step in steps):
            break
        job = stack.call("GET", f"/v1/jobs/{victim}").json()
        assert job["state"] in ("queued", "running"), job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    canceled = stack.call("POST", f"/v1/jobs/{victim}/cancel")
    assert canceled.status_code == 202, canceled.text
    finished = {i: stack.wait(i) for i in ids}
    assert finished[victim]["state"] == "canceled", finished[victim]
    assert finished[victim]["progress"]["step"] < 4096
    for job_id in ids:
        if job_id == victim:
            continue
        job = finished[job_id]
        assert job["state"] == "succeeded", job
        assert job["metrics"]["batch_jobs"] == BATCH, job["metrics"]
        assert job["progress"] == {"step": SHORT, "total": SHORT, "message": "tokens"}
        (output,) = job["outputs"]
        assert output["meta"]["completion_tokens"] == SHORT


def _generate(max_tokens: int, seed: int) -> dict:
    return {
        "kind": "generate",
        "model": "ng:1",
        "params": {"prompt": "def ", "max_tokens": max_tokens, "seed": seed},
    }
