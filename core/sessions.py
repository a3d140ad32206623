"""Dashboard sessions, kept server-side so that they end when asked. The browser holds a random
token; the row's id is its SHA-256. A session is valid while its row exists, it has not expired
and its key is a valid admin key; logout deletes the row, "log out everywhere" deletes them all,
and revoking or expiring the key ends its sessions on their next request."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from core.keys import is_key_valid
from core.tables import ApiKey, DashboardSession, utcnow


def _session_id(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def start_session(session: Session, key_id: str, lifetime: timedelta) -> str:
    """A new session for the key; returns the token for the cookie. Expired rows of any key
    are removed on the way, so the table holds only live sessions."""
    now = utcnow()
    session.execute(delete(DashboardSession).where(DashboardSession.expires_at <= now))
    token = secrets.token_urlsafe(32)
    session.add(
        DashboardSession(
            id=_session_id(token), key_id=key_id, created_at=now, expires_at=now + lifetime
        )
    )
    session.flush()
    return token


def session_key(session: Session, token: str, now: datetime | None = None) -> ApiKey | None:
    """The admin key of a live session, or None (unknown, ended or expired session, or a key
    that is no longer a valid admin key)."""
    now = now or utcnow()
    row = session.get(DashboardSession, _session_id(token))
    if row is None or row.expires_at <= now:
        return None
    key = session.get(ApiKey, row.key_id)
    if key is None or not key.is_admin or not is_key_valid(key, now):
        return None
    return key


def end_session(session: Session, token: str) -> None:
    session.execute(delete(DashboardSession).where(DashboardSession.id == _session_id(token)))


def end_all_sessions(session: Session, key_id: str | None = None) -> int:
    """End every dashboard session (or every one of a key); returns how many were live."""
    stmt = delete(DashboardSession)
    if key_id is not None:
        stmt = stmt.where(DashboardSession.key_id == key_id)
    live = select(DashboardSession.id).where(DashboardSession.expires_at > utcnow())
    if key_id is not None:
        live = live.where(DashboardSession.key_id == key_id)
    count = len(session.scalars(live).all())
    session.execute(stmt)
    return count
