"""Tenants and API keys. A key is `gq_` plus 40 random characters; only its SHA-256 and its
first characters (to tell keys apart in lists) are stored, so a key is shown once.

A key has a scope (`read`: only reads; `submit`: reads and writes its tenant's objects;
`admin`: everything, every tenant) and may expire (`expires_at`); an expired or revoked key
answers 401. Revocation by prefix matches the prefix literally and refuses one that matches
more than one key.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import bindparam, or_, select, update
from sqlalchemy.orm import Session

from core.errors import ConflictError, InvalidInputError, NotFoundError, UnauthorizedError
from core.ids import new_id
from core.tables import SYSTEM_TENANT_ID, ApiKey, Tenant, utcnow

KEY_PREFIX = "gq_"
PREFIX_CHARS = 11  # "gq_" and 8 characters
# Keys are URL-safe base64 after `gq_`; anything else in a prefix (a SQL or glob wildcard such
# as `%`, `*`, `?`, `[`) is refused rather than matched.
PREFIX_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


class KeyScope(StrEnum):
    READ = "read"
    SUBMIT = "submit"
    ADMIN = "admin"


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant whose objects they see, and whether they see everyone's."""

    tenant_id: str
    key_id: str
    is_admin: bool
    last_used_at: datetime | None = None
    scope: str = KeyScope.SUBMIT
    # The tenant's own rate limit (None: the defaults in settings).
    rate_limit_per_s: float | None = None
    rate_limit_burst: int | None = None
    # When the key stops working (None: never); a cached check is not trusted past it.
    expires_at: datetime | None = None

    @property
    def may_write(self) -> bool:
        return self.scope != KeyScope.READ


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
    session: Session,
    tenant: Tenant,
    *,
    is_admin: bool = False,
    label: str = "",
    raw: str = "",
    scope: KeyScope | None = None,
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """Create a key (random unless `raw` is given); returns the row and the key itself. The
    scope defaults to `admin` for an admin key and `submit` otherwise."""
    scope = scope or (KeyScope.ADMIN if is_admin else KeyScope.SUBMIT)
    is_admin = scope == KeyScope.ADMIN
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
        scope=str(scope),
        label=label,
        expires_at=expires_at,
    )
    session.add(key)
    session.flush()
    return key, raw


# Built once: every request runs it.
_KEY_BY_HASH = (
    select(ApiKey, Tenant.rate_limit_per_s, Tenant.rate_limit_burst)
    .join(Tenant, Tenant.id == ApiKey.tenant_id)
    .where(ApiKey.key_hash == bindparam("key_hash"))
)


def authenticate(session: Session, raw: str) -> Principal:
    row = session.execute(_KEY_BY_HASH, {"key_hash": hash_key(raw)}).first()
    if row is None or not is_key_valid(row[0], utcnow()):
        raise UnauthorizedError("unknown, expired or revoked API key")
    key, per_s, burst = row
    return Principal(
        tenant_id=key.tenant_id,
        key_id=key.id,
        is_admin=key.is_admin,
        last_used_at=key.last_used_at,
        scope=key.scope,
        rate_limit_per_s=per_s,
        rate_limit_burst=burst,
        expires_at=key.expires_at,
    )


def is_key_valid(key: ApiKey, now: datetime) -> bool:
    """Neither revoked nor expired."""
    return key.revoked_at is None and (key.expires_at is None or key.expires_at > now)


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


def find_key_by_prefix(session: Session, prefix: str) -> ApiKey:
    """The one key whose stored prefix starts with `prefix`, matched literally. A prefix with
    a character no key has, one shorter than `gq_` and a character, or one that matches no key
    or several keys is refused."""
    if len(prefix) < len(KEY_PREFIX) + 1:
        raise InvalidInputError.one("prefix", f"give at least {len(KEY_PREFIX) + 1} characters")
    bad = sorted(set(prefix) - PREFIX_ALPHABET)
    if bad:
        raise InvalidInputError.one(
            "prefix", f"holds {''.join(bad)!r}, which no key has (no patterns: a literal prefix)"
        )
    # A key's stored prefix is its first PREFIX_CHARS characters; a longer argument (the whole
    # key, say) is compared on those.
    head = prefix[:PREFIX_CHARS]
    found = session.scalars(
        select(ApiKey).where(ApiKey.prefix.startswith(head, autoescape=True))
    ).all()
    found = [k for k in found if k.prefix.startswith(head)]  # literal, whatever the database
    if not found:
        raise NotFoundError(f"no key starts with {prefix!r}")
    if len(found) > 1:
        raise ConflictError(f"{len(found)} keys start with {prefix!r}; give more characters")
    return found[0]


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
            select(ApiKey.id)
            .where(
                ApiKey.is_admin.is_(True),
                ApiKey.revoked_at.is_(None),
                or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > utcnow()),
            )
            .limit(1)
        )
        is not None
    )
