"""The model server tells attempts of one job apart (workers/server.py): a cancel names the
attempt it stops, so a stale attempt's cancel leaves its successor running. The server runs
here as the plain class (no Ray), with the echo family.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from core.events import Event, Output, Progress
from tests.support.recovery import wait_until
from workers.families.base import CanceledError
from workers.server import ModelServer


def run(events: Iterator[Event], into: list[Any]) -> None:
    try:
        into.extend(events)
    except CanceledError as exc:
        into.append(exc)


def test_a_cancel_stops_only_the_attempt_it_names() -> None:
    server = ModelServer("echo", None, {})
    slow = {"message": "x", "delay_s": 1.0, "progress_steps": 4}
    stale: list[Any] = []
    current: list[Any] = []
    threads = [
        threading.Thread(target=run, args=(server.generate("job", slow, "attempt-1"), stale)),
        threading.Thread(target=run, args=(server.generate("job", slow, "attempt-2"), current)),
    ]
    for thread in threads:
        thread.start()
    # Both attempts are in hand before the cancel (the stale one's, which finds it running).
    wait_until(lambda: len(server.info()["active_jobs"]) >= 2, 30, "both attempts in hand")
    assert server.cancel("job", "attempt-1") is True
    for thread in threads:
        thread.join(30)
    assert isinstance(stale[-1], CanceledError)
    assert isinstance(current[-1], Output) and current[-1].data == b"x"
    assert [e.step for e in current if isinstance(e, Progress)] == [1, 2, 3, 4]


def test_a_cancel_for_an_attempt_not_here_touches_no_other() -> None:
    server = ModelServer("echo", None, {})
    assert server.cancel("job", "old-attempt") is False
    events = list(server.generate("job", {"message": "y"}, "new-attempt"))
    assert isinstance(events[-1], Output) and events[-1].data == b"y"
    # The remembered cancel still stops its own attempt should it arrive late.
    with pytest.raises(CanceledError):
        list(server.generate("job", {"message": "z"}, "old-attempt"))


def test_a_newer_attempt_ends_the_older_one_still_here() -> None:
    """Attempt 2 is claimed only once attempt 1 lost its lease (its worker killed, say): the
    server stops 1 as soon as 2 arrives, so 2 does not wait behind a call nobody reads."""
    server = ModelServer("echo", None, {})
    slow = {"message": "old", "delay_s": 600.0, "progress_steps": 600}
    older: list[Any] = []
    thread = threading.Thread(
        target=run, args=(server.generate("job", slow, "token-1", number=1), older)
    )
    thread.start()
    wait_until(lambda: any(isinstance(e, Progress) for e in older), 30, "attempt 1 at work")
    events = list(server.generate("job", {"message": "new"}, "token-2", number=2))
    thread.join(30)
    assert not thread.is_alive() and isinstance(older[-1], CanceledError)
    assert isinstance(events[-1], Output) and events[-1].data == b"new"
    assert server.info()["active_jobs"] == []


def test_an_attempt_arriving_after_a_newer_one_is_canceled_at_once() -> None:
    """A stale worker that wakes late and only then calls: its attempt does not run beside, or
    stop, the newer one."""
    server = ModelServer("echo", None, {})
    newer: list[Any] = []
    slow = {"message": "new", "delay_s": 1.0, "progress_steps": 4}
    thread = threading.Thread(
        target=run, args=(server.generate("job", slow, "token-3", number=3), newer)
    )
    thread.start()
    wait_until(lambda: "job" in server.info()["active_jobs"], 30, "attempt 3 in hand")
    with pytest.raises(CanceledError):
        list(server.generate("job", {"message": "old"}, "token-2", number=2))
    thread.join(30)
    assert isinstance(newer[-1], Output) and newer[-1].data == b"new"
    assert [e.step for e in newer if isinstance(e, Progress)] == [1, 2, 3, 4]
