"""`GET /openai/v1/models` and `GET /openai/v1/models/{id}`: the ready models the key may
generate with, in OpenAI's list shape. Each version is listed as `name:version`, and each
name once more on its own (its latest version, as genq resolves a bare name).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify
from sqlalchemy import select

from api.auth import principal
from api.state import genq
from core.catalog import READY, list_models, resolve_model
from core.states import JobKind
from core.tables import SYSTEM_TENANT_ID, Model, Tenant
from workers.registry import FAMILIES

bp = Blueprint("models", __name__)


def _generates(model: Model) -> bool:
    family = FAMILIES.get(model.family)
    return family is not None and family.params_for(JobKind.GENERATE) is not None


def model_object(model: Model, model_id: str, owners: dict[str, str]) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": int(model.created_at.timestamp()),
        "owned_by": "genq" if model.tenant_id == SYSTEM_TENANT_ID else owners[model.tenant_id],
        "family": model.family,
    }


def _owners(tenant_ids: set[str]) -> dict[str, str]:
    with genq().database.read() as session:
        rows = session.execute(select(Tenant.id, Tenant.name).where(Tenant.id.in_(tenant_ids)))
        return {tenant_id: name for tenant_id, name in rows}


@bp.get("/models")
def list_() -> Response:
    tenant_id = principal().tenant_id
    with genq().database.read() as session:
        models = [m for m in list_models(session, tenant_id) if m.status == READY and _generates(m)]
        session.expunge_all()
    owners = _owners({m.tenant_id for m in models})
    latest: dict[str, Model] = {}
    for model in models:  # by name, then version: the last one of a name is its latest
        if model.name not in latest or model.tenant_id != SYSTEM_TENANT_ID:
            latest[model.name] = model
    data = [model_object(m, m.name, owners) for m in latest.values()]
    data += [model_object(m, m.ref, owners) for m in models]
    return jsonify({"object": "list", "data": data})


@bp.get("/models/<path:model_id>")
def retrieve(model_id: str) -> Response:
    with genq().database.read() as session:
        model = resolve_model(session, principal().tenant_id, model_id)
        session.expunge(model)
    return jsonify(model_object(model, model_id, _owners({model.tenant_id})))
