"""genq's API app plus one hello-JSON route, for bench/api_load.py: the baseline is served by
the same process, middleware and error handling as the endpoints it is compared with."""

from __future__ import annotations

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
