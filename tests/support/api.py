"""Helpers of the API tests (tests/api/): settings for an API test, keys, requests, problem
checks, and driving a job through the core services. The fixtures built on them (`settings`,
`database`, `broker`, `app`, `client`, `keys`...) are in tests/api/conftest.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from flask.testing import FlaskClient

from core.artifacts import ArtifactStore
from core.db import Database
from core.events import Log, Metric, Output, Progress
from core.leases import claim_job, finish_job
from core.recording import record_events, record_output
from core.settings import Settings
from core.states import JobState
from core.tables import Base, Job

PROBLEM_JSON = "application/problem+json"
# The two databases every API test runs on (a `settings` fixture's params).
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def make_settings(
    request: pytest.FixtureRequest, tmp_path: Path, redis_url: str, **overrides: Any
) -> Settings:
    """Settings for an API test on a new database of the kind request.param names ("sqlite" or
    "postgres", at the migrations' head: the root conftest's `new_database`) and the test's own
    Redis database. Rate limits are off unless a test turns them on: these tests send bursts
    from one key on purpose (tests/api/test_keys_and_limits.py tests the limits; the stack
    tests run with them on)."""
    new_database: Callable[[str], str] = request.getfixturevalue("new_database")
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        var_dir=tmp_path / "var",
        database_url=new_database(request.param),
        redis_url=redis_url,
        artifact_root=tmp_path / "artifacts",
        **{"rate_limits": False, **overrides},
    )


@dataclass(frozen=True)
class Keys:
    acme: str
    globex: str
    admin: str
    revoked: str
    acme_tenant: str
    globex_tenant: str


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def submit(client: FlaskClient, key: str, body: Any, **headers: str) -> Any:
    return client.post("/v1/jobs", json=body, headers={**bearer(key), **headers})


def echo(**params: Any) -> dict[str, Any]:
    return {"kind": "generate", "model": "echo", "params": params}


def queue_depth(broker: redis.Redis, queue: str) -> int:
    """Messages waiting in `queue`: Celery's Redis transport keeps one list per priority step,
    named `<queue>` for step 0 and `<queue>:<step>` for the others (sep ":")."""
    keys = [queue] + [f"{queue}:{step}" for step in range(1, 10)]
    return sum(int(broker.llen(k)) for k in keys)


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == PROBLEM_JSON
    assert response.headers.get("X-Request-ID")
    body = response.get_json(force=True)
    assert body["status"] == status
    assert {"type", "title", "status", "detail"} <= set(body)
    return dict(body)


def run_job(
    database: Database,
    settings: Settings,
    job_id: str,
    *,
    state: JobState = JobState.SUCCEEDED,
    outputs: dict[str, bytes] | None = None,
    logs: tuple[str, ...] = ("loading", "done"),
) -> None:
    """Drive a queued job to `state` through the core services, the way the scheduler does."""
    store = ArtifactStore(settings.artifacts)
    with database.transaction() as session:
        lease = claim_job(session, job_id, lease_ttl_s=60)
        assert lease is not None
        tenant_id = session.get(Job, job_id).tenant_id  # type: ignore[union-attr]
    with database.transaction() as session:
        record_events(
            session,
            lease,
            [Log(logs[0]), Progress(1, 2, "half way"), Metric(1, {"loss": 0.5})],
        )
    for name, data in (outputs or {}).items():
        stored = store.write_output(tenant_id, job_id, name, data)
        with database.transaction() as session:
            record_output(session, lease, Output(name, "text", "text/plain", data), stored)
    with database.transaction() as session:
        record_events(session, lease, [Log(line) for line in logs[1:]])
    with database.transaction() as session:
        if state == JobState.FAILED:
            finish_job(session, lease, state, error_type="model-error", error_detail="boom")
        else:
            finish_job(session, lease, state, metrics={"loss": 0.25})


def count_rows(database: Database, model: type[Base]) -> int:
    with database.transaction() as session:
        return int(session.scalar(sa.select(sa.func.count()).select_from(model)) or 0)


def parse_sse(text: str) -> list[dict[str, Any]]:
    """The events of a Server-Sent Events body (comments and retry lines skipped)."""
    events = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":") or ":" not in line:
                continue
            name, _, value = line.partition(":")
            fields[name] = value.lstrip(" ")
        if "event" in fields:
            events.append(
                {
                    "id": int(fields["id"]),
                    "event": fields["event"],
                    "data": json.loads(fields["data"]),
                }
            )
    return events
