"""Tenants and API keys. A key is `gq_` plus 40 random characters; only its SHA-256 and its
first characters (to tell keys apart in lists) are stored, so a key is shown once."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, or_, select, update
from sqlalchemy.orm import Session

from core.errors import InvalidInputError, UnauthorizedError
from core.ids import new_id
from core.tables import SYSTEM_TENANT_ID, ApiKey, Tenant, utcnow

KEY_PREFIX = "gq_"
PREFIX_CHARS = 11  # "gq_" and 8 characters


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant whose objects they see, and whether they see everyone's."""

    tenant_id: str
    key_id: str
    is_admin: bool
    last_used_at: datetime | None = None


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    if not name or len(name) > 128:
        raise InvalidInputError.one("tenant", "must be 1-128 characters")
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(id=new_id(), name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_key(
    session: Session, tenant: Tenant, *, is_admin: bool = False, label: str = "", raw: str = ""
) -> tuple[ApiKey, str]:
    """Create a key (random unless `raw` is given); returns the row and the key itself."""
    raw = raw or KEY_PREFIX + secrets.token_urlsafe(30)
    if len(raw) < 20:
        raise InvalidInputError.one("key", "must be at least 20 characters")
    existing = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(raw)))
    if existing is not None:
        return existing, raw
    key = ApiKey(
        id=new_id(),
        tenant_id=tenant.id,
        prefix=raw[:PREFIX_CHARS],
        key_hash=hash_key(raw),
        is_admin=is_admin,
        label=label,
    )
    session.add(key)
    session.flush()
    return key, raw


# Built once: every request runs it.
_KEY_BY_HASH = select(ApiKey).where(ApiKey.key_hash == bindparam("key_hash"))


def authenticate(session: Session, raw: str) -> Principal:
    key = session.scalar(_KEY_BY_HASH, {"key_hash": hash_key(raw)})
    if key is None or key.revoked_at is not None:
        raise UnauthorizedError("unknown or revoked API key")
    return Principal(
        tenant_id=key.tenant_id,
        key_id=key.id,
        is_admin=key.is_admin,
        last_used_at=key.last_used_at,
    )


# A key's last use is written at most this often: every request reads the key, but writing on
# each one would put a write (and on SQLite the write lock) on every read-only request.
LAST_USED_EVERY_S = 60.0


def is_last_use_stale(who: Principal, now: datetime) -> bool:
    return who.last_used_at is None or now - who.last_used_at >= timedelta(
        seconds=LAST_USED_EVERY_S
    )


def touch_key(session: Session, key_id: str, now: datetime) -> None:
    """Record a use of the key, unless another request recorded one in the last minute."""
    cutoff = now - timedelta(seconds=LAST_USED_EVERY_S)
    session.execute(
        update(ApiKey)
        .where(
            ApiKey.id == key_id,
            or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < cutoff),
        )
        .values(last_used_at=now)
    )


def revoke_key(session: Session, key: ApiKey) -> None:
    if key.revoked_at is None:
        key.revoked_at = utcnow()


def ensure_system_tenant(session: Session) -> Tenant:
    tenant = session.get(Tenant, SYSTEM_TENANT_ID)
    if tenant is None:
        tenant = Tenant(id=SYSTEM_TENANT_ID, name=SYSTEM_TENANT_ID)
        session.add(tenant)
        session.flush()
    return tenant


def has_admin_key(session: Session) -> bool:
    return (
        session.scalar(
            select(ApiKey.id).where(ApiKey.is_admin.is_(True), ApiKey.revoked_at.is_(None)).limit(1)
        )
        is not None
    )
