"""The Flask app factory: builds the database and the broker publisher from settings (or takes
the ones a test passes in), installs problem responses, and registers the `/v1` blueprints.

The state views share is a `Genq` on `app.extensions` (`api.state`, which the blueprints import
instead of this module). Nothing here reads the environment: the entry point (`api.wsgi`) builds
`Settings`.
"""

from __future__ import annotations

from flask import Flask

from api import (
    artifacts,
    auth,
    batches,
    catalog,
    dashboard,
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
    uploads,
)
from api import datasets as dataset_uploads
from api.openai_compat import routes as openai_routes
from api.state import EXTENSION, Genq
from core.artifacts import ArtifactStore
from core.db import Database
from core.settings import Settings
from scheduler.enqueue import Publisher


def create_app(
    settings: Settings,
    *,
    database: Database | None = None,
    publisher: Publisher | None = None,
) -> Flask:
    """The genq API. `database` and `publisher` default to ones built from `settings`; pass
    your own to share them (tests, or a process that also runs the scheduler)."""
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
        uploads.bp,
        tenants.bp,
        schedules.bp,
        keys.bp,
        scaling.bp,
        openai_routes.bp,
    ):
        app.register_blueprint(blueprint)
    auth.install(app)
    app.before_request(inputs.refuse_nul_in_request)  # after the key check: 401 comes first
    # After auth: the dashboard marks its views as exempt from the Bearer check.
    dashboard.install(app, settings)
    return app
