"""The periodic scheduler: submits the jobs of due schedule slots, starts delayed jobs whose
time has come, fails waiting jobs whose deadline passed, asks running training jobs to make
room for jobs of a higher priority class that waited too long (scheduler/preemption.py), reaps
jobs whose lease expired (requeued after a backoff, so a job that kills its worker every time
is spaced out until its attempts run out), re-publishes queued jobs whose broker message is
gone, hands due webhook messages to their queue, and every retention_interval_s runs the
retention pass (core/retention.py: expired outputs, events and finished jobs) and, every
reconcile_interval_s, the stray sweep (core/strays.py: files no artifact row names).

It is a plain loop in its own process rather than Celery beat, because its main duty is to
repair the broker: it must keep working while the broker is empty, restarted or unreachable.
Each step is safe to run in several processes at once (row locks with SKIP LOCKED; a second
publish of a job is absorbed by the claim).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from core import tally
from core.artifacts import ArtifactStore
from core.db import Database
from core.deletion import Freed
from core.leases import retry_backoff_s
from core.recovery import (
    Reaped,
    expire_deadlines,
    mark_published,
    promote_due,
    reap_expired,
    unpublished_jobs,
)
from core.retention import Retention
from core.schedules import fire_due
from core.settings import Settings
from core.states import JobState
from core.strays import StraySweep
from core.tables import Job, utcnow
from scheduler.enqueue import Publication, Publisher
from scheduler.heartbeats import SchedulerHeartbeat
from scheduler.preemption import preempt_round
from scheduler.webhooks import dispatch

log = logging.getLogger(__name__)


@dataclass
class TickReport:
    promoted: int = 0
    reaped: int = 0
    requeued: int = 0
    republished: int = 0
    expired: int = 0
    webhooks: int = 0
    scheduled: int = 0
    preempted: int = 0


class Periodic:
    def __init__(self, settings: Settings, database: Database, publisher: Publisher) -> None:
        self.settings, self.database, self.publisher = settings, database, publisher
        store = ArtifactStore.from_settings(settings)
        self.retention = Retention(settings, database, store)
        self.strays = StraySweep(database, store)

    def _publish(self, job_ids: list[str], delays: dict[str, float] | None = None) -> int:
        if not job_ids:
            return 0
        with self.database.transaction() as session:
            rows = session.query(Job.id, Job.queue, Job.priority).filter(Job.id.in_(job_ids)).all()
        delays = delays or {}
        items = [Publication(r.id, r.queue, r.priority, delays.get(r.id)) for r in rows]
        return len(self.publisher.publish(self.database, items))

    def expire(self) -> int:
        with self.database.transaction() as session:
            return len(expire_deadlines(session))

    def webhooks(self) -> int:
        return dispatch(self.settings, self.database, self.publisher.celery)

    def fire_schedules(self) -> int:
        """Submit the jobs of due schedule slots (core/schedules.py: each slot once)."""
        with self.database.transaction() as session:
            ids = fire_due(session, max_attempts=self.settings.max_attempts)
        return self._publish(ids)

    def promote(self) -> int:
        with self.database.transaction() as session:
            ids = promote_due(session)
        return self._publish(ids)

    def preempt(self) -> int:
        return len(preempt_round(self.settings, self.database))

    def retain(self) -> Freed:
        """The retention pass: delete what has outlived its tenant's retention."""
        return self.retention.run()

    def reap(self) -> tuple[int, int]:
        # A worker crash is a transient failure: the next attempt waits like any other retry
        # (not_before on the row holds every token off it; its own token comes when it is due).
        def backoff(attempt: int) -> float:
            return retry_backoff_s(
                attempt,
                base_s=self.settings.retry_backoff_base_s,
                cap_s=self.settings.retry_backoff_max_s,
            )

        with self.database.transaction() as session:
            reaped = reap_expired(session, backoff_s=backoff)
        requeued = [r for r in reaped if r.state == JobState.QUEUED]
        now = utcnow()
        delays = {
            r.job_id: max(0.0, (r.not_before - now).total_seconds())
            for r in requeued
            if r.not_before is not None
        }
        self._publish([r.job_id for r in requeued], delays)
        self._tally_reaped(reaped)
        return len(reaped), len(requeued)

    def _tally_reaped(self, reaped: list[Reaped]) -> None:
        """Count the reaped leases (GET /metrics `genq_leases_reaped_total`); a Redis that
        does not answer loses the count, never the round."""
        outcomes: dict[str, int] = {}
        for r in reaped:
            outcomes[str(r.state)] = outcomes.get(str(r.state), 0) + 1
        try:
            for outcome, n in outcomes.items():
                tally.count(self.publisher.redis, "leases_reaped", {"outcome": outcome}, n)
        except Exception:
            log.warning("could not count %d reaped leases", len(reaped), exc_info=True)

    def reconcile(self) -> int:
        """Publish queued jobs that have no message; confirm the ones that do, so the next
        round checks others."""
        with self.database.transaction() as session:
            ids = unpublished_jobs(session, older_than_s=self.settings.republish_after_s)
        if not ids:
            return 0
        present = self.publisher.has_message(ids)
        missing = [j for j, ok in zip(ids, present, strict=True) if not ok]
        confirmed = [j for j, ok in zip(ids, present, strict=True) if ok]
        if confirmed:
            with self.database.transaction() as session:
                mark_published(session, confirmed)
        if missing:
            log.warning("re-publishing %d queued jobs without a message", len(missing))
        return self._publish(missing)

    def tick(self) -> TickReport:
        report = TickReport()
        report.scheduled = self.fire_schedules()
        report.promoted = self.promote()
        report.expired = self.expire()
        report.preempted = self.preempt()
        report.reaped, report.requeued = self.reap()
        report.republished = self.reconcile()
        report.webhooks = self.webhooks()
        return report

    def run_forever(self, stop: threading.Event) -> None:
        """Send webhooks every webhook_poll_s, reap every reap_interval_s, reconcile every
        reconcile_interval_s and run the retention pass every retention_interval_s until
        `stop`."""
        next_reap = next_reconcile = 0.0
        heartbeat = SchedulerHeartbeat(self.settings, self.publisher.redis)
        # The retention pass runs in a thread of its own: the first pass after retention is
        # turned on may take long over a big backlog, and reaping, webhooks and schedules
        # must not wait for it.
        retention = threading.Thread(
            target=self.retain_forever, args=(stop,), name="genq-retention", daemon=True
        )
        retention.start()
        while not stop.is_set():
            try:
                self.webhooks()
                self.fire_schedules()
                if time.monotonic() >= next_reap:
                    self.promote()
                    self.expire()
                    self.preempt()
                    self.reap()
                    next_reap = time.monotonic() + self.settings.reap_interval_s
                if time.monotonic() >= next_reconcile:
                    self.reconcile()
                    next_reconcile = time.monotonic() + self.settings.reconcile_interval_s
            except Exception as exc:  # the database or broker is down: try again next round
                log.exception("periodic round failed")
                heartbeat.beat(f"{type(exc).__name__}: {exc}"[:500])
            else:
                heartbeat.beat()
            stop.wait(min(self.settings.webhook_poll_s, self.settings.reap_interval_s))
        heartbeat.stop()
        # A pass stopped between two batches loses nothing: each batch commits on its own.
        retention.join(timeout=10)

    def sweep_strays(self) -> Freed:
        """Delete output files of finished jobs that no artifact row names (core/strays.py)."""
        return self.strays.run()

    def retain_forever(self, stop: threading.Event) -> None:
        """The retention pass every retention_interval_s (the first at once) and the stray
        sweep every reconcile_interval_s, until `stop`; a pass that fails waits for its next
        turn like one that succeeded."""
        next_retention = 0.0
        while not stop.is_set():
            if time.monotonic() >= next_retention:
                try:
                    self.retain()
                except Exception:
                    log.exception("retention pass failed")
                next_retention = time.monotonic() + self.settings.retention_interval_s
            try:
                self.sweep_strays()
            except Exception:
                log.exception("stray sweep failed")
            stop.wait(min(self.settings.reconcile_interval_s, next_retention - time.monotonic()))


def main(settings: Settings) -> None:
    import signal

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    database = Database(settings)
    periodic = Periodic(settings, database, Publisher(settings))
    log.info("periodic scheduler started")
    periodic.run_forever(stop)
    log.info("periodic scheduler stopped")
