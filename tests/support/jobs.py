"""The job most tests of the core services and the scheduler make through core.jobs.create_job:
an echo `generate` job (the built-in model that needs no worker), with the fields a test cares
about set on top."""

from __future__ import annotations

from typing import Any

from core.jobs import NewJob
from core.states import JobKind


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
