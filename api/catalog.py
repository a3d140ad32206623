"""`/v1/models`, `/v1/datasets` and `/v1/families`: what a job can name.

Models and data sets are those the caller's tenant owns plus the system tenant's built-ins
(all of them for an admin). Families come from the one registry in `workers.registry`, each
with the JSON schema of its parameters for every job kind it supports.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from flask import Blueprint, Response, jsonify

from api.app import genq
from api.auth import tenant_scope
from api.payloads import dataset_payload, render_models
from core.catalog import list_datasets, list_models
from core.errors import NotFoundError
from core.states import JobKind
from workers.families.base import Family
from workers.registry import FAMILIES

bp = Blueprint("catalog", __name__, url_prefix="/v1")


@bp.get("/models")
def models() -> Response:
    with genq().database.transaction() as session:
        items = render_models(session, list_models(session, tenant_scope()))
    return jsonify({"items": items})


@bp.get("/models/<name>")
def model_versions(name: str) -> Response:
    """Every version of `name` the caller sees, oldest first."""
    with genq().database.transaction() as session:
        found = list_models(session, tenant_scope(), name)
        if not found:
            raise NotFoundError(f"no model {name!r}")
        items = render_models(session, found)
    return jsonify({"items": items})


@bp.get("/datasets")
def datasets() -> Response:
    with genq().database.transaction() as session:
        items = [dataset_payload(d) for d in list_datasets(session, tenant_scope())]
    return jsonify({"items": items})


def family_payload(family: Family) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for kind in JobKind:
        spec = family.params_for(kind)
        if spec is not None:
            params[str(kind)] = spec.model_json_schema()
    return {
        "name": family.name,
        "description": family.description,
        "kinds": list(params),
        "dataset_kinds": list(family.dataset_kinds),
        "resources": asdict(family.resources),
        "params": params,
    }


@bp.get("/families")
def families() -> Response:
    return jsonify({"items": [family_payload(f) for f in FAMILIES.values()]})
