"""genq's API app plus one hello-JSON route, for bench/api_load.py: the baseline is served by
the same process, middleware and error handling as the endpoints it is compared with.

`create_with_bare()` also mounts the bare submit endpoint of bench/bare_pipeline.py (an insert
and a Celery publish, nothing else) under `/bare`, so that `POST /v1/jobs` and its baseline run
in the same gunicorn workers.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify

from api.auth import public
from api.wsgi import create as create_genq


def create() -> Flask:
    app = create_genq()

    @app.get("/bench/hello")
    @public
    def hello():  # type: ignore[no-untyped-def]
        return jsonify({"hello": "world"})

    return app


def create_with_bare() -> Any:
    """genq with hello-JSON, and the bare pipeline's app at /bare (BARE_* environment)."""
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    from bench.bare_pipeline import create_app as create_bare

    return DispatcherMiddleware(create(), {"/bare": create_bare()})
