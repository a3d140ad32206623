"""What the tests of the core services and the scheduler make jobs with: a database with the
built-in models and named tenants, and the job most of them create (core.jobs.create_job): an
echo `generate` job (the built-in model that needs no worker), with the fields a test cares
about set on top."""

from __future__ import annotations

from typing import Any

from core.catalog import ensure_builtins, resolve_model
from core.db import Database
from core.jobs import NewJob
from core.keys import get_or_create_tenant
from core.settings import Settings
from core.states import JobKind


def tenants_database(settings: Settings, *names: str) -> Database:
    """A Database on `settings` with the built-in models and the tenants `names`: their ids as
    `database.tenants` (name -> id), the echo model's as `database.echo_id`. The caller
    disposes of it."""
    database = Database(settings)
    with database.transaction() as session:
        ensure_builtins(session)
        tenants = {n: get_or_create_tenant(session, n).id for n in names}
        database.tenants = tenants  # type: ignore[attr-defined]
        database.echo_id = resolve_model(session, tenants[names[0]], "echo").id  # type: ignore[attr-defined]
    return database


def echo_job(tenant_id: str, model_id: str, **fields: Any) -> NewJob:
    """The tenant's echo job, no params; `fields` replace or add to these (params, priority,
    idempotency_key, webhook...)."""
    values: dict[str, Any] = {
        "tenant_id": tenant_id,
        "kind": JobKind.GENERATE,
        "family": "echo",
        "queue": "generate",
        "params": {},
        "model_id": model_id,
        **fields,
    }
    return NewJob(**values)
