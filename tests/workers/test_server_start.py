"""How the runner drives a model server (workers/server.py): `start`, a plain call whose answer
carries a quick job's events to its end, then `follow`, a stream of the rest for a job still
running. An error comes after the events made before it, a cancel reaches a started attempt,
and an attempt nobody reads any more is dropped and stopped. The server runs here as the plain
class (no Ray), with the echo family.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from core.errors import ModelError, TransientError
from core.events import Event, Output, Progress
from workers.families.base import CanceledError
from workers.server import ModelServer, attempt_key

SLOW = {"message": "slow", "delay_s": 600.0, "progress_steps": 600}


def follow_to_end(server: ModelServer, key: str, into: list[Any]) -> None:
    """Read the attempt's stream to its end; its error, if any, is the last item."""
    try:
        into.extend(server.follow(key))
    except (CanceledError, ModelError, TransientError) as exc:
        into.append(exc)


def wait_until(what: str, check: Any) -> None:
    deadline = time.monotonic() + 30
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def read_all(server: ModelServer, job_id: str, params: dict[str, Any], token: str) -> list[Any]:
    """A job's events as the runner reads them: the answer to `start` (a quick job's whole
    run, but how many events it carries depends on timing), then `follow` if it has not
    ended."""
    events, ended = server.start(job_id, params, token, wait_s=30.0)
    items: list[Any] = list(events)
    if not ended:
        follow_to_end(server, attempt_key(job_id, token), items)
    return items


def test_a_quick_job_is_read_to_its_end() -> None:
    server = ModelServer("echo", None, {})
    params = {"message": "hi", "delay_s": 0.0, "progress_steps": 3}
    events = read_all(server, "job", params, "token-1")
    assert [e.step for e in events if isinstance(e, Progress)] == [1, 2, 3]
    assert isinstance(events[-1], Output) and events[-1].data == b"hi"
    assert server.info()["active_jobs"] == [] and server.jobs_served == 1
    # An attempt that has ended is no longer held: following it says so.
    with pytest.raises(TransientError, match="holds no attempt"):
        list(server.follow(attempt_key("job", "token-1")))


def test_a_slow_job_is_followed_to_its_end_in_order() -> None:
    server = ModelServer("echo", None, {})
    params = {"message": "done", "delay_s": 0.5, "progress_steps": 5}
    events: list[Event] = []
    first, ended = server.start("job", params, "token-1", wait_s=0.0)
    assert not ended and server.info()["active_jobs"] == ["job"]
    events.extend(first)
    follow_to_end(server, attempt_key("job", "token-1"), events)
    assert [e.step for e in events if isinstance(e, Progress)] == [1, 2, 3, 4, 5]
    assert isinstance(events[-1], Output) and events[-1].data == b"done"
    assert server.info()["active_jobs"] == [] and server.jobs_served == 1


def test_a_jobs_error_comes_after_the_events_made_before_it() -> None:
    server = ModelServer("echo", None, {})
    params = {"message": "x", "delay_s": 0.02, "progress_steps": 2, "fail": True}
    items = read_all(server, "job", params, "token-1")
    assert [e.step for e in items if isinstance(e, Progress)] == [1, 2]
    assert isinstance(items[-1], ModelError)
    assert server.info()["active_jobs"] == []


def test_a_cancel_reaches_a_followed_attempt() -> None:
    server = ModelServer("echo", None, {})
    items: list[Any] = []
    server.start("job", SLOW, "token-1", wait_s=0.0)
    assert server.cancel("job", "token-1") is True
    follow_to_end(server, attempt_key("job", "token-1"), items)
    assert isinstance(items[-1], CanceledError)
    assert server.info()["active_jobs"] == []


def test_a_cancel_that_came_first_ends_the_attempt_at_its_start() -> None:
    server = ModelServer("echo", None, {})
    assert server.cancel("job", "token-1") is False  # the cancel overtook the start
    with pytest.raises(CanceledError):
        server.start("job", {"message": "late"}, "token-1", wait_s=1.0)
    assert server.info()["active_jobs"] == [] and server.jobs_served == 0


def test_an_attempt_nobody_reads_is_dropped_and_stops() -> None:
    """Its worker died between the start and the follow: the server does not keep it in hand
    (which would count as load and keep the replica from unloading) nor run it for no one."""
    server = ModelServer("echo", None, {})
    # Long enough that the next line still finds it in hand on a busy machine.
    server.abandon_s = 1.0
    server.start("job", SLOW, "token-1", wait_s=0.0)
    assert server.info()["active_jobs"] == ["job"]
    wait_until("the attempt to be dropped", lambda: server.info()["active_jobs"] == [])
    # The echo model stops at its next cancel check: nothing runs in the batcher any more.
    wait_until("the model to stop", lambda: server.batcher.pending_jobs() == 0)
    with pytest.raises(TransientError, match="nobody followed it"):
        list(server.follow(attempt_key("job", "token-1")))
    # The server still serves the next job.
    events, ended = server.start("job", {"message": "next"}, "token-2", wait_s=30.0)
    assert ended and isinstance(events[-1], Output) and events[-1].data == b"next"


def test_a_reader_that_stops_early_gives_the_attempt_up() -> None:
    """A follow stream dropped before the end (its caller stopped reading) cancels the
    attempt rather than leaving it to run."""
    server = ModelServer("echo", None, {})
    server.start("job", SLOW, "token-1", wait_s=0.0)
    stream = server.follow(attempt_key("job", "token-1"))
    assert isinstance(next(stream), Progress)
    stream.close()
    assert server.info()["active_jobs"] == []
    wait_until("the model to stop", lambda: server.batcher.pending_jobs() == 0)
