"""Stall detection: whether the actor doing a job's work (a model server or a trainer) is alive.

The lease is renewed by a thread of the Celery worker (scheduler/lease.py), which is alive
whatever the actor does; a paused or hung actor would keep its job `running` for ever. So the
proof of life comes from the work: each event the actor streams, and its answers to a `ping`
sent every quarter of GENQ_STALL_TIMEOUT_S while it sends nothing. Silence for the whole timeout
is a stall: the runner kills the actor and puts the job back in the queue, and the lease keeper
stops renewing the lease meanwhile (`is_stalled`), so that the reaper requeues the job even if
the runner itself is stuck.

The watch is armed by the actor's first event: before that it may still be waiting for a GPU or
loading its model, and a Ray actor answers no call until its constructor has returned.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from ray.exceptions import RayError

from core.errors import StalledError

log = logging.getLogger(__name__)

MIN_PING_S = 0.25


class Liveness:
    """The last sign of life of one job's actor; `check()` about once a second."""

    def __init__(self, actor: Any, timeout_s: float, what: str, job_id: str) -> None:
        self.actor = actor
        self.timeout_s = timeout_s
        self.what = what
        self.job_id = job_id
        self.armed = False
        self.alive_at = time.monotonic()
        self.pid: int | None = None
        self._ping_ref: Any = None
        self._ping_at = 0.0

    def saw_event(self) -> None:
        self.armed = True
        self.alive_at = time.monotonic()

    def is_stalled(self) -> bool:
        return self.armed and time.monotonic() - self.alive_at > self.timeout_s

    def check(self) -> None:
        """Collect a ping's answer, send the next, and raise StalledError after the timeout."""
        now = time.monotonic()
        if not self.armed:
            self.alive_at = now
            return
        if self._ping_ref is not None and ray.wait([self._ping_ref], timeout=0)[0]:
            try:
                self.pid = ray.get(self._ping_ref)
                self.alive_at = max(self.alive_at, self._ping_at)
            except RayError:
                pass  # it died: the job's own stream says so
            self._ping_ref = None
        if self._ping_ref is None and now - self._ping_at >= max(MIN_PING_S, self.timeout_s / 4):
            self._ping_ref = self.actor.ping.remote()
            self._ping_at = now
        silent_s = now - self.alive_at
        if silent_s > self.timeout_s:
            log.warning(
                "stalled: the %s sent nothing and answered no ping for %.0f s",
                self.what,
                silent_s,
                extra={"job_id": self.job_id},
            )
            raise StalledError(
                f"stalled: the {self.what} (pid {self.pid}) sent no event and answered no "
                f"ping for {silent_s:.0f} s (GENQ_STALL_TIMEOUT_S={self.timeout_s:g}); it was "
                "killed and the job went back to the queue"
            )
