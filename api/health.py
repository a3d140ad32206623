"""`GET /v1/health`: whether this API process can reach its database and its broker.

200 `{"status": "ok", "checks": {...}}` when both answer; otherwise a 503 problem whose
`checks` says which failed. Failures are logged, not echoed: the endpoint needs no key.
"""

from __future__ import annotations

import logging

from flask import Blueprint, Response, jsonify
from sqlalchemy import text

from api.app import genq
from api.auth import public
from api.problems import problem_response

log = logging.getLogger(__name__)

bp = Blueprint("health", __name__, url_prefix="/v1")


def check_database() -> str:
    try:
        with genq().database.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception:
        log.exception("health: the database did not answer")
        return "unreachable"
    return "ok"


def check_broker() -> str:
    try:
        genq().publisher.redis.ping()
    except Exception:
        log.exception("health: the broker's Redis did not answer")
        return "unreachable"
    return "ok"


@bp.get("/health")
@public
def health() -> Response:
    checks = {"database": check_database(), "broker": check_broker()}
    if all(v == "ok" for v in checks.values()):
        return jsonify({"status": "ok", "checks": checks})
    failed = ", ".join(name for name, v in checks.items() if v != "ok")
    return problem_response(
        503,
        "unavailable",
        "Service unavailable",
        f"unreachable: {failed}",
        extra={"checks": checks},
    )
