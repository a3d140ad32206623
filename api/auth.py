"""Authentication and tenant scoping. Every `/v1` view needs `Authorization: Bearer <key>`
unless it is marked `@public`; the key's tenant decides what the caller sees.

A tenant sees its own jobs, artifacts, models and data sets (plus the system tenant's built-in
models and data sets); another tenant's id answers 404, as if it did not exist. Admin keys see
everything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Flask, current_app, g, request

from api.ratelimits import add_header_fields, client_address, is_redis_down, log_redis_down
from api.state import genq
from core.errors import ForbiddenError, RateLimitedError, UnauthorizedError
from core.keys import Principal, authenticate, is_last_use_stale, touch_key
from core.tables import utcnow

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def public(view: F) -> F:
    """Mark a view that needs no API key (health, the OpenAPI document)."""
    view.genq_public = True  # type: ignore[attr-defined]
    return view


def _bearer_key() -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise UnauthorizedError("send an API key as `Authorization: Bearer <key>`")
    return key.strip()


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def rate_guarded(count: Callable[[], Any]) -> Any:
    """Run a rate-limit step; a Redis that does not answer lets the request through."""
    try:
        return count()
    except RateLimitedError:
        raise
    except Exception as exc:
        if not is_redis_down(exc):
            raise
        log_redis_down(exc)
        return None


def _authenticate() -> None:
    if request.endpoint is None:  # no route: let the 404 or 405 through
        return
    view = current_app.view_functions.get(request.endpoint)
    if view is None or getattr(view, "genq_public", False):
        return
    state = genq()
    limits = state.rate_limits
    address = client_address()
    if limits is not None:
        rate_guarded(lambda: limits.check_address(address))
    database = state.database
    key = _bearer_key()  # no key at all is not a guess: not counted
    try:
        with database.read() as session:
            g.principal = authenticate(session, key)
    except UnauthorizedError:
        if limits is not None:
            rate_guarded(lambda: limits.count_failure(address))
        raise
    who: Principal = g.principal
    if not who.may_write and request.method not in SAFE_METHODS:
        raise ForbiddenError("this key is read-only (scope `read`): it may only read")
    if limits is not None and not who.is_admin:
        g.rate_standing = rate_guarded(lambda: limits.hit(who))
    now = utcnow()
    if is_last_use_stale(g.principal, now):
        try:
            with database.transaction() as session:
                touch_key(session, g.principal.key_id, now)
        except Exception:  # bookkeeping: never fail a request over it
            log.warning("could not record the use of key %s", g.principal.key_id, exc_info=True)


def install(app: Flask) -> None:
    app.before_request(_authenticate)
    app.after_request(add_header_fields)


def principal() -> Principal:
    """Who is calling (set by the before-request check)."""
    found: Principal = g.principal
    return found


def tenant_scope() -> str | None:
    """The tenant whose objects the caller sees, or None for an admin (sees all)."""
    who = principal()
    return None if who.is_admin else who.tenant_id
