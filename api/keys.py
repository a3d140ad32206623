"""`/v1/keys`: API keys in the API. Admins create keys for any tenant (with a scope and an
optional expiry), list them and revoke one by id; a tenant's key lists its own tenant's keys.
`DELETE /v1/admin/sessions` ends every dashboard session ("log out everywhere").

A key is shown once, in the answer that created it; lists show its prefix. Revoking a key
ends its dashboard sessions too. Every change is written to the audit log.
"""

from __future__ import annotations

from datetime import datetime

from flask import Blueprint, Response, jsonify, request
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from api import schemas_admin as schemas
from api.auth import forget_key, principal, tenant_scope
from api.jobs import read_json_body
from api.payloads import iso
from api.state import genq
from api.submissions import errors_from
from core.audit import Actor, record_action
from core.errors import ForbiddenError, InvalidInputError, NotFoundError
from core.keys import KeyScope, create_key, get_or_create_tenant, revoke_key
from core.sessions import end_all_sessions
from core.tables import ApiKey, Tenant, utcnow

bp = Blueprint("keys", __name__, url_prefix="/v1")


class KeyRequest(BaseModel):
    """The body of `POST /v1/keys`."""

    model_config = ConfigDict(extra="forbid", title="KeyRequest")

    tenant: str = Field(
        min_length=1, max_length=128, description="Tenant id or name (a new name creates it)."
    )
    scope: KeyScope = Field(
        KeyScope.SUBMIT,
        description="read: only reads; submit: reads and writes its tenant's objects; admin.",
    )
    label: str = Field("", max_length=128, description="A note to tell keys apart.")
    expires_at: AwareDatetime | None = Field(
        None, description="After this the key answers 401 (RFC 3339, in the future)."
    )


def key_payload(key: ApiKey, tenant_name: str) -> schemas.ApiKey:
    return {
        "id": key.id,
        "prefix": key.prefix,
        "tenant_id": key.tenant_id,
        "tenant": tenant_name,
        "scope": key.scope,
        "label": key.label,
        "created_at": iso(key.created_at),
        "expires_at": iso(key.expires_at),
        "revoked_at": iso(key.revoked_at),
        "last_used_at": iso(key.last_used_at),
    }


def _require_admin() -> None:
    if not principal().is_admin:
        raise ForbiddenError("this needs an admin key")


def _find_key(session: Session, key_id: str) -> tuple[ApiKey, str]:
    stmt = select(ApiKey, Tenant.name).join(Tenant).where(ApiKey.id == key_id)
    scope = tenant_scope()
    if scope is not None:
        stmt = stmt.where(ApiKey.tenant_id == scope)
    row = session.execute(stmt).first()
    if row is None:
        raise NotFoundError(f"no key {key_id}")
    return row[0], row[1]


@bp.get("/keys")
def list_keys() -> Response:
    """Every key (admin; `tenant` filters by id or name), or the caller's tenant's keys."""
    stmt = select(ApiKey, Tenant.name).join(Tenant).order_by(ApiKey.created_at, ApiKey.id)
    scope = tenant_scope()
    if scope is not None:
        stmt = stmt.where(ApiKey.tenant_id == scope)
    tenant = request.args.get("tenant")
    if tenant is not None:
        stmt = stmt.where((Tenant.id == tenant) | (Tenant.name == tenant))
    with genq().database.read() as session:
        items = [key_payload(key, name) for key, name in session.execute(stmt)]
    return jsonify({"items": items})


@bp.post("/keys")
def create() -> tuple[Response, int]:
    """Create a key (admin); the answer holds the key itself, shown this once."""
    _require_admin()
    try:
        body = KeyRequest.model_validate(read_json_body())
    except ValidationError as exc:
        raise InvalidInputError(errors_from(exc)) from None
    expires_at: datetime | None = body.expires_at
    if expires_at is not None and expires_at <= utcnow():
        raise InvalidInputError.one("expires_at", "must be in the future")
    with genq().database.transaction() as session:
        tenant = session.scalar(select(Tenant).where(Tenant.id == body.tenant))
        if tenant is None:
            tenant = get_or_create_tenant(session, body.tenant)
        key, raw = create_key(
            session, tenant, scope=body.scope, label=body.label, expires_at=expires_at
        )
        record_action(
            session,
            Actor.of_key(session, principal().key_id),
            "key.create",
            "key",
            key.id,
            {"tenant": tenant.id, "scope": key.scope, "via": "api"},
        )
        payload = {**key_payload(key, tenant.name), "key": raw}
    response = jsonify(payload)
    response.headers["Location"] = f"/v1/keys/{payload['id']}"
    response.headers["Cache-Control"] = "no-store"
    return response, 201


@bp.get("/keys/<key_id>")
def get_key(key_id: str) -> Response:
    with genq().database.read() as session:
        key, name = _find_key(session, key_id)
        return jsonify(key_payload(key, name))


@bp.delete("/keys/<key_id>")
def revoke(key_id: str) -> Response:
    """Revoke a key (admin): it answers 401 from now on and its dashboard sessions end.
    Revoking a revoked key changes nothing."""
    _require_admin()
    with genq().database.transaction() as session:
        key, name = _find_key(session, key_id)
        revoke_key(session, key)
        ended = end_all_sessions(session, key.id)
        record_action(
            session,
            Actor.of_key(session, principal().key_id),
            "key.revoke",
            "key",
            key.id,
            {"sessions_ended": ended, "via": "api"},
        )
        session.flush()
        payload = key_payload(key, name)
        key_hash = key.key_hash
    forget_key(key_hash)
    return jsonify(payload)


@bp.delete("/admin/sessions")
def end_sessions() -> Response:
    """Log out everywhere (admin): every dashboard session ends; returns how many."""
    _require_admin()
    with genq().database.transaction() as session:
        ended = end_all_sessions(session)
        record_action(
            session,
            Actor.of_key(session, principal().key_id),
            "end_sessions",
            "key",
            principal().key_id,
            {"count": ended, "via": "api"},
        )
    return jsonify({"ended": ended})
