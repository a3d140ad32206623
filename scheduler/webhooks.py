"""Sending webhook messages: the `deliver_webhook` task body and the periodic dispatch.

Delivery rows are written by `core.jobs` in the job's own transactions (an outbox). The periodic
scheduler hands due rows to the `webhooks` Celery queue, so a slow receiver never holds up a job
or the reaper; a worker thread sends one message: it re-checks the target's addresses, connects
to the address it checked (so a name cannot resolve elsewhere between the check and the
connection), signs the body the Standard Webhooks way, does not follow redirects, and records
the attempt in the row's log. A failed attempt is retried later with capped exponential backoff;
a refused target is not retried.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

from celery import Celery

from core.db import Database
from core.leases import retry_backoff_s
from core.settings import Settings
from core.tables import WebhookDelivery
from core.webhooks import (
    UnsafeTargetError,
    check_target,
    due_deliveries,
    record_attempt,
    sign,
    tenant_secret,
    timestamp,
)
from scheduler.broker import DELIVER_WEBHOOK_TASK, WEBHOOK_QUEUE

log = logging.getLogger(__name__)
USER_AGENT = "genq-webhooks/1"
# A receiver's answer is only read this far: its status is what counts.
MAX_RESPONSE_BYTES = 64 * 1024


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to an address checked beforehand, while Host names the URL's host."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def post(url: str, address: str, headers: dict[str, str], body: bytes, timeout_s: float) -> int:
    """POST `body` to `url` through `address`; returns the status (redirects are returned as
    they are, never followed)."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    conn_cls = _PinnedHTTPS if https else _PinnedHTTP
    conn = conn_cls(parts.hostname, port, address, timeout_s)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    try:
        conn.request("POST", target, body=body, headers=headers)
        response = conn.getresponse()
        response.read(MAX_RESPONSE_BYTES)
        return response.status
    finally:
        conn.close()


def deliver(settings: Settings, database: Database, delivery_id: str) -> str:
    """Send one pending message once and record the attempt; returns its state afterwards."""
    with database.transaction() as session:
        row = session.get(WebhookDelivery, delivery_id)
        if row is None or row.state != "pending":
            return "skipped"
        url, payload, tenant_id = row.url, dict(row.payload), row.tenant_id
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    sent_at = timestamp()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "webhook-id": delivery_id,
        "webhook-timestamp": str(sent_at),
        "webhook-signature": sign(
            tenant_secret(settings.read_secret_key(), tenant_id), delivery_id, sent_at, body
        ),
    }
    status: int | None = None
    error: str | None = None
    permanent = False
    started = time.monotonic()
    try:
        addresses = check_target(url, allow_private=settings.webhook_allow_private)
        status = post(url, addresses[0], headers, body, settings.webhook_timeout_s)
        if 300 <= status < 400:
            error = f"redirect ({status}) not followed"
        elif not 200 <= status < 300:
            error = f"the receiver answered {status}"
    except UnsafeTargetError as exc:
        error, permanent = f"refused: {exc}", True
    except TimeoutError:
        error = f"timed out after {settings.webhook_timeout_s:g} s"
    except (OSError, http.client.HTTPException) as exc:
        error = f"{type(exc).__name__}: {exc}"
    duration_ms = int((time.monotonic() - started) * 1000)
    with database.transaction() as session:
        locked = session.get(WebhookDelivery, delivery_id, with_for_update=True)
        if locked is None or locked.state != "pending":
            return "skipped"
        record_attempt(
            locked,
            ok=error is None,
            status=status,
            error=error,
            duration_ms=duration_ms,
            max_attempts=locked.attempts + 1 if permanent else settings.webhook_max_attempts,
            retry_in_s=retry_backoff_s(
                locked.attempts + 1,
                base_s=settings.webhook_backoff_base_s,
                cap_s=settings.webhook_backoff_max_s,
            ),
        )
        state = locked.state
    log.info("webhook %s: %s (%s)", delivery_id, state, error or status)
    return state


def dispatch(settings: Settings, database: Database, celery: Celery) -> int:
    """Hand due messages to the `webhooks` queue; returns how many. A message whose task is
    lost becomes due again once its claim (a few send timeouts) runs out."""
    with database.transaction() as session:
        ids = due_deliveries(session, claim_for_s=3 * settings.webhook_timeout_s + 5)
    for delivery_id in ids:
        celery.send_task(DELIVER_WEBHOOK_TASK, args=[delivery_id], queue=WEBHOOK_QUEUE, retry=False)
    return len(ids)


def register(app: Celery, settings: Settings, database: Database) -> Any:
    """Register the `deliver_webhook` task on a worker's Celery app."""

    @app.task(name=DELIVER_WEBHOOK_TASK, acks_late=True, ignore_result=True)
    def deliver_webhook(delivery_id: str) -> str:
        return deliver(settings, database, delivery_id)

    return deliver_webhook
