"""Health over the API with a real Redis and real SQL: liveness needs nothing; readiness names
the database when it is down, the workers and the periodic scheduler when none runs, and Ray
when the worker that consumes the queues cannot reach it. The heartbeats are written by the
code the worker and the scheduler run (scheduler/heartbeats.py, scheduler/periodic.py).
tests/stack/test_ops_stack.py sees readiness on a real `genq up`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask

from api.app import create_app
from api.health import scheduler_part
from core.db import Database
from core.settings import Settings
from scheduler.broker import QUEUES
from scheduler.enqueue import Publisher
from scheduler.heartbeats import WORKER_INDEX, WorkerHeartbeat
from scheduler.periodic import Periodic

PG_URL = os.environ.get("GENQ_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _settings(tmp_path: Path, redis_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "var_dir": tmp_path / "var",
        "redis_url": redis_url,
        "artifact_root": tmp_path / "artifacts",
        "rate_limits": False,
        "health_heartbeat_interval_s": 0.5,
    }
    return Settings(_env_file=None, **{**values, **overrides})  # type: ignore[call-arg]


# tests/api/conftest.py's database, broker, publisher and app, on these settings: SQLite only, a
# new database at the migrations' head, heartbeats every half second.
@pytest.fixture
def settings(tmp_path: Path, redis_db_url: str, new_database: Callable[[str], str]) -> Settings:
    return _settings(tmp_path, redis_db_url, database_url=new_database("sqlite"))


def _ready(app: Flask) -> tuple[int, dict[str, Any]]:
    response = app.test_client().get("/v1/health/ready")
    if response.status_code == 503:
        assert response.mimetype == "application/problem+json"
        assert response.headers["X-Request-ID"]
    return response.status_code, dict(response.get_json(force=True))


def _wait_ready_part(app: Flask, part: str, status: str, timeout_s: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        _, body = _ready(app)
        if body["parts"][part]["status"] == status:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.1)


def test_live_answers_while_the_database_and_the_broker_are_down(tmp_path: Path) -> None:
    down = _settings(
        tmp_path,
        "redis://127.0.0.1:1/0",
        database_url="postgresql://postgres@127.0.0.1:1/nothing",
    )
    app = create_app(down)
    live = app.test_client().get("/v1/health/live")
    assert live.status_code == 200
    assert live.get_json() == {"status": "alive"}
    status, body = _ready(app)
    assert status == 503
    parts = body["parts"]
    assert parts["database"] == {"status": "unreachable", "age_s": None}
    assert parts["broker"] == {"status": "unreachable", "age_s": None}
    for name in ("workers", "ray", "scheduler"):
        assert parts[name]["status"].startswith("unknown"), parts[name]


def test_ready_names_the_database_when_it_is_down(
    tmp_path: Path, database: Database, publisher: Publisher, settings: Settings
) -> None:
    app = create_app(settings, database=database, publisher=publisher)
    assert _ready(app)[1]["parts"]["database"]["status"] == "ok"  # seen once by this process
    dead = Database(settings.model_copy(update={"database_url": f"{PG_URL.rsplit(':', 1)[0]}:1/x"}))
    try:
        app.extensions["genq"].database = dead  # the same app, its database gone away
        status, body = _ready(app)
    finally:
        dead.dispose()
    assert status == 503
    assert body["type"] == "not-ready"
    assert "database (unreachable)" in body["detail"]
    part = body["parts"]["database"]
    assert part["status"] == "unreachable"
    assert part["age_s"] is not None and part["age_s"] >= 0  # when it was last seen healthy
    assert body["parts"]["broker"]["status"] == "ok"


def test_ready_names_the_workers_and_the_scheduler_when_none_runs(app: Flask) -> None:
    status, body = _ready(app)
    assert status == 503
    assert body["parts"]["database"]["status"] == "ok"
    assert body["parts"]["broker"]["status"] == "ok"
    workers = body["parts"]["workers"]
    assert workers["status"] == "down"
    assert set(workers["queues"]) == set(QUEUES)
    for queue in QUEUES:
        assert workers["queues"][queue] == {"status": "no worker", "workers": 0, "age_s": None}
    assert body["parts"]["scheduler"] == {"status": "down", "age_s": None, "running": 0}
    assert "workers (generate: no worker, train: no worker, webhooks: no worker)" in body["detail"]
    assert "scheduler (down)" in body["detail"]


def test_the_scheduler_is_ready_while_its_rounds_run_and_down_once_it_stops(
    app: Flask, settings: Settings, database: Database, publisher: Publisher
) -> None:
    periodic = Periodic(settings, database, publisher)
    stop = threading.Event()
    thread = threading.Thread(target=periodic.run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        body = _wait_ready_part(app, "scheduler", "ok")
        assert body["parts"]["scheduler"]["running"] == 1
        assert body["parts"]["scheduler"]["age_s"] < 30
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    # A scheduler that stops cleanly is gone at once; the age says since when.
    status, body = _ready(app)
    assert status == 503
    assert body["parts"]["scheduler"]["status"] == "down"
    assert body["parts"]["scheduler"]["age_s"] is not None
    assert "scheduler (down)" in body["detail"]


def test_a_worker_that_cannot_reach_ray_is_not_ready(
    app: Flask, settings: Settings, broker: redis.Redis
) -> None:
    import ray

    assert not ray.is_initialized()  # this process has no Ray connection: the probe says so
    heartbeat = WorkerHeartbeat(settings, broker, "celery@no-ray", QUEUES)
    heartbeat.start()
    try:
        body = _wait_ready_part(app, "ray", "unreachable")
        ray_part = body["parts"]["ray"]
        assert ray_part["workers_not_reaching"] == 1 and ray_part["workers_reaching"] == 0
        assert ray_part["age_s"] is None  # never seen
        queues = body["parts"]["workers"]["queues"]
        # The jobs of generate and train run on Ray: this worker cannot serve them.
        assert queues["generate"]["status"] == "no worker reaches ray"
        assert queues["train"]["status"] == "no worker reaches ray"
        assert queues["generate"]["workers"] == 1
        # Webhooks need no Ray.
        assert queues["webhooks"]["status"] == "ok"
        assert "ray (unreachable)" in body["detail"]
        assert "generate: no worker reaches ray" in body["detail"]
        beat = heartbeat.write_once()
        assert beat["ray_ok"] is False and beat["ray_error"] == "not connected to Ray"
    finally:
        heartbeat.stop()
    # Gone at once when it stops.
    assert list(broker.scan_iter(match="genq:health:worker:*")) == []
    assert broker.zcard(WORKER_INDEX) == 0
    body = _wait_ready_part(app, "ray", "unknown: no worker reports")
    assert body["parts"]["workers"]["queues"]["webhooks"]["status"] == "no worker"
    assert body["parts"]["workers"]["queues"]["webhooks"]["age_s"] is not None


def test_the_old_health_endpoint_still_checks_only_the_database_and_broker(app: Flask) -> None:
    response = app.test_client().get("/v1/health")
    assert response.status_code == 200  # no worker runs, and it does not look
    assert response.get_json() == {"status": "ok", "checks": {"database": "ok", "broker": "ok"}}


def test_a_scheduler_whose_rounds_fail_is_failing(
    app: Flask, settings: Settings, publisher: Publisher
) -> None:
    # Its own database is away (as when the scheduler's host cannot reach it): every round
    # raises, the heartbeat says so, and readiness names it although the API's database is up.
    dead = Database(settings.model_copy(update={"database_url": f"{PG_URL.rsplit(':', 1)[0]}:1/x"}))
    periodic = Periodic(settings, dead, publisher)
    stop = threading.Event()
    thread = threading.Thread(target=periodic.run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        body = _wait_ready_part(app, "scheduler", "failing")
    finally:
        stop.set()
        thread.join(30)
        dead.dispose()
    assert body["parts"]["database"]["status"] == "ok"
    assert body["parts"]["scheduler"]["running"] == 1
    assert body["parts"]["scheduler"]["age_s"] is None  # never seen succeeding
    assert "scheduler (failing)" in body["detail"]


def test_a_healthy_scheduler_beat_gives_its_age_before_the_seen_record_has_it() -> None:
    """Readiness reads the seen record before the beats: a round that wrote both in between
    shows in the beats only, and its own time is when the scheduler was seen healthy."""
    now = time.time()
    part = scheduler_part([{"ok": True, "at": now - 2.0}], {}, now)
    assert part == {"status": "ok", "age_s": 2.0, "running": 1}
    failing = scheduler_part([{"ok": False, "at": now}], {"scheduler": now - 5.0}, now)
    assert failing == {"status": "failing", "age_s": 5.0, "running": 1}
