"""The lease keeper: the thread beside each running job that renews its lease (only while the
work itself shows signs of life: scheduler/stall.py) and notices,
within about a second, a cancel request, a lost lease or an attempt that ran past its
`timeout_s`; each of those asks the actor to stop (the request names the attempt, so it can
only stop this attempt's work). It also notices a preemption request
(core/preemption.py) and asks the trainer to stop at its next checkpoint (`on_preempt`).

The keeper's thread starts at its first tick, one poll interval after the attempt began
(`begin`), from one thread per process that starts them when due: most generate jobs have
ended by then, and a thread started and stopped for each of them cost the worker more than
some of the job's SQL statements. A keeper whose attempt has ended before its tick never
starts; the ticks of one that does are those it would have had from the start.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

from core.db import Database
from core.errors import LeaseLostError
from core.jobs import get_job
from core.leases import Lease, heartbeat
from core.settings import Settings
from core.states import JobState
from core.tables import Job

log = logging.getLogger(__name__)


class LeaseKeeper(threading.Thread):
    """Renews the lease every heartbeat interval and reads the job's state about once a
    second, so that a cancel request reaches the actor promptly."""

    def __init__(
        self,
        database: Database,
        settings: Settings,
        lease: Lease,
        *,
        timeout_s: float | None = None,
    ) -> None:
        super().__init__(name=f"lease-{lease.job_id}", daemon=True)
        self.database, self.settings, self.lease = database, settings, lease
        self.timeout_s = timeout_s
        self.poll_s = min(1.0, settings.heartbeat_interval_s)
        # When the attempt began (monotonic), set by `begin`.
        self.began_at: float | None = None
        self.stopped = threading.Event()
        self.cancel_requested = threading.Event()
        self.lost = threading.Event()
        self.timed_out = threading.Event()
        self.preempt_requested = threading.Event()
        # Set by the runner once the actor is known: asks it to stop; for a trainer, asks it
        # to stop at its next checkpoint.
        self.on_cancel: Callable[[], None] | None = None
        self.on_preempt: Callable[[], None] | None = None
        # Set by the runner: whether the actor doing the work has stalled (scheduler/stall.py).
        # A stalled job's lease is not renewed, so the reaper takes it back even if the runner
        # cannot.
        self.is_stalled: Callable[[], bool] | None = None

    def begin(self) -> None:
        """Watch the attempt from now on: the thread starts at its first tick, unless the
        attempt has ended (`stop`) by then."""
        self.began_at = time.monotonic()
        _STARTS.add(self, self.began_at + self.poll_s)

    def run(self) -> None:
        poll_s = self.poll_s
        started = last_renewal = self.began_at if self.began_at is not None else time.monotonic()
        wait_s = max(0.0, started + poll_s - time.monotonic())
        while not self.stopped.wait(wait_s):
            wait_s = poll_s
            overdue = self.timeout_s is not None and time.monotonic() - started > self.timeout_s
            if overdue and not self.timed_out.is_set():
                log.warning("attempt timed out; stopping it", extra={"job_id": self.lease.job_id})
                self.timed_out.set()
                self._request_cancel()
            due = time.monotonic() - last_renewal >= self.settings.heartbeat_interval_s
            if due and self.is_stalled is not None and self.is_stalled():
                log.warning("the work is stalled: lease not renewed",
                            extra={"job_id": self.lease.job_id})  # fmt: skip
                due = False
            try:
                if due:
                    with self.database.transaction() as session:
                        state = heartbeat(
                            session, self.lease, lease_ttl_s=self.settings.lease_ttl_s
                        )
                        held = session.get(Job, self.lease.job_id)  # the row heartbeat locked
                        preempting = held is not None and held.preempt_requested_at is not None
                    last_renewal = time.monotonic()
                else:
                    # Only a look at the row: a snapshot read, which on SQLite does not queue
                    # for the one writer lock behind every claim and finish.
                    with self.database.read() as session:
                        job = get_job(session, self.lease.job_id)
                        if job.lease_token != self.lease.token:
                            raise LeaseLostError(self.lease.job_id)
                        state = JobState(job.state)
                        preempting = job.preempt_requested_at is not None
            except LeaseLostError:
                if self.stopped.is_set():
                    # The runner is finishing the attempt (its own finish cleared the token):
                    # nothing was lost, and nothing is to be stopped.
                    return
                log.warning("lease lost; stopping the attempt", extra={"job_id": self.lease.job_id})
                self.lost.set()
                self._request_cancel()
                return
            except Exception:  # a database hiccup: try again at the next tick
                log.exception("heartbeat failed", extra={"job_id": self.lease.job_id})
                continue
            if self.stopped.is_set():
                return
            if state == JobState.CANCELING:
                self._request_cancel()
            elif preempting:
                self._request_preempt()

    def _request_cancel(self) -> None:
        if self.cancel_requested.is_set():
            return
        self.cancel_requested.set()
        if self.on_cancel is not None:
            try:
                self.on_cancel()
            except Exception:
                log.exception(
                    "could not ask the actor to stop", extra={"job_id": self.lease.job_id}
                )

    def _request_preempt(self) -> None:
        if self.preempt_requested.is_set() or self.on_preempt is None:
            return
        self.preempt_requested.set()
        log.info("preemption requested; stopping at the next checkpoint",
                 extra={"job_id": self.lease.job_id})  # fmt: skip
        try:
            self.on_preempt()
        except Exception:
            log.exception("could not ask the trainer to stop", extra={"job_id": self.lease.job_id})

    def abandon(self) -> None:
        """The runner found the lease gone: stop, and ask this attempt's actor to stop."""
        self.stop()
        self.lost.set()
        self._request_cancel()

    def stop_actor(self) -> None:
        """The attempt ended without its actor's last event (an error on this side): ask the
        actor to stop this attempt's work, unless that was asked already."""
        if self.on_cancel is None or self.cancel_requested.is_set():
            return
        try:
            self.on_cancel()
        except Exception:
            log.exception("could not ask the actor to stop", extra={"job_id": self.lease.job_id})

    def stop(self) -> None:
        """The attempt is ending: stop renewing, and raise no alarm from here on. The runner
        calls this before its finishing transaction, so a look at the row that finds the
        token gone after that is the runner's own finish, not a lost lease."""
        self.stopped.set()


class _DelayedStarts:
    """Starts lease keepers when their first tick is due, from one thread (started with the
    first keeper); a keeper stopped by then is dropped."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: list[tuple[float, int, LeaseKeeper]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, keeper: LeaseKeeper, at: float) -> None:
        with self._cond:
            heapq.heappush(self._due, (at, next(self._order), keeper))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="lease-keeper-starts", daemon=True
                )
                self._thread.start()
            if self._due[0][2] is keeper:  # the earliest now: the thread waits less
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due:
                    self._cond.wait()
                at, _, keeper = self._due[0]
                left_s = at - time.monotonic()
                if left_s > 0:
                    self._cond.wait(left_s)
                    continue
                heapq.heappop(self._due)
            if not keeper.stopped.is_set():
                try:
                    keeper.start()
                except Exception:  # (a thread the system would not start) the next goes on
                    log.exception("could not start a lease keeper",
                                  extra={"job_id": keeper.lease.job_id})  # fmt: skip


_STARTS = _DelayedStarts()
