"""The dashboard's models page and overview: each model's replicas (node, GPU, jobs in hand,
batch sizes, load time) as a worker's snapshot reports the model pool, its queue, the scale
events, and the replica policy form (validated field by field, audited)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient
from sqlalchemy import select

from core.db import Database
from core.tables import AuditEntry, Model
from scheduler.snapshot import SNAPSHOT_KEY
from tests.support.api import (
    Keys,
    echo,
    submit,
)
from tests.support.dashboard import login


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"secret_key": "test-secret-key-for-dashboards"}


def report_pool(client: redis.Redis, model_id: str) -> None:
    """A worker's snapshot (scheduler/snapshot.py) with the pool's view of two replicas."""
    replica = {
        "model_id": model_id,
        "family": "echo",
        "num_gpus": 0.25,
        "memory_gb": 2.0,
        "idle_s": 0.5,
        "started_at": time.time(),
        "ready": True,
        "waiting": "",
        "load_s": 1.25,
        "batching": {"last_batch_jobs": 3, "largest_batch_jobs": 7},
    }
    pool = {
        "servers": [
            {
                **replica,
                "replica": f"model-{model_id}",
                "node_id": "n1",
                "node_ip": "10.0.0.1",
                "gpu_ids": ["0"],
                "in_hand": 2,
            },
            {
                **replica,
                "replica": f"model-{model_id}@2",
                "node_id": "n2",
                "node_ip": "10.0.0.2",
                "gpu_ids": ["1"],
                "in_hand": 1,
            },
        ],
        "models": {
            model_id: {
                "policy": {"min_replicas": 0, "max_replicas": 4, "target_jobs_per_replica": 2.0},
                "desired": 2,
                "replicas": 2,
            }
        },
        "events": [
            {
                "model_id": model_id,
                "event": "scale-up",
                "replica": f"model-{model_id}@2",
                "reason": "1 replicas for the queue; wanted 2",
                "replicas": 2,
                "at": time.time(),
            }
        ],
        "evictions": [],
        "waiting": {},
    }
    snapshot = {
        "hostname": "celery@gpu-box",
        "pid": 1,
        "concurrency": 8,
        "active_job_ids": [],
        "ray": {
            "connected": True,
            "pool": pool,
            "nodes": [],
            "cluster_resources": {},
            "available_resources": {},
            "model_servers": [],
        },
        "taken_at": time.time(),
    }
    client.set(SNAPSHOT_KEY.format(hostname="celery@gpu-box"), json.dumps(snapshot), ex=60)


def test_models_page_shows_replicas_queue_and_events_and_sets_the_policy(
    client: FlaskClient, keys: Keys, database: Database, broker: redis.Redis
) -> None:
    with database.transaction() as session:
        echo_id = session.scalar(select(Model.id).where(Model.name == "echo"))
    assert echo_id is not None
    report_pool(broker, echo_id)
    for _ in range(3):
        assert submit(client, keys.acme, echo()).status_code == 202
    token = login(client, keys.admin)
    page = client.get("/admin/models").get_data(as_text=True)
    assert "3 queued · 0 running" in page
    assert "10.0.0.2" in page and "2 in hand" in page and "batch 3 (max 7)" in page
    assert "loaded in 1.2 s" in page or "loaded in 1.3 s" in page
    assert "scale-up" in page and "wanted 2" in page
    overview = client.get("/admin/").get_data(as_text=True)
    assert "Replicas per model" in overview and "2 (2)" in overview

    path = f"/admin/models/{echo_id}/scaling"
    for field, bad in (("max_replicas", "0"), ("min_replicas", "x"), ("idle_unload_s", "-3")):
        response = client.post(path, data={"csrf_token": token, field: bad})
        assert response.status_code == 422, (field, bad)
        assert field in response.get_data(as_text=True)
    done = client.post(path, data={"csrf_token": token, "max_replicas": "3", "idle_unload_s": "60"})
    assert done.status_code == 302
    with database.transaction() as session:
        assert session.get(Model, echo_id).serving == {"max_replicas": 3, "idle_unload_s": 60.0}
        [entry] = session.scalars(select(AuditEntry).where(AuditEntry.action == "model.scaling"))
        assert entry.detail["via"] == "dashboard" and entry.detail["to"]["max_replicas"] == 3
    assert 'value="3"' in client.get("/admin/models").get_data(as_text=True)
