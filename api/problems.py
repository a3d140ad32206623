"""Problem responses (RFC 9457): the one place where every failure becomes
`application/problem+json` with `type`, `title`, `status` and `detail`.

genq's own errors (`core.errors.GenqError`) render their own problem; werkzeug's HTTP errors
(unknown route, wrong method, body too large, wrong media type) keep their status and headers;
anything else is logged with the request id and answered with a bare 500.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from core.db import is_transient_db_error
from core.errors import BusyError, GenqError

log = logging.getLogger(__name__)
# One line per request (method, path, status, milliseconds) where gunicorn's text access log
# is off (GENQ_LOG_FORMAT=json: stack/cli.py), so that the line carries the request id.
access_log = logging.getLogger("genq.access")

PROBLEM_JSON = "application/problem+json"
REQUEST_ID_HEADER = "X-Request-ID"
# A client may pass its own request id if it is short and plain; otherwise one is made.
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# Slugs for werkzeug's errors that have no GenqError of their own.
_HTTP_TYPES = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    406: "not-acceptable",
    409: "conflict",
    411: "length-required",
    413: "too-large",
    414: "uri-too-long",
    415: "unsupported-media-type",
    429: "too-many-requests",
    431: "headers-too-large",
    501: "not-implemented",
}


def problem_response(
    status: int,
    type_: str,
    title: str,
    detail: str,
    *,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body: dict[str, Any] = {"type": type_, "title": title, "status": status, "detail": detail}
    if extra:
        body.update(extra)
    response = Response(json.dumps(body), status=status, mimetype=PROBLEM_JSON)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def request_id() -> str:
    """The current request's id (made on first use)."""
    rid = g.get("request_id")
    if rid is None:
        incoming = request.headers.get(REQUEST_ID_HEADER, "")
        rid = incoming if _CLIENT_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        g.request_id = rid
    return str(rid)


def _render_genq(error: GenqError) -> Response:
    if isinstance(error, BusyError):
        log.warning("busy: %s", error.detail, extra={"request_id": request_id()})
    elif error.status >= 500:
        log.error(
            "request failed: %s: %s",
            error.type,
            error.detail,
            extra={"request_id": request_id()},
        )
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
    headers.update(getattr(error, "headers", {}))  # (one unpickled from an older worker has none)
    body = error.problem()
    return problem_response(
        error.status,
        body.pop("type"),
        body.pop("title"),
        body.pop("detail"),
        extra={k: v for k, v in body.items() if k != "status"},
        headers=headers,
    )


def _render_http(error: HTTPException) -> Response:
    status = error.code or 500
    # Keep headers such as Allow (405) and WWW-Authenticate, drop werkzeug's content type.
    headers = {
        name: value
        for name, value in error.get_headers()
        if name.lower() not in ("content-type", "content-length")
    }
    return problem_response(
        status,
        _HTTP_TYPES.get(status, "http-error"),
        error.name,
        error.description or error.name,
        headers=headers,
    )


def database_unavailable(error: Exception) -> BusyError | None:
    """A lost database connection (a restart, a failover, `pg_terminate_backend`) is the
    server's trouble for a moment, not the request's: 503 with Retry-After rather than 500.
    Its transaction was rolled back unless the connection died during the commit itself, so a
    client that retries a submission sends the same Idempotency-Key."""
    if not is_transient_db_error(error):
        return None
    log.warning(
        "database unavailable in %s %s: %s: %s",
        request.method,
        request.path,
        type(error).__name__,
        str(error).splitlines()[0] if str(error) else "",
        extra={"request_id": request_id()},
    )
    return BusyError(
        "the database connection was lost; try again (retry a submission with the same "
        "Idempotency-Key)",
        retry_after_s=1,
    )


def _render_unexpected(error: Exception) -> Response:
    if isinstance(error, HTTPException):  # Flask hands some of these to the generic handler
        return _render_http(error)
    if isinstance(error, GenqError):
        return _render_genq(error)
    busy = database_unavailable(error)
    if busy is not None:
        return _render_genq(busy)
    rid = request_id()
    log.exception(
        "unhandled error in %s %s", request.method, request.path, extra={"request_id": rid}
    )
    return problem_response(
        500, "internal", "Internal error", f"an unexpected error occurred (request {rid})"
    )


def _start_request() -> None:
    g.request_started = time.perf_counter()
    request_id()  # a before-request function that returns a value would be the response


def _add_request_id(response: Response) -> Response:
    response.headers[REQUEST_ID_HEADER] = request_id()
    return response


def _log_request(response: Response) -> Response:
    started = g.get("request_started")
    elapsed_ms = (time.perf_counter() - started) * 1000 if started is not None else 0.0
    access_log.info(
        "%s %s %d %.1f ms",
        request.method,
        request.path,
        response.status_code,
        elapsed_ms,
        extra={"request_id": request_id()},
    )
    return response


def install(app: Flask, *, log_requests: bool = False) -> None:
    """Render every failure of `app` as a problem and stamp every response with its id;
    `log_requests`: log one line per request too."""
    app.before_request(_start_request)
    app.after_request(_add_request_id)
    if log_requests:
        app.after_request(_log_request)
    app.register_error_handler(GenqError, _render_genq)
    app.register_error_handler(HTTPException, _render_http)
    app.register_error_handler(Exception, _render_unexpected)
