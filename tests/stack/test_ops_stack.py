"""Health and logs on a real `genq up` (Celery worker, periodic scheduler, local Ray, gunicorn)
with GENQ_LOG_FORMAT=json: readiness is 200 once the worker consumes every queue with Ray
and 503 naming the workers while it is stopped (SIGSTOP: its heartbeat stops); a job submitted
with an X-Request-ID has that id on its JSON log lines in the API, the Celery worker and the
Ray model server that ran it.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.stackproc import StackProcess, json_lines, running_stack
from tests.support.training import tiny_gan_job, tiny_gan_params

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    base = tmp_path_factory.mktemp("ops-stack")
    env = {
        "GENQ_RAY_NUM_CPUS": "2",
        "GENQ_LOG_FORMAT": "json",
        "GENQ_HEALTH_HEARTBEAT_INTERVAL_S": "1",
    }
    with running_stack(base / "var", env) as proc:
        yield proc


def _ready(stack: StackProcess) -> tuple[int, dict[str, Any]]:
    response = stack.call("GET", "/v1/health/ready", key="")
    return response.status_code, dict(response.json())


def _wait_ready(stack: StackProcess, want: int, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status, body = _ready(stack)
        if status == want:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.2)


def _worker_pid(stack: StackProcess) -> int:
    pids = stack.worker_pids()
    assert len(pids) == 1, f"one Celery worker process under genq up, not {pids}"
    return pids.pop()


def test_ready_follows_the_worker(stack: StackProcess) -> None:
    body = _wait_ready(stack, 200)
    parts = body["parts"]
    assert {name: part["status"] for name, part in parts.items()} == dict.fromkeys(
        ("database", "broker", "workers", "ray", "scheduler"), "ok"
    )
    for queue in ("generate", "train", "webhooks"):
        assert parts["workers"]["queues"][queue]["workers"] == 1
    assert parts["ray"]["workers_reaching"] == 1
    assert stack.call("GET", "/v1/health/live", key="").json() == {"status": "alive"}

    worker = _worker_pid(stack)
    os.kill(worker, signal.SIGSTOP)  # the worker hangs: it consumes nothing, writes nothing
    try:
        problem = _wait_ready(stack, 503, timeout_s=60)
        assert problem["type"] == "not-ready"
        assert Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
        assert (
            "workers (generate: no worker, train: no worker, webhooks: no worker)"
            in (problem["detail"])
        )
        assert problem["parts"]["workers"]["status"] == "down"
        assert problem["parts"]["workers"]["age_s"] >= 0  # when it was last seen
        assert problem["parts"]["scheduler"]["status"] == "ok"
    finally:
        os.kill(worker, signal.SIGCONT)
    _wait_ready(stack, 200, timeout_s=60)


def test_a_request_id_joins_the_logs_of_api_worker_and_model_server(stack: StackProcess) -> None:
    _wait_ready(stack, 200)
    started = time.time()
    request_id = f"ops-{uuid.uuid4().hex}"
    job = stack.submit(
        {"kind": "generate", "model": "echo", "params": {"message": "joined"}},
        headers={"X-Request-ID": request_id},
    )
    done = stack.wait(job["id"])
    assert done["state"] == "succeeded", done

    # Unsafe ids are replaced, never echoed or stored.
    bad = stack.call("GET", "/v1/jobs", headers={"X-Request-ID": "x" * 200})
    assert bad.headers["X-Request-ID"] != "x" * 200 and len(bad.headers["X-Request-ID"]) == 32

    def lines_of(process: str) -> list[dict[str, Any]]:
        return [
            line
            for line in stack.log_records()
            if line.get("process") == process and line.get("request_id") == request_id
        ]

    # The API's access line for the submission.
    [access] = [line for line in lines_of("api") if line["logger"] == "genq.access"]
    assert access["message"].startswith("POST /v1/jobs 202")
    # The Celery worker's lines about the job: claimed, finished.
    worker_lines = lines_of("worker")
    messages = [line["message"] for line in worker_lines]
    assert "claimed, attempt 1" in messages and "finished: succeeded" in messages, messages
    for line in worker_lines:
        assert line["job_id"] == job["id"]
        assert line["attempt"] == 1
        assert line["tenant"]
        assert line["node"] and line["level"] and line["time"] and line["logger"]
    # The model server's, in its Ray worker's log (the actor's stderr, which Ray keeps).
    server_lines = _ray_lines(request_id, started, "job done")
    for line in server_lines:
        assert line["process"] == "model-server"
        assert line["job_id"] == job["id"] and line["attempt"] == 1
        assert line["node"] == "127.0.0.1"


def _ray_lines(request_id: str, since: float, last_message: str) -> list[dict[str, Any]]:
    """The JSON lines with `request_id` in the logs of Ray's workers (actors), once one says
    `last_message` (Ray writes an actor's stderr to its session's worker-*.err files)."""
    ray_root = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray"
    deadline = time.monotonic() + 60
    while True:
        found = []
        for path in ray_root.glob("session_*/logs/worker-*.err"):
            if path.stat().st_mtime < since - 5:
                continue
            text = path.read_text(errors="replace")
            if request_id in text:
                found += [line for line in json_lines(text) if line.get("request_id") == request_id]
        messages = [line["message"] for line in found]
        if last_message in messages:
            return found
        assert time.monotonic() < deadline, messages
        time.sleep(0.5)


def test_a_training_jobs_trainer_lines_carry_its_request_id(stack: StackProcess) -> None:
    started = time.time()
    request_id = f"ops-train-{uuid.uuid4().hex}"
    job = stack.submit(
        tiny_gan_job("ops-logs", tiny_gan_params(steps=4)),
        headers={"X-Request-ID": request_id},
    )
    done = stack.wait(job["id"])
    assert done["state"] == "succeeded", done
    lines = _ray_lines(request_id, started, "training attempt done")
    assert {line["process"] for line in lines} == {"trainer"}
    assert all(line["job_id"] == job["id"] and line["attempt"] == 1 for line in lines)
