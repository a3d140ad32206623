"""The baseline for bench/throughput.py: a Celery app with a no-op task on the same Redis,
configured like genq's (JSON, acks_late, prefetch 1). Each task counts itself in Redis so the
benchmark knows when all have run.

    celery -A bench.raw_celery worker --pool=prefork --concurrency=2
"""

from __future__ import annotations

import os

import redis
from celery import Celery

BROKER = os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/12")
COUNTER = "bench:raw:done"

app = Celery("bench_raw", broker=BROKER)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_default_queue="bench-raw",
    worker_hijack_root_logger=False,
)
_redis = redis.Redis.from_url(BROKER)


@app.task(name="bench.noop")
def noop(job_id: str) -> None:
    _redis.incr(COUNTER)
