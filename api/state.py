"""The app's shared state and its accessor: a leaf module every blueprint imports (flaskr's
`get_db` shape), so that the views never import the app factory that registers them.

Everything a view needs lives on `app.extensions["genq"]` (a `Genq`, built by `api.app`); views
reach it through `genq()`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from flask import current_app
from limits.storage import RedisStorage

from api.ratelimits import RateLimits
from core.artifacts import ArtifactStore
from core.db import Database
from core.intake import InsertQueue
from core.settings import Settings
from scheduler.enqueue import Publisher

EXTENSION = "genq"


@dataclass
class Genq:
    """The app's shared objects: one database, one publisher and one artifact store."""

    settings: Settings
    database: Database
    publisher: Publisher
    artifacts: ArtifactStore
    # How often an event stream looks for new events, and how often it sends a keep-alive.
    stream_poll_s: float = 0.3
    stream_keepalive_s: float = 15.0
    # Open event streams of this process; each holds a server thread (api.events).
    streams: threading.BoundedSemaphore = field(init=False)
    stream_limit: int = field(init=False)
    # Open event streams of this process by tenant, and how many one tenant may hold.
    streams_by_tenant: dict[str, int] = field(init=False, default_factory=dict)
    streams_lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    tenant_stream_limit: int = field(init=False)
    # Group commits of submitted jobs (core/intake.py).
    inserts: InsertQueue = field(init=False)
    # Shared rate limits (api/ratelimits.py); None when GENQ_RATE_LIMITS is off.
    rate_limits: RateLimits | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.inserts = InsertQueue(self.database)
        limit = self.settings.api_max_streams or max(1, self.settings.api_threads // 2)
        self.stream_limit = limit
        self.streams = threading.BoundedSemaphore(limit)
        self.tenant_stream_limit = min(
            limit, self.settings.api_max_streams_per_tenant or max(1, limit // 2)
        )
        if self.settings.rate_limits:
            storage = RedisStorage("redis://", connection_pool=self.publisher.redis.connection_pool)
            self.rate_limits = RateLimits(self.settings, storage)

    def open_stream(self, tenant_id: str) -> str | None:
        """Take a stream slot for the tenant; None if taken, else which limit is full."""
        with self.streams_lock:
            held = self.streams_by_tenant.get(tenant_id, 0)
            if held >= self.tenant_stream_limit:
                return "tenant"
            if not self.streams.acquire(blocking=False):
                return "process"
            self.streams_by_tenant[tenant_id] = held + 1
        return None

    def close_stream(self, tenant_id: str) -> None:
        with self.streams_lock:
            held = self.streams_by_tenant.get(tenant_id, 0) - 1
            if held > 0:
                self.streams_by_tenant[tenant_id] = held
            else:
                self.streams_by_tenant.pop(tenant_id, None)
            self.streams.release()


def genq() -> Genq:
    """The current app's `Genq` (inside a request or an app context)."""
    state: Genq = current_app.extensions[EXTENSION]
    return state
