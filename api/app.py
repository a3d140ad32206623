"""The Flask app factory: builds the database and the broker publisher from settings (or takes
the ones a test passes in), installs problem responses, and registers the `/v1` blueprints.

Everything a view needs lives on `app.extensions["genq"]` (a `Genq`); views reach it through
`genq()`. Nothing here reads the environment: the entry point (`api.wsgi`) builds `Settings`.
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import Flask, current_app

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
        catalog,
        deliveries,
        events,
        health,
        jobs,
        openapi,
        problems,
        schedules,
        tenants,
    )
    from api import datasets as dataset_uploads

    app = Flask("genq", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep the documented field order
    app.extensions[EXTENSION] = Genq(
        settings=settings,
        database=database or Database(settings),
        publisher=publisher or Publisher(settings),
        artifacts=ArtifactStore(settings.artifacts),
    )
    problems.install(app)
    for blueprint in (
        health.bp,
        openapi.bp,
        jobs.bp,
        events.bp,
        artifacts.bp,
        catalog.bp,
        deliveries.bp,
        dataset_uploads.bp,
        tenants.bp,
        schedules.bp,
    ):
        app.register_blueprint(blueprint)
    auth.install(app)
    from api import dashboard  # after auth: it marks its views as exempt from the Bearer check

    dashboard.install(app, settings)
    return app
