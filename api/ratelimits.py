"""Rate limits on `/v1`, counted in the broker's Redis so that every API process shares them.

Three limits, each a moving window of the `limits` library (the engine of Flask-Limiter):
- `key`: each non-admin API key may make `burst` requests in any window of burst/per_s
  seconds (GENQ_RATE_LIMIT_PER_S, GENQ_RATE_LIMIT_BURST);
- `tenant`: all of a tenant's keys together, the same way (GENQ_TENANT_RATE_LIMIT_*; an admin
  sets a tenant's own with PATCH /v1/tenants/{id} `rate_limit_per_s` / `rate_limit_burst`);
- `auth`: requests whose key is missing, unknown, expired or revoked, and failed dashboard
  logins, per client address per minute (GENQ_AUTH_FAILURES_PER_MIN). Past it, every request
  from that address is refused before its key is even looked up, until the window frees up.

A refused request is a 429 problem with `Retry-After` (seconds) and the IETF httpapi header
fields `RateLimit-Policy: "key";q=40;w=2` and `RateLimit: "key";r=0;t=1`; an allowed one
carries both fields for the tightest of its limits. Admin keys are not limited. If Redis does
not answer, requests are let through (and logged): a broker outage must not become an API one.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import redis
from flask import Response, g, request
from limits import RateLimitItem, RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

from api.instruments import RATE_LIMITED
from core.errors import RateLimitedError
from core.keys import Principal
from core.settings import Settings

log = logging.getLogger(__name__)

KEY_PREFIX = "genq:ratelimit"


@dataclass(frozen=True)
class Policy:
    name: str
    quota: int
    window_s: int

    @classmethod
    def of_rate(cls, name: str, per_s: float, burst: int) -> Policy:
        return cls(name, burst, max(1, math.ceil(burst / per_s)))

    @property
    def item(self) -> RateLimitItem:
        if self.window_s % 60 == 0:
            return RateLimitItemPerMinute(self.quota, self.window_s // 60)
        return RateLimitItemPerSecond(self.quota, self.window_s)

    def field(self) -> str:
        return f'"{self.name}";q={self.quota};w={self.window_s}'


@dataclass(frozen=True)
class Standing:
    """Where a caller stands against one policy after a request."""

    policy: Policy
    remaining: int
    reset_s: int


class RateLimits:
    """The limiter of one API process (its Redis connections are the publisher's)."""

    def __init__(self, settings: Settings, storage: RedisStorage) -> None:
        self.settings = settings
        self.limiter = MovingWindowRateLimiter(storage)

    def policies(self, who: Principal) -> list[Policy]:
        s = self.settings
        return [
            Policy.of_rate("key", s.rate_limit_per_s, s.rate_limit_burst),
            Policy.of_rate(
                "tenant",
                who.rate_limit_per_s or s.tenant_rate_limit_per_s,
                who.rate_limit_burst or s.tenant_rate_limit_burst,
            ),
        ]

    def auth_policy(self) -> Policy:
        return Policy("auth", self.settings.auth_failures_per_min, 60)

    def _standing(self, policy: Policy, identity: str) -> Standing:
        stats = self.limiter.get_window_stats(policy.item, policy.name, identity)
        reset_s = max(1, math.ceil(stats.reset_time - time.time()))
        return Standing(policy, stats.remaining, reset_s)

    def hit(self, who: Principal) -> Standing | None:
        """Count a request of `who`; 429 if one of its limits is used up. Returns the
        tightest standing (for the response's header fields)."""
        tightest: Standing | None = None
        for policy in self.policies(who):
            identity = who.key_id if policy.name == "key" else who.tenant_id
            if not self.limiter.hit(policy.item, policy.name, identity):
                raise refusal(self._standing(policy, identity), f"this API {policy.name}")
            standing = self._standing(policy, identity)
            if tightest is None or standing.remaining < tightest.remaining:
                tightest = standing
        return tightest

    def check_address(self, address: str) -> None:
        """429 if the address has used up its failed authentications."""
        policy = self.auth_policy()
        if not self.limiter.test(policy.item, policy.name, address):
            raise refusal(
                self._standing(policy, address), "failed authentications from this address"
            )

    def count_failure(self, address: str) -> None:
        policy = self.auth_policy()
        self.limiter.hit(policy.item, policy.name, address)


def refusal(standing: Standing, what: str) -> RateLimitedError:
    RATE_LIMITED.labels(standing.policy.name).inc()
    error = RateLimitedError(
        f"too many requests for {what}: at most {standing.policy.quota} in"
        f" {standing.policy.window_s} s; retry in {standing.reset_s} s",
        policy=standing.policy.name,
        retry_after_s=standing.reset_s,
    )
    error.headers.update(header_fields(Standing(standing.policy, 0, standing.reset_s)))
    return error


def header_fields(standing: Standing) -> dict[str, str]:
    name = standing.policy.name
    return {
        "RateLimit-Policy": standing.policy.field(),
        "RateLimit": f'"{name}";r={max(0, standing.remaining)};t={standing.reset_s}',
    }


def client_address() -> str:
    return request.remote_addr or "unknown"


def add_header_fields(response: Response) -> Response:
    standing: Standing | None = g.get("rate_standing")
    if standing is not None:
        for name, value in header_fields(standing).items():
            response.headers.setdefault(name, value)
    return response


def is_redis_down(exc: Exception) -> bool:
    return isinstance(exc, redis.RedisError | OSError)


def log_redis_down(exc: Exception) -> None:
    log.warning("rate limits not counted (Redis did not answer): %s", exc)
