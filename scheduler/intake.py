"""Broker messages are untrusted input: what a genq worker does with anything on its queues.

Whoever can write to the broker's Redis can put any bytes on a queue list. Celery and kombu
assume a well-formed message: a list item that is not a kombu envelope (the number 5, raw
bytes) raises inside the transport, and a task message whose body is not `[args, kwargs,
embed]` raises inside Celery's task strategy ("argument of type 'int' is not iterable"); either
stops the worker's consumer (`genq up` restarts the worker). With a persistent Redis the
message is restored and stops the next worker too, for ever.

Two guards stand in front of Celery, one per layer:

- `GuardedRedisTransport` (the consumer's connection): a popped list item that is not JSON or
  not a kombu envelope is logged, counted and dropped. It was removed from Redis by BRPOP and
  never entered kombu's unacked set, so nothing restores it.
- `GuardedConsumer` (Celery's `worker_consumer`): a kombu message must name one of genq's tasks,
  be JSON, and carry exactly one id string as its only argument; anything else is acknowledged,
  logged and counted before Celery's strategy sees it, and an error from the strategy itself
  drops the message the same way instead of stopping the consumer.

A well-formed message for a job id that does not exist is the task's business: the runner
finds no row, and the task counts it (`unknown_job`). Counts live in Redis (scheduler/broker.py
`record_dropped`); admins read them at `GET /v1/admin/dropped-messages` and on the dashboard.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import redis
from celery.worker.consumer import Consumer
from kombu.transport import redis as kombu_redis

from scheduler.broker import TASK_NAMES, record_dropped

log = logging.getLogger(__name__)

# Job, delivery and model ids are ULID-like strings; anything much longer is not ours.
MAX_ID_CHARS = 64


def describe_envelope(raw: Any) -> str | None:
    """What is wrong with a popped list item as a kombu envelope, or None if it is one."""
    if not isinstance(raw, dict):
        return f"not a message envelope (a JSON {type(raw).__name__})"
    properties = raw.get("properties")
    if not isinstance(properties, dict):
        return "envelope without properties"
    if not isinstance(properties.get("delivery_tag"), str):
        return "envelope without a delivery tag"
    if not isinstance(properties.get("delivery_info"), dict):
        return "envelope without delivery info"
    if properties.get("body_encoding", "base64") != "base64":
        return "body encoding is not base64"
    if not isinstance(raw.get("body", ""), str):
        return "body is not a string"
    if not isinstance(raw.get("headers") or {}, dict):
        return "headers are not an object"
    return None


def describe_task(headers: Any, content_type: Any, body: Any) -> str | None:
    """What is wrong with a kombu message as a genq task, or None if it is one."""
    if not isinstance(headers, dict) or "task" not in headers:
        return "not a task message (no task header)"
    name = headers["task"]
    if name not in TASK_NAMES:
        return f"unknown task {str(name)[:80]!r}"
    if not isinstance(headers.get("id"), str):
        return "task message without an id"
    if content_type != "application/json":
        return f"content type {str(content_type)[:80]!r} is not JSON"
    try:
        decoded = json.loads(body)
    except (TypeError, ValueError, UnicodeDecodeError):
        return "body is not JSON"
    if not (isinstance(decoded, list) and len(decoded) == 3):
        return "body is not [args, kwargs, embed]"
    args, kwargs, embed = decoded
    if not (isinstance(args, list) and len(args) == 1 and isinstance(args[0], str)):
        return "args are not one id string"
    if not 0 < len(args[0]) <= MAX_ID_CHARS:
        return f"id is not 1-{MAX_ID_CHARS} characters"
    if kwargs != {}:
        return "unexpected keyword arguments"
    if not isinstance(embed, dict):
        return "embed is not an object"
    return None


def _excerpt(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text[:200]


class GuardedChannel(kombu_redis.Channel):  # type: ignore[misc]
    """kombu's Redis channel, which drops list items that are not kombu envelopes."""

    def _brpop_read(self, **options: Any) -> bool:
        try:
            return bool(super()._brpop_read(**options))
        except (kombu_redis.Empty, *self.connection_errors):
            raise
        except Exception as exc:
            # Raised between BRPOP and the consumer callback: the item is not JSON (the
            # callback below guards everything after that). It is already off the list.
            self._drop("unreadable", f"list item is not a JSON message: {exc}", None)
            return True

    def basic_consume(self, queue: str, no_ack: bool, callback: Any, consumer_tag: Any, **kw: Any):  # type: ignore[no-untyped-def]
        result = super().basic_consume(queue, no_ack, callback, consumer_tag, **kw)
        deliver = self.connection._callbacks[queue]

        def guarded(raw: Any) -> Any:
            problem = describe_envelope(raw)
            if problem is None:
                try:
                    return deliver(raw)
                except Exception as exc:  # the envelope did not make a kombu Message
                    problem = f"bad envelope: {exc}"
            self._drop("not_an_envelope", problem, queue, raw)
            return None

        self.connection._callbacks[queue] = guarded
        return result

    def _drop(self, reason: str, detail: str, queue: str | None, raw: Any = None) -> None:
        log.error("dropped a broker message on %s: %s: %s", queue, detail, _excerpt(raw))
        record_dropped(self.client, reason, detail, queue, _excerpt(raw))


class GuardedRedisTransport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = GuardedChannel


class GuardedConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, which refuses anything that is not a well-formed genq task."""

    def connection_for_read(self, heartbeat: float | None = None) -> Any:
        conn = self.app.connection_for_read(heartbeat=heartbeat)
        if conn.transport_cls in ("redis", "rediss"):
            conn.transport_cls = GuardedRedisTransport
        return self.ensure_connected(conn)

    def create_task_handler(self, promise: Any = None) -> Callable[[Any], None]:
        handle = (
            super().create_task_handler()
            if promise is None
            else super().create_task_handler(promise)
        )

        def on_task_received(message: Any) -> None:
            problem = describe_task(message.headers, message.content_type, message.body)
            if problem is None:
                try:
                    handle(message)
                    return
                except Exception as exc:  # Celery could not make a request of it
                    problem = f"celery refused it: {exc}"
            self.drop(message, "not_a_genq_task", problem)

        return on_task_received

    def drop(self, message: Any, reason: str, detail: str) -> None:
        queue = (message.delivery_info or {}).get("routing_key")
        log.error("dropped a broker message on %s: %s: %s", queue, detail, _excerpt(message.body))
        try:
            if not message.acknowledged:
                message.ack()
        except Exception:  # the channel went away: the message is restored and seen again
            log.warning("could not acknowledge a dropped message", exc_info=True)
        client = getattr(message.channel, "client", None)
        if isinstance(client, redis.Redis):
            record_dropped(client, reason, detail, queue, _excerpt(message.body))
