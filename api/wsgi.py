"""The WSGI entry point: builds `Settings` from the environment and the app from them.

    gunicorn --worker-class gthread --threads 8 'api.wsgi:create()'

Event streams (`/v1/jobs/{id}/events`) hold a worker thread for as long as the client listens,
so run gunicorn with threads (gthread) rather than only sync workers.
"""

from __future__ import annotations

from flask import Flask

from api.app import create_app
from core.logs import configure_logging
from core.settings import Settings


def create() -> Flask:
    settings = Settings()
    configure_logging(settings, process="api")
    return create_app(settings)
