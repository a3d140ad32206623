"""The audit log: one row per admin action (log in and out, cancel, retry, change a job's
priority, create or revoke a key), naming who did it by key id, key prefix and tenant. The
dashboard writes it in the same transaction as the action, so an action and its record are
committed together or not at all; the `/v1` API records its priority changes here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.tables import ApiKey, AuditEntry, utcnow


@dataclass(frozen=True)
class Actor:
    """Who acted: an API key (its id, the prefix people recognise it by) and its tenant."""

    key_id: str | None
    key_prefix: str
    tenant_id: str | None

    @classmethod
    def of_key(cls, session: Session, key_id: str) -> Actor:
        key = session.get(ApiKey, key_id)
        if key is None:
            return cls(key_id=key_id, key_prefix="?", tenant_id=None)
        return cls(key_id=key.id, key_prefix=key.prefix, tenant_id=key.tenant_id)


def record_action(
    session: Session,
    actor: Actor,
    action: str,
    target_type: str,
    target_id: str,
    detail: dict[str, Any] | None = None,
) -> AuditEntry:
    entry = AuditEntry(
        key_id=actor.key_id,
        key_prefix=actor.key_prefix,
        tenant_id=actor.tenant_id,
        action=action,
        target_type=target_type,
        target_id=target_id,
        detail=detail or {},
        created_at=utcnow(),
    )
    session.add(entry)
    session.flush()
    return entry


def recent_actions(
    session: Session,
    *,
    limit: int = 50,
    target_type: str | None = None,
    target_id: str | None = None,
) -> Sequence[AuditEntry]:
    """Newest first; optionally only those about one object."""
    stmt = select(AuditEntry)
    if target_type is not None:
        stmt = stmt.where(AuditEntry.target_type == target_type)
    if target_id is not None:
        stmt = stmt.where(AuditEntry.target_id == target_id)
    return session.scalars(stmt.order_by(AuditEntry.id.desc()).limit(limit)).all()
