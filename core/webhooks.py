"""Webhooks without the HTTP: which job events become a message, the outbox rows that carry
them, the Standard Webhooks signature, and the check that a target is not an internal address.

A delivery row is written in the same transaction as the job event it tells of, so a message is
never lost between a commit and a send, and its id (the `webhook-id` header) stays the same
across retries, which lets a receiver drop repeats. The scheduler sends the rows
(`scheduler/webhooks.py`). A target is checked at submit and again right before each send,
because a name may resolve to another address later (DNS rebinding).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import socket
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.ids import new_id
from core.tables import Job, WebhookDelivery, utcnow

EVENTS = ("start", "progress", "output", "completed", "preempted")
TERMINAL_STATES = ("succeeded", "failed", "canceled")
# Cloud metadata services that are not covered by the private and link-local ranges.
METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("fd00:ec2::254"), ipaddress.ip_address("100.100.100.200")}
)


class UnsafeTargetError(ValueError):
    """The webhook URL is not http(s) or resolves to an internal address."""


class UnresolvedTargetError(OSError):
    """The webhook's host does not resolve now (perhaps only for now: DNS fails too)."""


def webhook_event_for(type_: str, data: dict[str, Any]) -> str | None:
    """The webhook event (start, progress, output, completed, preempted) a job event is, or
    None. `preempted`: a running job went back to the queue to make room (core/preemption.py)."""
    if type_ == "state":
        if data.get("to") == "running":
            return "start"
        if data.get("to") == "queued" and data.get("reason") == "preempted":
            return "preempted"
        if data.get("to") in TERMINAL_STATES:
            return "completed"
        return None
    if type_ in ("progress", "output"):
        return type_
    return None


def enqueue_delivery(
    session: Session, job: Job, type_: str, data: dict[str, Any]
) -> WebhookDelivery | None:
    """Add the delivery row for this job event if the job has a webhook that wants it."""
    event = webhook_event_for(type_, data)
    if event is None or not job.webhook:
        return None
    if job.webhook_events is not None and event not in job.webhook_events:
        return None
    now = utcnow()
    delivery_id = f"msg_{new_id().replace('-', '')}"
    payload = {
        "type": f"job.{event}",
        "timestamp": now.isoformat(),
        "data": {"job_id": job.id, "kind": job.kind, "event": type_, **data},
    }
    row = WebhookDelivery(
        id=delivery_id,
        job_id=job.id,
        tenant_id=job.tenant_id,
        event=event,
        url=job.webhook,
        payload=payload,
        state="pending",
        attempts=0,
        next_attempt_at=now,
        log=[],
        created_at=now,
    )
    session.add(row)
    return row


def due_deliveries(session: Session, *, claim_for_s: float, limit: int = 200) -> list[str]:
    """Pending deliveries whose time has come, pushed `claim_for_s` into the future so that
    the next round does not send them again while this one is in flight."""
    now = utcnow()
    rows = session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.state == "pending", WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    for row in rows:
        row.next_attempt_at = now + timedelta(seconds=claim_for_s)
    return [row.id for row in rows]


def record_attempt(
    row: WebhookDelivery,
    *,
    ok: bool,
    status: int | None,
    error: str | None,
    duration_ms: int,
    max_attempts: int,
    retry_in_s: float,
) -> None:
    """Append one attempt to the delivery's log and decide what comes next."""
    now = utcnow()
    row.attempts += 1
    entry = {
        "attempt": row.attempts,
        "at": now.isoformat(),
        "status": status,
        "error": error,
        "duration_ms": duration_ms,
    }
    row.log = [*(row.log or []), entry]
    if ok:
        row.state = "delivered"
        row.delivered_at = now
    elif row.attempts >= max_attempts:
        row.state = "failed"
    else:
        row.next_attempt_at = now + timedelta(seconds=retry_in_s)


def tenant_secret(secret_key: str, tenant_id: str) -> str:
    """The tenant's signing secret, `whsec_` + base64 of 32 bytes, derived from the server's
    secret key so every process computes the same one without storing it."""
    raw = hmac.new(secret_key.encode(), f"webhook:{tenant_id}".encode(), hashlib.sha256).digest()
    return "whsec_" + base64.b64encode(raw).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value: `v1,` + base64 HMAC-SHA256 of `id.timestamp.body`
    keyed with the secret's base64-decoded bytes (Standard Webhooks)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


# IPv6 prefixes that carry an IPv4 address which a gateway may reach on our behalf: NAT64's
# well-known prefix (RFC 6052, the IPv4 address in the last 32 bits) and 6to4 (RFC 3056, in
# bits 16-48), besides IPv4-mapped and Teredo. NAT64's local-use prefix (RFC 8215) is for a
# site's own translators, so every address in it counts as internal.
NAT64_PREFIXES = (ipaddress.ip_network("64:ff9b::/96"),)
NAT64_LOCAL_USE = ipaddress.ip_network("64:ff9b:1::/48")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, NAT64, 6to4, Teredo), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if any(ip in prefix for prefix in NAT64_PREFIXES):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def is_internal(address: str) -> bool:
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in NAT64_LOCAL_USE:
            return True
        inner = embedded_ipv4(ip)
        if inner is not None:
            ip = inner
    return (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_reserved
        or ip.is_multicast
        or ip.is_unspecified
        or ip in METADATA_ADDRESSES
        or ip in ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT, often internal
    )


def check_target(url: str, *, allow_private: bool) -> list[str]:
    """The addresses `url`'s host resolves to; UnsafeTargetError if it is not http(s) or any
    address is loopback, private, link-local or a metadata service (unless `allow_private`, for
    local development); UnresolvedTargetError if the host does not resolve."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeTargetError("must be an http or https URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UnsafeTargetError("has an invalid port") from None
    try:
        infos = socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnresolvedTargetError(f"host {parts.hostname!r} does not resolve: {exc}") from None
    addresses = sorted({str(info[4][0]) for info in infos})
    if not addresses:
        raise UnresolvedTargetError(f"host {parts.hostname!r} does not resolve")
    if not allow_private:
        bad = [a for a in addresses if is_internal(a)]
        if bad:
            raise UnsafeTargetError(
                f"host {parts.hostname!r} resolves to an internal address ({bad[0]}); "
                "webhooks may only target public addresses"
            )
    return addresses


def deliveries_of(session: Session, job_id: str) -> list[WebhookDelivery]:
    return list(
        session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.job_id == job_id)
            .order_by(WebhookDelivery.created_at, WebhookDelivery.id)
        )
    )


def timestamp(now: datetime | None = None) -> int:
    return int((now or utcnow()).timestamp())
