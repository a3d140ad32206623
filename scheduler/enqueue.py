"""Publishing job ids to the broker, after the job row has been committed; and the scheduler's
one door for the API.

The API and the periodic scheduler import this; it loads Celery's client side but neither Ray
nor torch. A failed publish is not an error for the caller: the row stays `queued` with no
`published_at`, and the reconciler publishes it later.

A job's published marker (`PUBLISHED_KEY`, which the reconciler reads) is set before its
message is pushed, never after: a worker may claim the job and drop the marker at once. The
publisher's own Celery app sends both in one round trip to Redis (`MarkingTransport`: a
MULTI/EXEC of the SET and the LPUSH, so there is a marker exactly when there is a message); a
publisher handed a worker's app sets the marker first, then publishes.

`api/` imports nothing else of `scheduler/`: what it reads of the broker's queues, of the
processes' heartbeats and of the workers' cluster snapshots, and the wake-ups its event streams
wait on, are re-exported here (`__all__`), so the scheduler can move its modules about without
touching the API (docs/architecture.md; `make lint` checks it).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

from core.db import Database
from core.recovery import mark_published
from core.settings import Settings
from scheduler.broker import (
    CHECK_MODEL_QUEUE,
    CHECK_MODEL_TASK,
    PUBLISHED_KEY,
    QUEUES,
    RUN_JOB_TASK,
    WEBHOOK_QUEUE,
    celery_priority,
    make_celery,
    queue_for_kind,
    read_dropped,
    redis_client,
)
from scheduler.heartbeats import (
    RAY_QUEUES,
    SCHEDULER_INDEX,
    WORKER_INDEX,
    read_heartbeats,
    read_seen,
)
from scheduler.snapshot import node_resources, read_snapshots
from scheduler.wakeups import Wakeups

__all__ = [
    "QUEUES",
    "RAY_QUEUES",
    "SCHEDULER_INDEX",
    "WEBHOOK_QUEUE",
    "WORKER_INDEX",
    "Publication",
    "Publisher",
    "Wakeups",
    "node_resources",
    "queue_for_kind",
    "read_dropped",
    "read_heartbeats",
    "read_seen",
    "read_snapshots",
]

log = logging.getLogger(__name__)


# Message headers that carry a job's marker to MarkingChannel, which removes them before the
# message is pushed: they never reach the broker.
MARKER_HEADER = "genq_marker"
MARKER_TTL_HEADER = "genq_marker_ttl_s"


class MarkingChannel(kombu_redis.Channel):  # type: ignore[misc]
    """kombu's Redis channel, which sets the marker a message's headers name in the same
    MULTI/EXEC as the message's LPUSH."""

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        headers = message.get("headers") or {}
        marker = headers.pop(MARKER_HEADER, None)
        ttl_s = headers.pop(MARKER_TTL_HEADER, None)
        if marker is None or kwargs.get("_publish_batch") is not None or self._expires:
            if marker is not None:  # not a path the publisher takes; keep the order
                with self.conn_or_acquire() as client:
                    client.set(marker, "1", ex=ttl_s)
            super()._put(queue, message, **kwargs)
            return
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        with self.conn_or_acquire() as client, client.pipeline(transaction=True) as pipe:
            pipe.set(marker, "1", ex=ttl_s)
            pipe.lpush(key, dumps(message))
            pipe.execute()


class MarkingTransport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = MarkingChannel


@dataclass(frozen=True)
class Publication:
    job_id: str
    queue: str
    priority: int = 5
    countdown_s: float | None = None


class Publisher:
    """Hands job ids to Celery and records that they were handed over."""

    def __init__(self, settings: Settings, celery: Celery | None = None) -> None:
        self.settings = settings
        # Only an app of its own sends markers with the messages: a worker's app (passed in)
        # keeps kombu's transport, which would push a marker's headers to the broker instead.
        self.marks_with_message = celery is None and settings.broker_url.startswith("redis://")
        if celery is None:
            celery = make_celery(settings)
            if self.marks_with_message:
                celery.conf.broker_transport = MarkingTransport
        self.celery = celery
        self.redis: redis.Redis = redis_client(settings)

    def publish(
        self, database: Database, items: Sequence[Publication], *, mark: bool = True
    ) -> list[str]:
        """Publish each job; returns the ids that reached the broker and, with `mark`, records
        that in SQL. A caller that set `published_at` in the job's own transaction passes
        mark=False and clears it for the ids that did not get through (see api/jobs.py)."""
        sent = []
        for item in items:
            marker = PUBLISHED_KEY.format(job_id=item.job_id)
            ttl_s = self.settings.visibility_timeout_s * 2
            headers = None
            try:
                if self.marks_with_message:
                    headers = {MARKER_HEADER: marker, MARKER_TTL_HEADER: ttl_s}
                else:
                    self.redis.set(marker, "1", ex=ttl_s)
                self.celery.send_task(
                    RUN_JOB_TASK,
                    args=[item.job_id],
                    queue=item.queue,
                    priority=celery_priority(item.priority),
                    countdown=item.countdown_s,
                    retry=False,
                    headers=headers,
                    # What Celery's saferepr would write, without its cost.
                    argsrepr=f"[{item.job_id!r}]",
                    kwargsrepr="{}",
                )
                sent.append(item.job_id)
            except Exception as exc:  # the reconciler will publish it later
                log.warning(
                    "publish failed, the reconciler will retry: %s",
                    exc,
                    extra={"job_id": item.job_id},
                )
                # No message went out: a marker left behind would make the reconciler
                # believe one had.
                with contextlib.suppress(Exception):
                    self.redis.delete(marker)
        if sent and mark:
            with database.transaction() as session:
                mark_published(session, sent)
        return sent

    def has_message(self, job_ids: Sequence[str]) -> list[bool]:
        """Whether each job still has a published message waiting or being worked on."""
        if not job_ids:
            return []
        keys = [PUBLISHED_KEY.format(job_id=j) for j in job_ids]
        return [v is not None for v in self.redis.mget(keys)]

    def forget(self, job_id: str) -> None:
        """Drop a job's marker: its message has been consumed by a successful claim."""
        self.redis.delete(PUBLISHED_KEY.format(job_id=job_id))

    def hold(self, job_ids: Sequence[str], ttl_s: float) -> str | None:
        """A token found nothing it may start: count the first of `job_ids` as having a
        message for `ttl_s` more seconds only (then the reconciler sends it a new token), so
        that held work is looked at again without tokens bouncing in a loop. Returns the id."""
        for job_id in job_ids:
            key = PUBLISHED_KEY.format(job_id=job_id)
            # Only a job counted as having a real message; one already held keeps its time.
            if self.redis.get(key) == b"1" and self.redis.set(
                key, "held", ex=max(1, round(ttl_s)), xx=True
            ):
                return job_id
        return None

    def publish_model_check(self, model_id: str) -> bool:
        """Ask a worker to load a newly registered pretrained model; False if the broker did
        not take the message (the caller marks the model failed)."""
        try:
            self.celery.send_task(
                CHECK_MODEL_TASK, args=[model_id], queue=CHECK_MODEL_QUEUE, retry=False
            )
        except Exception as exc:
            log.warning("publishing the check of model %s failed: %s", model_id, exc)
            return False
        return True

    def close(self) -> None:
        self.redis.close()
        self.celery.close()
