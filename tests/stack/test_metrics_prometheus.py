"""A real Prometheus (Debian's /usr/bin/prometheus) scrapes a real `genq up` (two gunicorn
workers, so the per-process figures go through the multi-process mode) every second with the
scrape token, and PromQL over its HTTP API answers what the stack did: the echo jobs that
succeeded, a queue depth that rose while a tenant's jobs were held and fell once they could
run, the queue-wait histogram's count, and the API's requests summed over both workers."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from core.settings import Settings
from scheduler.broker import make_celery
from tests.support.stackproc import StackProcess, free_port, running_stack

pytestmark = pytest.mark.stack

PROMETHEUS = "/usr/bin/prometheus"
TOKEN = "prometheus-scrape-token-0123"
DEADLINE_S = 180


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    base = tmp_path_factory.mktemp("stack")
    env = {
        "GENQ_RAY_NUM_CPUS": "2",
        "GENQ_API_WORKERS": "2",
        "GENQ_METRICS_TOKEN": TOKEN,
        # Every scrape reads SQL afresh: each figure below is awaited as soon as it changes,
        # not up to the default 5 s cache later (the cache is tests/api/test_metrics.py's).
        "GENQ_METRICS_CACHE_S": "0",
    }
    with running_stack(base / "var", env) as proc:
        yield proc


@pytest.fixture(scope="module")
def prometheus(stack: StackProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if shutil.which(PROMETHEUS) is None:
        pytest.fail(f"{PROMETHEUS} is missing: apt-get install prometheus (.ci/run does)")
    base = tmp_path_factory.mktemp("prometheus")
    config = base / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: genq\n"
        "    metrics_path: /metrics\n"
        "    authorization:\n"
        f"      credentials: {TOKEN}\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{stack.port}']\n"
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(base / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={base / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):  # not up, or slow to answer
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(Path(base / "prometheus.log").read_text()[-3000:])
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def query(prometheus: str, promql: str) -> float | None:
    """The value of an instant PromQL query that answers one sample, or None."""
    body = requests.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert body["status"] == "success", body
    result = body["data"]["result"]
    if not result:
        return None
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def wait_for(prometheus: str, promql: str, expected: float) -> None:
    """Poll the query until it answers `expected` (Prometheus scrapes every second)."""
    deadline = time.monotonic() + DEADLINE_S
    last: Any = None
    while time.monotonic() < deadline:
        last = query(prometheus, promql)
        if last == expected:
            return
        time.sleep(0.5)
    raise AssertionError(f"{promql} = {last}, expected {expected}")


def test_prometheus_sees_what_the_stack_did(stack: StackProcess, prometheus: str) -> None:
    wait_for(prometheus, 'up{job="genq"}', 1)
    celery = make_celery(Settings(_env_file=None, var_dir=stack.var_dir))  # type: ignore[call-arg]

    # No worker consumes the generate queue: jobs submitted now wait, and the depth rises.
    # The stack runs one Celery worker: its reply ends the broadcast (without `limit` it
    # would wait out the whole timeout for replies that cannot come).
    stopped = celery.control.cancel_consumer("generate", reply=True, timeout=10, limit=1)
    assert stopped, "no worker answered: the consumer was not stopped"
    echo = {"kind": "generate", "model": "echo"}
    waiting = [stack.submit({**echo, "params": {"message": f"w{i}"}})["id"] for i in range(3)]
    depth = 'sum(genq_queue_depth{queue="generate"}) or vector(0)'
    wait_for(prometheus, depth, 3)
    assert {stack.call("GET", f"/v1/jobs/{j}").json()["state"] for j in waiting} == {"queued"}

    # The worker consumes again: the jobs run and the depth falls back to zero.
    started = celery.control.add_consumer("generate", reply=True, timeout=10, limit=1)
    assert started, "no worker answered: the consumer was not started"
    for job_id in waiting:
        assert stack.wait(job_id)["state"] == "succeeded"
    wait_for(prometheus, depth, 0)
    assert query(prometheus, f"max_over_time(({depth})[10m:1s])") == 3

    # Two more echo jobs, one of another tenant.
    made = stack.call("POST", "/v1/keys", json={"tenant": "other"})
    assert made.status_code == 201, made.text
    other_key = made.json()["key"]
    more = [stack.submit({**echo, "params": {"message": "m"}}),
            stack.submit({**echo, "params": {"message": "o"}}, key=other_key)]  # fmt: skip
    for job, key in zip(more, (None, other_key), strict=True):
        assert stack.wait(job["id"], key=key)["state"] == "succeeded"

    succeeded = 'sum(genq_jobs_finished_total{kind="generate",family="echo",state="succeeded"})'
    wait_for(prometheus, succeeded, 5)
    wait_for(prometheus, 'sum(genq_jobs_finished_total{tenant="other"})', 1)
    wait_for(prometheus, 'sum(genq_job_queue_wait_seconds_count{family="echo"})', 5)
    wait_for(prometheus, 'sum(genq_job_queue_wait_seconds_bucket{family="echo",le="+Inf"})', 5)
    assert (query(prometheus, 'sum(genq_job_queue_wait_seconds_sum{family="echo"})') or 0) > 0
    # Five submissions, answered by either gunicorn worker, counted once each.
    posts = 'sum(genq_http_requests_total{route="/v1/jobs",method="POST",status="202"})'
    wait_for(prometheus, posts, 5)
    wait_for(prometheus, "genq_workers", 1)
