"""Failures on the OpenAI-compatible path, rendered in OpenAI's error shape
(`{"error": {"message", "type", "param", "code"}}`) instead of problem+json, with the status
codes OpenAI's clients map to their own exception classes: a genq 422 is a 400 naming the
OpenAI parameter, an unknown model a 404, a quota a 429 with Retry-After.

`JobWaitError` is this path's own: the call's job did not end in time (504) or ended without
a result (500). Both carry `x-should-retry: false`, so that a client does not send the call
again (and create another job): the message names the job to poll instead.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from flask import Response, g
from werkzeug.exceptions import HTTPException

from api.problems import database_unavailable, request_id
from core.errors import (
    BusyError,
    ConflictError,
    GenqError,
    InvalidInputError,
    NotFoundError,
    QuotaExceededError,
    RateLimitedError,
    UnauthorizedError,
)

log = logging.getLogger(__name__)

JOB_ID_HEADER = "X-Genq-Job-Id"
# Seconds a caller refused by a queue-length quota is asked to wait (a GPU budget says when
# it renews).
QUOTA_RETRY_AFTER_S = 5


class JobWaitError(GenqError):
    """The call's job did not finish in time (504) or finished without a result (500)."""

    type, title = "job-wait", "The job did not give a result"

    def __init__(self, detail: str, *, status: int, code: str, job_ids: list[str]) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.job_ids = job_ids


def openai_error(
    status: int,
    message: str,
    *,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    response = Response(json.dumps(body), status=status, mimetype="application/json")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def param_name(field: str, renames: dict[str, str] | None = None) -> str:
    """A genq field as the OpenAI parameter it came from: `params.max_tokens` -> `max_tokens`,
    then the call's renames (`num_images` -> `n`)."""
    name = field.removeprefix("params.")
    head = name.split(".")[0]
    return (renames or {}).get(head, name)


def _retry_after(error: QuotaExceededError) -> int:
    resets = error.extra.get("resets_at")
    if isinstance(resets, str):
        at = datetime.fromisoformat(resets.replace("Z", "+00:00"))
        return max(1, int((at - datetime.now(UTC)).total_seconds()) + 1)
    return QUOTA_RETRY_AFTER_S


def render(error: Exception) -> Response:
    """Any failure of an OpenAI-compatible call as OpenAI's error body. A view that renames
    genq's fields (`num_images` is `n`) sets `g.openai_renames`."""
    renames: dict[str, str] = g.get("openai_renames") or {}
    error = database_unavailable(error) or error
    if isinstance(error, InvalidInputError):
        first = error.errors[0]
        param = param_name(first["field"], renames)
        messages = "; ".join(
            f"{param_name(e['field'], renames)}: {e['message']}" for e in error.errors
        )
        return openai_error(
            400, messages, type_="invalid_request_error", param=param, code="invalid_value"
        )
    if isinstance(error, UnauthorizedError):
        return openai_error(
            401,
            error.detail,
            type_="invalid_request_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if isinstance(error, NotFoundError):
        is_model = error.detail.startswith("no model")
        return openai_error(
            404,
            error.detail,
            type_="invalid_request_error",
            param="model" if is_model else None,
            code="model_not_found" if is_model else "not_found",
        )
    if isinstance(error, ConflictError):
        return openai_error(409, error.detail, type_="invalid_request_error", code=error.type)
    if isinstance(error, QuotaExceededError):
        return openai_error(
            429,
            error.detail,
            type_="rate_limit_exceeded",
            code=str(error.extra.get("limit") or error.type),
            headers={"Retry-After": str(_retry_after(error))},
        )
    if isinstance(error, RateLimitedError):  # api/ratelimits.py: a key, tenant or address limit
        return openai_error(
            429,
            error.detail,
            type_="rate_limit_exceeded",
            code=str(error.extra.get("policy") or error.type),
            headers=error.headers,
        )
    if isinstance(error, BusyError):
        return openai_error(
            503, error.detail, type_="server_error", code="busy", headers=error.headers
        )
    if isinstance(error, JobWaitError):
        return openai_error(
            error.status,
            error.detail,
            type_="server_error" if error.status == 500 else "timeout",
            code=error.code,
            headers={"x-should-retry": "false", JOB_ID_HEADER: ", ".join(error.job_ids)},
        )
    if isinstance(error, GenqError):
        status = 400 if error.status == 422 else error.status
        kind = "invalid_request_error" if status < 500 else "server_error"
        return openai_error(
            status, error.detail, type_=kind, code=error.type, headers=error.headers
        )
    if isinstance(error, HTTPException):
        status = error.code or 500
        headers = {
            name: value
            for name, value in error.get_headers()
            if name.lower() not in ("content-type", "content-length")
        }
        kind = "invalid_request_error" if status < 500 else "server_error"
        return openai_error(
            status, error.description or error.name, type_=kind, code=None, headers=headers
        )
    rid = request_id()
    log.exception("unhandled error in an OpenAI-compatible call", extra={"request_id": rid})
    return openai_error(
        500, f"an unexpected error occurred (request {rid})", type_="server_error", code="internal"
    )


def error_event(error: Exception) -> str:
    """A failure after a stream has started, as the server-sent event OpenAI's clients raise
    as an APIError."""
    response = render(error)
    return f"data: {response.get_data(as_text=True)}\n\n"
