"""A webhook receiver for tests: a real HTTP server's handler that records what it receives
and answers as told (slowly, failing first, redirecting), and a receiver's signature check
written from the Standard Webhooks spec."""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1 that records what it receives and answers as told."""

    status: int = 204
    # When set, a request is answered only once the test sets this event (a receiver slower
    # than any timeout, with no clock involved).
    hold: threading.Event | None = None
    location: str = ""
    # Answer 500 to this many requests first, then `status`.
    fail_first: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    answered: int = 0
    url: str = ""

    def handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "body": body}
                )
                if receiver.hold is not None:
                    receiver.hold.wait(300)
                failing = len(receiver.requests) <= receiver.fail_first
                self.send_response(500 if failing else receiver.status)
                if receiver.location:
                    self.send_header("Location", receiver.location)
                self.send_header("Content-Length", "0")
                self.end_headers()
                receiver.answered += 1

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """A receiver's check, written from the Standard Webhooks spec, not from genq's code."""
    key = base64.b64decode(secret.split("_", 1)[1])
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(
        part.split(",", 1)[1] == expected for part in headers["webhook-signature"].split(" ")
    )
