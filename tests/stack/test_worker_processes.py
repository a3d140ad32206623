"""`genq up` with GENQ_WORKER_PROCESSES=2: two Celery workers, each a process of its own with its
own Ray driver and node name, on one queue. Jobs spread over both and each runs once; readiness
counts both; Ctrl-C stops them (and Ray after them: tests/stack/test_stop_order.py) and leaves
nothing running.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.stackproc import StackProcess, running_stack

pytestmark = pytest.mark.stack

SLOTS = 3  # threads per worker
JOBS = 4 * SLOTS  # more than one worker holds at once: the other must take some


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    env = {
        "GENQ_WORKER_PROCESSES": "2",
        "GENQ_WORKER_CONCURRENCY": str(SLOTS),
        "GENQ_RAY_NUM_CPUS": "2",
        "GENQ_LOG_FORMAT": "json",
    }
    with running_stack(tmp_path_factory.mktemp("workers") / "var", env) as proc:
        yield proc


def claims(stack: StackProcess) -> list[dict[str, object]]:
    """The runner's "claimed" lines of the stack's log (JSON lines: job, attempt, pid)."""
    return [
        record
        for record in stack.log_records()
        if str(record.get("message", "")).startswith("claimed, attempt")
    ]


def test_both_workers_are_ready_under_names_of_their_own(stack: StackProcess) -> None:
    assert len(stack.worker_pids()) == 2
    deadline = time.monotonic() + 60
    while True:
        reply = stack.call("GET", "/v1/health/ready")
        queues = reply.json()["parts"]["workers"].get("queues", {})
        if reply.status_code == 200 and queues["generate"]["workers"] == 2:
            break
        assert time.monotonic() < deadline, reply.text
        time.sleep(0.2)
    # Each writes its own cluster snapshot: the API counts both workers' slots.
    metrics = stack.call("GET", "/metrics").text
    assert f"genq_worker_slots {float(2 * SLOTS)}" in metrics, metrics


def test_jobs_spread_over_both_workers_and_each_runs_once(stack: StackProcess) -> None:
    body = {"kind": "generate", "model": "echo", "params": {"message": "x", "delay_s": 1.5}}
    with ThreadPoolExecutor(8) as pool:
        ids = [job["id"] for job in pool.map(lambda _: stack.submit(body), range(JOBS))]
    for job_id in ids:
        job = stack.wait(job_id)
        assert job["state"] == "succeeded", job
        assert job["attempt"] == 1, job

    lines = [c for c in claims(stack) if c.get("job_id") in ids]
    # Every job claimed once, by one worker or the other; neither ran them all: a worker
    # holds SLOTS at a time, and the jobs came faster than one could finish them.
    assert sorted(str(c["job_id"]) for c in lines) == sorted(ids)
    by_worker = {int(str(c["pid"])) for c in lines}
    assert by_worker == stack.worker_pids(), lines
