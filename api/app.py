"""The Flask app factory: builds the database and the broker publisher from settings (or takes
the ones a test passes in), installs problem responses, and registers the `/v1` blueprints.

Everything a view needs lives on `app.extensions["genq"]` (a `Genq`); views reach it through
`genq()`. Nothing here reads the environment: the entry point (`api.wsgi`) builds `Settings`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from flask import Flask, current_app
from limits.storage import RedisStorage

from api.ratelimits import RateLimits
from core.artifacts import ArtifactStore
from core.db import Database
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
    # Shared rate limits (api/ratelimits.py); None when GENQ_RATE_LIMITS is off.
    rate_limits: RateLimits | None = field(init=False, default=None)

    def __post_init__(self) -> None:
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


def create_app(
    settings: Settings,
    *,
    database: Database | None = None,
    publisher: Publisher | None = None,
) -> Flask:
    """The genq API. `database` and `publisher` default to ones built from `settings`; pass
    your own to share them (tests, or a process that also runs the scheduler)."""
    from api import (
        artifacts,
        auth,
        batches,
        catalog,
        deletions,
        deliveries,
        events,
        health,
        inputs,
        instruments,
        jobs,
        keys,
        metrics,
        openapi,
        problems,
        scaling,
        schedules,
        tenants,
    )
    from api import datasets as dataset_uploads
    from api.openai_compat import routes as openai_routes

    app = Flask("genq", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep the documented field order
    app.extensions[EXTENSION] = Genq(
        settings=settings,
        database=database or Database(settings),
        publisher=publisher or Publisher(settings),
        artifacts=ArtifactStore.from_settings(settings),
    )
    problems.install(app, log_requests=settings.log_format == "json")
    instruments.install(app)
    for blueprint in (
        health.bp,
        metrics.bp,
        openapi.bp,
        jobs.bp,
        batches.bp,
        events.bp,
        artifacts.bp,
        catalog.bp,
        deletions.bp,
        deliveries.bp,
        dataset_uploads.bp,
        tenants.bp,
        schedules.bp,
        keys.bp,
        scaling.bp,
        openai_routes.bp,
    ):
        app.register_blueprint(blueprint)
    auth.install(app)
    app.before_request(inputs.refuse_nul_in_request)  # after the key check: 401 comes first
    from api import dashboard  # after auth: it marks its views as exempt from the Bearer check

    dashboard.install(app, settings)
    return app
