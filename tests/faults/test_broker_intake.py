"""Broker messages are untrusted input (scheduler/intake.py): every malformed shape on a genq
queue is dropped, acknowledged and counted, and the real `genq worker` subprocess keeps
consuming, also when the messages wait in a persistent Redis across a worker restart.

The embedded-Redis case (`genq up`) is in tests/stack/test_hostile.py.
"""

from __future__ import annotations

import json
import signal

import pytest

from scheduler.broker import DROPPED_KEY, RUN_JOB_TASK, read_dropped
from scheduler.intake import describe_envelope, describe_task
from tests.support.broker import HOSTILE, envelope, task_headers
from tests.support.faults import Cluster, is_alive, wait_until

GENERATE = {"kind": "generate", "model": "echo", "params": {"message": "after"}}


def push_hostile(cluster: Cluster) -> dict[str, int]:
    """Put every hostile shape on the generate list (and one unknown job id through Celery
    itself); returns the counts expected by reason."""
    expected: dict[str, int] = {}
    for _, raw, reason in HOSTILE:
        cluster.broker.lpush("generate", raw)
        expected[reason] = expected.get(reason, 0) + 1
    cluster.publisher.celery.send_task(RUN_JOB_TASK, args=["no-such-job"], queue="generate")
    expected["unknown_job"] = 1
    return expected


def dropped(cluster: Cluster) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in cluster.broker.hgetall(DROPPED_KEY).items()}


def test_each_shape_is_named_by_the_checks() -> None:
    """The pure checks say what is wrong with each shape (and nothing about a good one)."""
    assert describe_envelope(5) == "not a message envelope (a JSON int)"
    assert describe_envelope({"properties": []}) == "envelope without properties"
    good = json.loads(envelope(b'[["j1"], {}, {}]', task_headers()))
    assert describe_envelope(good) is None
    assert describe_task(task_headers(), "application/json", b'[["j1"], {}, {}]') is None
    assert "not [args" in str(describe_task(task_headers(), "application/json", b"5"))
    assert "unknown task" in str(describe_task(task_headers("x"), "application/json", b"[]"))
    assert "one id string" in str(describe_task(task_headers(), "application/json", b"[[],{},{}]"))
    assert "keyword" in str(
        describe_task(task_headers(), "application/json", b'[["j"], {"a": 1}, {}]')
    )


@pytest.mark.stack
@pytest.mark.faults
@pytest.mark.parametrize("backend", ["sqlite"])
def test_hostile_messages_are_dropped_and_the_worker_keeps_consuming(cluster: Cluster) -> None:
    worker = cluster.worker()
    expected = push_hostile(cluster)
    wait_until(lambda: dropped(cluster) == expected, 60, f"drops {expected}: {dropped(cluster)}")
    assert is_alive(worker.pid), worker.text()[-3000:]
    # The worker still runs jobs, and nothing it dropped waits to be restored.
    job = cluster.wait(cluster.submit(GENERATE))
    assert job["state"] == "succeeded", job
    assert cluster.broker.hlen("unacked") == 0
    assert cluster.broker.llen("generate") == 0
    text = worker.text()
    assert "dropped a broker message" in text
    assert "Unrecoverable error" not in text
    # The admin sees them.
    response = cluster.client.get("/v1/admin/dropped-messages", headers=cluster.auth())
    assert response.status_code == 200
    body = response.get_json()
    assert body["total"] == sum(expected.values())
    assert body["by_reason"] == expected
    assert len(body["recent"]) == sum(expected.values())
    assert read_dropped(cluster.broker)["total"] == body["total"]
    # And on the dashboard's overview.
    with cluster.app.test_client() as browser:
        page = browser.get("/admin/login").get_data(as_text=True)
        token = page.split('name="csrf_token" value="')[1].split('"')[0]
        browser.post("/admin/login", data={"key": cluster.admin_key, "csrf_token": token})
        overview = browser.get("/admin/").get_data(as_text=True)
    assert f"Malformed broker messages dropped: <strong>{body['total']}</strong>" in overview


@pytest.mark.stack
@pytest.mark.faults
@pytest.mark.parametrize("backend", ["sqlite"])
def test_hostile_messages_in_a_persistent_redis_survive_no_worker_restart(
    cluster: Cluster,
) -> None:
    """The messages wait in Redis before any worker runs; the first worker drops them, is
    killed, and the next one finds nothing restored and runs a job."""
    expected = push_hostile(cluster)
    first = cluster.worker()
    wait_until(lambda: dropped(cluster) == expected, 60, f"drops {expected}: {dropped(cluster)}")
    # Nothing left for a restore to bring back. The unknown job's message is a real genq task,
    # acknowledged when the task returns, just after it counted the drop (scheduler/worker.py):
    # the kill comes once that acknowledgement has happened, not in between.
    wait_until(lambda: cluster.broker.hlen("unacked") == 0, 30, "the drops acknowledged")
    assert is_alive(first.pid)
    cluster.kill(first, signal.SIGKILL)
    second = cluster.worker()
    job = cluster.wait(cluster.submit(GENERATE))
    assert job["state"] == "succeeded", job
    assert is_alive(second.pid)
    assert dropped(cluster) == expected  # none of them came back to the second worker
