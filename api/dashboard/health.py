"""The dashboard's health page: what `GET /v1/health/ready` answers (each part's status and
age, each queue's workers) and, for the admin only, each worker (host, node, pid, queues,
whether it reaches Ray and why not) and each periodic scheduler, from their heartbeats
(scheduler/heartbeats.py).
"""

from __future__ import annotations

import time
from typing import Any

from flask import render_template

from api.dashboard import bp
from api.health import readiness, worker_heartbeats
from api.state import genq
from scheduler.enqueue import SCHEDULER_INDEX, read_heartbeats


@bp.get("/health")
def health() -> str:
    is_ready, parts = readiness()
    workers: list[dict[str, Any]] = []
    schedulers: list[dict[str, Any]] = []
    if parts["broker"]["status"] == "ok":
        try:
            workers = worker_heartbeats()
            schedulers = read_heartbeats(genq().publisher.redis, SCHEDULER_INDEX)
        except Exception:  # the broker went away since: the parts above say so
            workers, schedulers = [], []
    now = time.time()
    for beat in workers + schedulers:
        beat["age_s"] = max(0.0, now - float(beat.get("at", now)))
    return render_template(
        "dashboard/health.html",
        is_ready=is_ready,
        parts=parts,
        workers=workers,
        schedulers=sorted(schedulers, key=lambda b: (str(b.get("hostname")), b.get("pid", 0))),
    )
