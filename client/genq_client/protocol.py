"""What the sync and async clients share: the retry rule (429 and 503, honouring
Retry-After), turning a problem response into an exception, the bodies and headers of a
submission, and a parser for Server-Sent Events."""

from __future__ import annotations

import email.utils
import json
import random
import time
from collections.abc import Iterable, Iterator
from typing import Any

import httpx

from genq_client.errors import error_for
from genq_client.models import Event

RETRY_STATUSES = frozenset({429, 503})
DEFAULT_URL = "http://127.0.0.1:8000"
# Backoff without a Retry-After: base * 2**attempt seconds (with jitter), at most the cap.
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
# A Retry-After longer than this is not waited for: the error is raised instead.
RETRY_AFTER_MAX_S = 120.0


def retry_after_s(headers: httpx.Headers) -> float | None:
    """Seconds the server asks to wait (Retry-After as seconds or as an HTTP date)."""
    value = headers.get("Retry-After")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def retry_delay_s(response: httpx.Response | None, attempt: int) -> float | None:
    """How long to wait before retry number `attempt + 1` of a request that got `response`
    (None: a connection failure); None when it is not worth retrying."""
    if response is not None:
        if response.status_code not in RETRY_STATUSES:
            return None
        asked = retry_after_s(response.headers)
        if asked is not None:
            return asked if asked <= RETRY_AFTER_MAX_S else None
    backoff = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt)
    return backoff * (0.5 + random.random() / 2)


def check(response: httpx.Response) -> httpx.Response:
    """`response` if it succeeded; otherwise the exception for its problem."""
    if response.status_code < 400:
        return response
    try:
        body: Any = response.json()
    except ValueError:
        body = {"detail": response.text[:500] or response.reason_phrase}
    raise error_for(response.status_code, body)


def job_body(
    kind: str,
    *,
    model: str | None,
    family: str | None,
    dataset: str | None,
    name: str | None,
    params: dict[str, Any] | None,
    priority: int | str | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The body of POST /v1/jobs; `extra` carries the other fields (webhook, deadline...)."""
    body: dict[str, Any] = {"kind": kind, "params": params or {}}
    for field, value in (
        ("model", model),
        ("family", family),
        ("dataset", dataset),
        ("name", name),
        ("priority", priority),
    ):
        if value is not None:
            body[field] = value
    body.update(extra)
    return body


def submit_headers(idempotency_key: str | None, wait_s: int | None) -> dict[str, str]:
    headers = {}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    if wait_s is not None:
        headers["Prefer"] = f"wait={int(wait_s)}"
    return headers


def list_params(**filters: Any) -> dict[str, Any]:
    return {k: v for k, v in filters.items() if v is not None}


class SseParser:
    """Server-Sent Events from lines of text (the `retry:` field and comments skipped)."""

    def __init__(self) -> None:
        self._id: int | None = None
        self._type = "message"
        self._data: list[str] = []

    def feed(self, lines: Iterable[str]) -> Iterator[Event]:
        for line in lines:
            event = self.line(line)
            if event is not None:
                yield event

    def line(self, line: str) -> Event | None:
        if line == "":
            if not self._data:
                return None
            event = Event(
                id=self._id if self._id is not None else 0,
                type=self._type,
                data=json.loads("\n".join(self._data)),
            )
            self._type, self._data = "message", []
            return event
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "id" and value.isdigit():
            self._id = int(value)
        elif field == "event":
            self._type = value
        elif field == "data":
            self._data.append(value)
        return None
