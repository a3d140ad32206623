"""The Celery app and the broker's Redis. Only job ids cross the broker, as JSON.

`make_celery` is called by each entry point with its settings (the API to publish, `genq worker`
to consume); nothing here reads configuration at import time.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from celery import Celery

from core.settings import Settings

RUN_JOB_TASK = "genq.run_job"
DELIVER_WEBHOOK_TASK = "genq.deliver_webhook"
# Loads a pretrained model registered with POST /v1/models in a Ray task and marks it ready or
# failed. It goes to the `train` queue: like training, it is rare and may take minutes.
CHECK_MODEL_TASK = "genq.check_model"
CHECK_MODEL_QUEUE = "train"
# Webhook messages have their own queue, so a slow receiver never delays a job.
WEBHOOK_QUEUE = "webhooks"
QUEUES = ("generate", "train", WEBHOOK_QUEUE)
# Every task a genq worker runs; a message naming anything else is dropped (scheduler/intake.py).
TASK_NAMES = frozenset({RUN_JOB_TASK, DELIVER_WEBHOOK_TASK, CHECK_MODEL_TASK})
# Messages a worker dropped as malformed: a hash of reason -> count since the Redis started,
# and the latest ones (JSON, newest first) for the admin.
DROPPED_KEY = "genq:dropped_messages"
DROPPED_RECENT_KEY = "genq:dropped_messages:recent"
DROPPED_RECENT_MAX = 50
# Set when a job's id is handed to the broker, deleted when the job is claimed. A queued job
# without one has lost its message (broker restarted, crash between commit and publish).
PUBLISHED_KEY = "genq:published:{job_id}"


def queue_for_kind(kind: str) -> str:
    """Generation and training get separate queues, so a long training job never sits in
    front of short generations."""
    return "generate" if kind == "generate" else "train"


def celery_priority(priority: int) -> int:
    """genq priority 0-9 (9 most urgent) -> Celery-on-Redis priority (0 is served first)."""
    return 9 - max(0, min(9, priority))


def make_celery(settings: Settings) -> Celery:
    app = Celery("genq", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        # The reaper, not the broker, decides what happens to a job whose worker died.
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        worker_pool="threads",
        worker_concurrency=settings.worker_concurrency,
        # Ray's log streaming needs the real stdout of the worker process.
        worker_redirect_stdouts=False,
        worker_hijack_root_logger=False,
        task_default_queue="generate",
        task_create_missing_queues=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            # Sweep for messages past their visibility timeout every few seconds (kombu's
            # default is about 100 s), so a re-delivery comes close to when it is due.
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 4)),
            "unacked_restore_throttle": 1,
            "priority_steps": list(range(10)),
            "sep": ":",
            "queue_order_strategy": "priority",
        },
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


def redis_client(settings: Settings) -> redis.Redis:
    """A plain Redis client for the broker's Redis (markers, queue depth)."""
    url = settings.broker_url
    # A Redis that stops answering must not hang a health check or a publish.
    timeout_s = 5.0
    if url.startswith("redis+socket://"):
        return redis.Redis(
            unix_socket_path=url[len("redis+socket://") :],
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)


def record_dropped(
    client: redis.Redis, reason: str, detail: str, queue: str | None, excerpt: str = ""
) -> None:
    """Count a message a worker dropped; never raises (the worker must go on consuming)."""
    entry = {
        "at": time.time(),
        "reason": reason,
        "detail": detail[:300],
        "queue": queue,
        "excerpt": excerpt[:200],
    }
    try:
        pipe = client.pipeline(transaction=False)
        pipe.hincrby(DROPPED_KEY, reason, 1)
        pipe.lpush(DROPPED_RECENT_KEY, json.dumps(entry))
        pipe.ltrim(DROPPED_RECENT_KEY, 0, DROPPED_RECENT_MAX - 1)
        pipe.execute()
    except Exception:  # noqa: BLE001 - counting is best effort; the drop was logged
        pass


def read_dropped(client: redis.Redis) -> dict[str, Any]:
    """What workers dropped: counts by reason, the total, and the latest messages."""
    counts = {
        (k.decode() if isinstance(k, bytes) else str(k)): int(v)
        for k, v in client.hgetall(DROPPED_KEY).items()
    }
    recent = [json.loads(item) for item in client.lrange(DROPPED_RECENT_KEY, 0, -1)]
    return {"total": sum(counts.values()), "by_reason": counts, "recent": recent}
