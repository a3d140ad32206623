"""Authentication and tenant scoping. Every `/v1` view needs `Authorization: Bearer <key>`
unless it is marked `@public`; the key's tenant decides what the caller sees.

A tenant sees its own jobs, artifacts, models and data sets (plus the system tenant's built-in
models and data sets); another tenant's id answers 404, as if it did not exist. Admin keys see
everything.

Each API process trusts a key it has checked for `settings.auth_cache_s` (1 s by default), or
until the key expires if that is sooner: polling clients make most requests, and reading the key
from SQL for each was a third of a poll's cost. A key revoked through another process (or the
CLI) stops working within that time, one revoked through this process at once. Likewise an
address that passed the failed-authentication limit is not asked about again for that long,
unless this process counts a failure from it in the meantime.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from flask import Flask, current_app, g, request

from api.ratelimits import add_header_fields, client_address, is_redis_down, log_redis_down
from api.state import genq
from core.errors import ForbiddenError, RateLimitedError, UnauthorizedError
from core.keys import Principal, authenticate, hash_key, is_last_use_stale, touch_key
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


class KeyCache:
    """The keys one app (one API process) has checked lately, by their SHA-256, and the client
    addresses that were under the failed-authentication limit lately. Entries are replaced
    whole, so threads share it without a lock (a race only checks a key twice)."""

    # Past this many entries the expired ones are dropped (guessed keys are never kept).
    PRUNE_AT = 10_000

    def __init__(self) -> None:
        self.keys: dict[str, tuple[float, Principal]] = {}
        self.clear_addresses: dict[str, float] = {}

    def principal(self, digest: str) -> Principal | None:
        entry = self.keys.get(digest)
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    def keep(self, digest: str, who: Principal, ttl_s: float) -> None:
        if ttl_s <= 0:
            return
        if who.expires_at is not None:
            ttl_s = min(ttl_s, (who.expires_at - utcnow()).total_seconds())
        self._prune(self.keys)
        self.keys[digest] = (time.monotonic() + ttl_s, who)

    def refresh(self, digest: str, who: Principal) -> None:
        """Replace a kept key's figures (its last use), keeping its deadline."""
        entry = self.keys.get(digest)
        if entry is not None:
            self.keys[digest] = (entry[0], who)

    def forget_key(self, digest: str) -> None:
        self.keys.pop(digest, None)

    def is_clear(self, address: str) -> bool:
        deadline = self.clear_addresses.get(address)
        return deadline is not None and deadline > time.monotonic()

    def mark_clear(self, address: str, ttl_s: float) -> None:
        if ttl_s > 0:
            self._prune(self.clear_addresses)
            self.clear_addresses[address] = time.monotonic() + ttl_s

    def forget_address(self, address: str) -> None:
        self.clear_addresses.pop(address, None)

    def _prune(self, entries: dict[str, Any]) -> None:
        if len(entries) < self.PRUNE_AT:
            return
        now = time.monotonic()
        for name, value in list(entries.items()):
            deadline = value[0] if isinstance(value, tuple) else value
            if deadline <= now:
                entries.pop(name, None)


CACHE_EXTENSION = "genq.keys"


def key_cache(app: Flask | None = None) -> KeyCache:
    """The app's KeyCache (made by install())."""
    cache: KeyCache = (app or current_app).extensions[CACHE_EXTENSION]
    return cache


def forget_key(key_hash: str) -> None:
    """Stop trusting a key in this process at once (it was revoked here)."""
    key_cache().forget_key(key_hash)


def _authenticate() -> None:
    if request.endpoint is None:  # no route: let the 404 or 405 through
        return
    view = current_app.view_functions.get(request.endpoint)
    if view is None or getattr(view, "genq_public", False):
        return
    state = genq()
    cache = key_cache()
    ttl_s = state.settings.auth_cache_s
    limits = state.rate_limits
    address = client_address()
    if limits is not None and not cache.is_clear(address):
        rate_guarded(lambda: limits.check_address(address))
        cache.mark_clear(address, ttl_s)
    database = state.database
    key = _bearer_key()  # no key at all is not a guess: not counted
    digest = hash_key(key)
    who = cache.principal(digest)
    if who is None:
        try:
            with database.read() as session:
                who = authenticate(session, key)
        except UnauthorizedError:
            # This process asks Redis about the address again on its next request.
            cache.forget_address(address)
            if limits is not None:
                rate_guarded(lambda: limits.count_failure(address))
            raise
        cache.keep(digest, who, ttl_s)
    g.principal = who
    if not who.may_write and request.method not in SAFE_METHODS:
        raise ForbiddenError("this key is read-only (scope `read`): it may only read")
    if limits is not None and not who.is_admin:
        g.rate_standing = rate_guarded(lambda: limits.hit(who))
    now = utcnow()
    if is_last_use_stale(who, now):
        try:
            with database.transaction() as session:
                touch_key(session, who.key_id, now)
            cache.refresh(digest, replace(who, last_used_at=now))
        except Exception:  # bookkeeping: never fail a request over it
            log.warning("could not record the use of key %s", who.key_id, exc_info=True)


def install(app: Flask) -> None:
    app.extensions[CACHE_EXTENSION] = KeyCache()
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
