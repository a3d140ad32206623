"""`PATCH /v1/models/{name}` and `PATCH /v1/models/{name}/{version}`: an admin sets a model's
replica policy (core/scaling.py) on every version of the name, or on one. Only the fields
sent change; null goes back to the family's default. Every change is audited in the same
transaction; the scaler applies it at its next look (GENQ_SCALE_INTERVAL_S).
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from pydantic import ValidationError

from api.auth import principal, tenant_scope
from api.jobs import read_json_body
from api.payloads import render_models
from api.state import genq
from api.submissions import errors_from
from core.audit import Actor, record_action
from core.catalog import list_models
from core.errors import ForbiddenError, InvalidInputError, NotFoundError
from core.numbers import parse_whole
from core.scaling import PolicyChange, check_policy, model_policy
from core.tables import Model
from workers.registry import get_family

bp = Blueprint("scaling", __name__, url_prefix="/v1")


def change_policy(name: str, version: int | None) -> Response:
    if not principal().is_admin:
        raise ForbiddenError("this needs an admin key")
    body = read_json_body()
    try:
        change = PolicyChange.model_validate(body)
    except ValidationError as exc:
        raise InvalidInputError(errors_from(exc)) from None
    sent = change.model_dump(exclude_unset=True)
    if not sent:
        raise InvalidInputError.one(
            "body", "send at least one of: " + ", ".join(PolicyChange.model_fields)
        )
    settings = genq().settings
    with genq().database.transaction() as session:
        found: list[Model] = list_models(session, tenant_scope(), name)
        if version is not None:
            found = [m for m in found if m.version == version]
        if not found:
            ref = name if version is None else f"{name}:{version}"
            raise NotFoundError(f"no model {ref!r}")
        for model in found:
            before = dict(model.serving or {})
            after = {k: v for k, v in {**before, **sent}.items() if v is not None}
            errors = check_policy(
                model_policy(get_family(model.family).scaling.as_dict(), after, settings)
            )
            if errors:
                raise InvalidInputError(errors)
            model.serving = after or None
            record_action(
                session,
                Actor.of_key(session, principal().key_id),
                "model.scaling",
                "model",
                model.id,
                {"ref": model.ref, "from": before, "to": after, "via": "api"},
            )
        session.flush()
        items = render_models(session, found)
    return jsonify({"items": items})


@bp.patch("/models/<name>")
def change_model_policy(name: str) -> Response:
    """Set the replica policy of every version of `name` (admin)."""
    return change_policy(name, None)


@bp.patch("/models/<name>/<version>")
def change_version_policy(name: str, version: str) -> Response:
    """Set the replica policy of one version (admin)."""
    number = parse_whole(version)
    if number is None or number < 1:
        raise NotFoundError(f"no model {name}:{version}")
    return change_policy(name, number)
