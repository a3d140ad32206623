"""Publishing (scheduler/enqueue.py) on a real Redis: a job's marker and its message go out
together, and the marker's headers never reach the broker."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from core.settings import Settings
from scheduler.broker import PUBLISHED_KEY, make_celery
from scheduler.enqueue import MARKER_HEADER, MARKER_TTL_HEADER, Publication, Publisher


@pytest.fixture
def settings(redis_db_url: str, tmp_path: Path) -> Settings:
    return Settings(var_dir=tmp_path, redis_url=redis_db_url)


@pytest.fixture
def broker(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.broker_url)
    yield client
    client.close()


def _messages(broker: redis.Redis, key: str) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(raw) for raw in broker.lrange(key, 0, -1)]


def test_the_marker_and_the_message_go_out_together(
    settings: Settings, broker: redis.Redis
) -> None:
    publisher = Publisher(settings)
    try:
        assert publisher.marks_with_message
        assert publisher.publish(None, [Publication("job-1", "generate")], mark=False) == [  # type: ignore[arg-type]
            "job-1"
        ]
    finally:
        publisher.close()
    marker = PUBLISHED_KEY.format(job_id="job-1")
    assert broker.get(marker) == b"1"
    assert 0 < broker.ttl(marker) <= settings.visibility_timeout_s * 2
    (message,) = _messages(broker, "generate:4")
    assert message["headers"]["task"] == "genq.run_job"
    assert MARKER_HEADER not in message["headers"]
    assert MARKER_TTL_HEADER not in message["headers"]


def test_a_publisher_on_a_workers_app_sets_the_marker_first(
    settings: Settings, broker: redis.Redis
) -> None:
    app = make_celery(settings)
    publisher = Publisher(settings, app)
    try:
        assert not publisher.marks_with_message
        publisher.publish(None, [Publication("job-2", "generate")], mark=False)  # type: ignore[arg-type]
    finally:
        publisher.close()
    assert broker.get(PUBLISHED_KEY.format(job_id="job-2")) == b"1"
    (message,) = _messages(broker, "generate:4")
    assert MARKER_HEADER not in message["headers"]


def test_no_marker_is_left_when_the_broker_is_down(tmp_path: Path) -> None:
    down = Settings(var_dir=tmp_path, redis_url="redis://127.0.0.1:1/0")
    publisher = Publisher(down)
    try:
        assert publisher.publish(None, [Publication("job-3", "generate")], mark=False) == []  # type: ignore[arg-type]
    finally:
        publisher.close()
