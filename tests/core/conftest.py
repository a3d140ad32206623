"""Fixtures the core tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from core.catalog import ensure_builtins, resolve_model
from core.db import Database
from core.keys import get_or_create_tenant
from core.settings import Settings


@pytest.fixture
def db(database_url: str, tmp_path: Path) -> Iterator[Database]:
    """A database with the built-in models and a tenant `acme`: its id as `db.tenant_id`, the
    echo model's as `db.echo_id`. A module that needs other tenants or settings defines its
    own `db`."""
    database = Database(Settings(var_dir=tmp_path / "var", database_url=database_url))
    with database.transaction() as session:
        ensure_builtins(session)
        tenant = get_or_create_tenant(session, "acme")
        database.tenant_id = tenant.id  # type: ignore[attr-defined]
        database.echo_id = resolve_model(session, tenant.id, "echo").id  # type: ignore[attr-defined]
    yield database
    database.dispose()
