"""Fixtures and helpers shared by the API tests (imported by each tests/test_api_*.py).

Every test runs against SQLite and PostgreSQL (a schema of its own per test session, so other
suites sharing the database are not disturbed), with a real Redis (a dedicated DB number,
flushed per test) behind a real `Publisher`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from api.app import Genq, create_app
from core.artifacts import ArtifactStore
from core.catalog import ensure_builtins
from core.db import Database, make_engine
from core.events import Log, Metric, Output, Progress
from core.jobs import claim_job, finish_job, record_events, record_output
from core.keys import create_key, get_or_create_tenant, revoke_key
from core.settings import Settings
from core.states import JobState
from core.tables import Base, Job
from scheduler.enqueue import Publisher

# A Redis DB number of the API tests' own, flushed around each test.
REDIS_URL = os.environ.get("GENQ_TEST_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/") + "/11"
PG_URL = os.environ.get("GENQ_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
PROBLEM_JSON = "application/problem+json"


def _with_search_path(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"


@pytest.fixture(scope="session")
def pg_schema() -> Iterator[str | None]:
    """A PostgreSQL schema for this test session, or None when PostgreSQL is unreachable."""
    schema = f"genq_api_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        engine = make_engine(PG_URL)
        with engine.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except sa.exc.OperationalError:
        yield None
        return
    yield schema
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


def make_settings(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    pg_schema: str | None,
    redis_url: str,
    **overrides: Any,
) -> Settings:
    """Settings for an API test on SQLite or on PostgreSQL (request.param), with the calling
    module's own Redis DB. Rate limits are off unless a test turns them on: these tests send
    bursts from one key on purpose (tests/test_ratelimits.py tests the limits; the stack
    tests run with them on)."""
    if request.param == "postgres":
        if pg_schema is None:
            if os.environ.get("CI"):
                pytest.fail(f"PostgreSQL at {PG_URL} is unreachable")
            pytest.skip(f"PostgreSQL at {PG_URL} is unreachable")
        url = _with_search_path(PG_URL, pg_schema)
    else:
        url = f"sqlite:///{tmp_path / 'genq.db'}"
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        var_dir=tmp_path / "var",
        database_url=url,
        redis_url=redis_url,
        artifact_root=tmp_path / "artifacts",
        **{"rate_limits": False, **overrides},
    )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def settings(request: pytest.FixtureRequest, tmp_path: Path, pg_schema: str | None) -> Settings:
    return make_settings(
        request,
        tmp_path,
        pg_schema,
        REDIS_URL,
        max_request_bytes=64 * 1024,
        page_size_max=20,
        max_attempts=3,
        # No worker runs here: a `Prefer: wait` the contract tests send waits this long.
        sync_wait_max_s=1,
    )


@pytest.fixture
def database(settings: Settings) -> Iterator[Database]:
    db = Database(settings)
    Base.metadata.drop_all(db.engine)
    Base.metadata.create_all(db.engine)
    with db.transaction() as session:
        ensure_builtins(session)
    yield db
    db.dispose()


@pytest.fixture
def broker() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def publisher(settings: Settings, broker: redis.Redis) -> Iterator[Publisher]:
    pub = Publisher(settings)
    yield pub
    pub.close()


@pytest.fixture
def app(settings: Settings, database: Database, publisher: Publisher) -> Flask:
    app = create_app(settings, database=database, publisher=publisher)
    state: Genq = app.extensions["genq"]
    state.stream_poll_s = 0.05
    return app


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@dataclass(frozen=True)
class Keys:
    acme: str
    globex: str
    admin: str
    revoked: str
    acme_tenant: str
    globex_tenant: str


@pytest.fixture
def keys(database: Database) -> Keys:
    with database.transaction() as session:
        acme = get_or_create_tenant(session, "acme")
        globex = get_or_create_tenant(session, "globex")
        ops = get_or_create_tenant(session, "ops")
        _, acme_key = create_key(session, acme)
        _, globex_key = create_key(session, globex)
        _, admin_key = create_key(session, ops, is_admin=True)
        revoked, revoked_key = create_key(session, acme)
        revoke_key(session, revoked)
        return Keys(acme_key, globex_key, admin_key, revoked_key, acme.id, globex.id)


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
