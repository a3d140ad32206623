"""What a training job asks of its node (`resources`): validated at submit, refused when no
node of the cluster the workers last reported could hold it, and stored on the job."""

from __future__ import annotations

import json
import time

import redis
from flask.testing import FlaskClient

from scheduler.snapshot import SNAPSHOT_KEY
from tests.support.api import (
    Keys,
    assert_problem,
    echo,
    submit,
)

TRAIN = {
    "kind": "train",
    "family": "ddpm",
    "dataset": "digits",
    "name": "sized",
    "params": {"preset": "tiny", "steps": 4},
}


def report_cluster(client: redis.Redis, nodes: list[dict[str, float]]) -> None:
    """Write a worker's cluster snapshot as scheduler/snapshot.py's SnapshotWriter does."""
    snapshot = {
        "hostname": "gpu-box",
        "pid": 1,
        "concurrency": 8,
        "active_job_ids": [],
        "ray": {
            "connected": True,
            "nodes": [
                {"node_id": f"n{i}", "address": "10.0.0.1", "alive": True, "resources": r}
                for i, r in enumerate(nodes)
            ],
            "cluster_resources": {},
            "available_resources": {},
            "model_servers": [],
        },
        "taken_at": time.time(),
    }
    client.set(SNAPSHOT_KEY.format(hostname="gpu-box"), json.dumps(snapshot), ex=60)


def fields(body: dict) -> list[str]:
    return [e["field"] for e in body["errors"]]


def test_resources_are_stored_and_shown(client: FlaskClient, keys: Keys) -> None:
    response = submit(client, keys.acme, {**TRAIN, "resources": {"num_gpus": 0.5}})
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["resources"] == {"num_gpus": 0.5, "gpu_memory_gb": None}
    # Without a request, the family's own need (ddpm: a quarter of a GPU, where there are GPUs).
    plain = submit(client, keys.acme, TRAIN).get_json()
    assert plain["resources"] == {"num_gpus": 0.25, "gpu_memory_gb": None}


def test_bad_resources_name_the_field(client: FlaskClient, keys: Keys) -> None:
    cases = [
        ({"num_gpus": 1.5}, "resources.num_gpus"),
        ({"num_gpus": -1}, "resources.num_gpus"),
        ({"gpu_memory_gb": 0}, "resources.gpu_memory_gb"),
        ({"gpus": 1}, "resources.gpus"),
    ]
    for resources, field in cases:
        body = assert_problem(submit(client, keys.acme, {**TRAIN, "resources": resources}), 422)
        assert fields(body) == [field], (resources, body)
    body = assert_problem(
        submit(client, keys.acme, {**echo(message="x"), "resources": {"num_gpus": 1}}), 422
    )
    assert fields(body) == ["resources"]
    assert "warm server" in body["errors"][0]["message"]


def test_a_request_no_node_can_hold_is_refused(
    client: FlaskClient, keys: Keys, broker: redis.Redis
) -> None:
    report_cluster(broker, [{"CPU": 16, "GPU": 2}, {"CPU": 8, "GPU": 1, "gpu_memory_gb": 80}])
    body = assert_problem(submit(client, keys.acme, {**TRAIN, "resources": {"num_gpus": 4}}), 422)
    assert fields(body) == ["resources.num_gpus"]
    assert "the most on one node: 2" in body["errors"][0]["message"]
    too_big = {"num_gpus": 1, "gpu_memory_gb": 141}
    body = assert_problem(submit(client, keys.acme, {**TRAIN, "resources": too_big}), 422)
    assert fields(body) == ["resources.gpu_memory_gb"]

    fits = submit(client, keys.acme, {**TRAIN, "resources": {"num_gpus": 2}})
    assert fits.status_code == 202
    fits = submit(client, keys.acme, {**TRAIN, "resources": {"gpu_memory_gb": 40}})
    assert fits.status_code == 202
    assert fits.get_json()["resources"] == {"num_gpus": 0.25, "gpu_memory_gb": 40.0}
