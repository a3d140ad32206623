"""Health: `GET /v1/health/live` (this process answers), `GET /v1/health/ready` (genq can run
jobs: its database and broker answer, a worker that reaches Ray consumes each queue, and the
periodic scheduler runs), and `GET /v1/health` (the database and the broker, as before).

Readiness learns about the workers, Ray and the scheduler from the heartbeats they write to
Redis (scheduler/heartbeats.py): the API process never talks to Ray. Each part has a `status`
(`ok` or what is wrong) and `age_s`, the seconds since it was last seen healthy (null: never).
The endpoints need no key, so they give counts and ages, not host names or error text; the
admin dashboard shows each worker (api/dashboard/health.py), and failures are logged.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from flask import Blueprint, Response, current_app, jsonify
from sqlalchemy import text

from api.auth import public
from api.problems import problem_response
from api.state import genq
from scheduler.enqueue import (
    QUEUES,
    RAY_QUEUES,
    SCHEDULER_INDEX,
    WORKER_INDEX,
    read_heartbeats,
    read_seen,
)

log = logging.getLogger(__name__)

bp = Blueprint("health", __name__, url_prefix="/v1")

# Where an app keeps when it last reached its database and broker (age_s while they are away).
LAST_OK = "genq.health.last_ok"
_last_ok_lock = threading.Lock()


def check_database() -> str:
    try:
        with genq().database.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception:
        log.exception("health: the database did not answer")
        return "unreachable"
    return "ok"


def check_broker() -> str:
    try:
        genq().publisher.redis.ping()
    except Exception:
        log.exception("health: the broker's Redis did not answer")
        return "unreachable"
    return "ok"


def _age(now: float, seen_at: float | None) -> float | None:
    return None if seen_at is None else round(max(0.0, now - seen_at), 3)


def _direct(name: str, status: str, now: float) -> dict[str, Any]:
    with _last_ok_lock:
        last_ok: dict[str, float] = current_app.extensions.setdefault(LAST_OK, {})
        if status == "ok":
            last_ok[name] = now
        seen = last_ok.get(name)
    return {"status": status, "age_s": _age(now, seen)}


def _workers(beats: list[dict[str, Any]], seen: dict[str, float], now: float) -> dict[str, Any]:
    queues: dict[str, Any] = {}
    for queue in QUEUES:
        mine = [b for b in beats if queue in b.get("queues", [])]
        able = [b for b in mine if b.get("ray_ok") or queue not in RAY_QUEUES]
        if able:
            status = "ok"
        elif mine:
            status = "no worker reaches ray"
        else:
            status = "no worker"
        queues[queue] = {
            "status": status,
            "workers": len(mine),
            "age_s": _age(now, max((b["at"] for b in able), default=seen.get(f"queue:{queue}"))),
        }
    down = [q for q, part in queues.items() if part["status"] != "ok"]
    ages = [part["age_s"] for q, part in queues.items() if q in down or not down]
    return {
        "status": "ok" if not down else "down",
        "age_s": None if None in ages else max(ages, default=None),
        "queues": queues,
    }


def _ray(beats: list[dict[str, Any]], seen: dict[str, float], now: float) -> dict[str, Any]:
    reaching = sum(1 for b in beats if b.get("ray_ok"))
    if not beats:
        status = "unknown: no worker reports"
    elif reaching < len(beats):
        status = "unreachable"
    else:
        status = "ok"
    return {
        "status": status,
        "age_s": _age(now, seen.get("ray")),
        "workers_reaching": reaching,
        "workers_not_reaching": len(beats) - reaching,
    }


def scheduler_part(
    beats: list[dict[str, Any]], seen: dict[str, float], now: float
) -> dict[str, Any]:
    """Readiness's `scheduler` part from the schedulers' live heartbeats and the parts' seen
    times (scheduler/heartbeats.py), at `now`."""
    if any(b.get("ok") for b in beats):
        status = "ok"
    elif beats:
        status = "failing"
    else:
        status = "down"
    # A healthy round's own beat says when it was seen healthy, as a worker's does: the seen
    # record, read before the beats, may not yet hold the round that wrote them.
    seen_at = max((b["at"] for b in beats if b.get("ok")), default=seen.get("scheduler"))
    return {"status": status, "age_s": _age(now, seen_at), "running": len(beats)}


def worker_heartbeats() -> list[dict[str, Any]]:
    """Each live worker once (its heartbeat for one queue; all carry the same fields)."""
    by_process: dict[tuple[str, int], dict[str, Any]] = {}
    for beat in read_heartbeats(genq().publisher.redis, WORKER_INDEX):
        by_process[(str(beat.get("hostname")), int(beat.get("pid", 0)))] = beat
    return sorted(by_process.values(), key=lambda b: (str(b.get("hostname")), b.get("pid", 0)))


def readiness() -> tuple[bool, dict[str, Any]]:
    """Whether genq can run jobs now, and each part's status and age."""
    now = time.time()
    parts: dict[str, Any] = {
        "database": _direct("database", check_database(), now),
        "broker": _direct("broker", check_broker(), now),
    }
    if parts["broker"]["status"] == "ok":
        try:
            client = genq().publisher.redis
            seen = read_seen(client)
            workers = worker_heartbeats()
            schedulers = read_heartbeats(client, SCHEDULER_INDEX)
            parts["workers"] = _workers(workers, seen, now)
            parts["ray"] = _ray(workers, seen, now)
            parts["scheduler"] = scheduler_part(schedulers, seen, now)
        except Exception:  # the broker went away between the ping and the reads
            log.exception("health: could not read the heartbeats")
    for name in ("workers", "ray", "scheduler"):
        parts.setdefault(name, {"status": "unknown: the broker is unreachable", "age_s": None})
    return all(p["status"] == "ok" for p in parts.values()), parts


def not_ready_detail(parts: dict[str, Any]) -> str:
    """`not ready: workers (generate: no worker), scheduler (down)`."""
    named = []
    for name, part in parts.items():
        if part["status"] == "ok":
            continue
        if name == "workers" and "queues" in part:
            queues = ", ".join(
                f"{q}: {p['status']}" for q, p in part["queues"].items() if p["status"] != "ok"
            )
            named.append(f"workers ({queues})")
        else:
            named.append(f"{name} ({part['status']})")
    return "not ready: " + "; ".join(named)


@bp.get("/health/live")
@public
def live() -> Response:
    return jsonify({"status": "alive"})


@bp.get("/health/ready")
@public
def ready() -> Response:
    is_ready, parts = readiness()
    if is_ready:
        return jsonify({"status": "ready", "parts": parts})
    return problem_response(
        503, "not-ready", "Not ready", not_ready_detail(parts), extra={"parts": parts}
    )


@bp.get("/health")
@public
def health() -> Response:
    checks = {"database": check_database(), "broker": check_broker()}
    if all(v == "ok" for v in checks.values()):
        return jsonify({"status": "ok", "checks": checks})
    failed = ", ".join(name for name, v in checks.items() if v != "ok")
    return problem_response(
        503,
        "unavailable",
        "Service unavailable",
        f"unreachable: {failed}",
        extra={"checks": checks},
    )
