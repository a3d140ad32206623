"""Fixtures of the API tests: each test runs on SQLite and on PostgreSQL (a new database at
the migrations' head), with its own Redis database behind a real `Publisher`, and the app in
this process through Flask's test client. A module that needs other settings overrides
`settings_overrides` (or `settings` itself: tests/support/api.py has `make_settings` and
`BACKENDS`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from api.app import Genq, create_app
from core.catalog import ensure_builtins
from core.db import Database
from core.keys import create_key, get_or_create_tenant, revoke_key
from core.settings import Settings
from scheduler.enqueue import Publisher
from tests.support.api import BACKENDS, Keys, make_settings


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    """What `settings` sets beyond `make_settings`' own: a module or folder that needs other
    settings overrides this fixture (its values replace these, they are not merged)."""
    return {
        "max_request_bytes": 64 * 1024,
        "page_size_max": 20,
        "max_attempts": 3,
        # No worker runs here: a `Prefer: wait` the contract tests send waits this long.
        "sync_wait_max_s": 1,
    }


@pytest.fixture(params=BACKENDS)
def settings(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    redis_db_url: str,
    settings_overrides: dict[str, Any],
) -> Settings:
    return make_settings(request, tmp_path, redis_db_url, **settings_overrides)


@pytest.fixture
def database(settings: Settings) -> Iterator[Database]:
    db = Database(settings)
    with db.transaction() as session:
        ensure_builtins(session)
    yield db
    db.dispose()


@pytest.fixture
def broker(settings: Settings) -> Iterator[redis.Redis]:
    """The test's Redis database (flushed around the test by `redis_db_url`)."""
    client = redis.Redis.from_url(settings.redis_url)
    yield client
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
