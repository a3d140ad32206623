"""Recording a job's events as they stream back from its actor: logs, metrics and model saves
as they come, progress at most once per `progress_interval_s`, outputs with the next event or
the finishing transaction, where the job runs (its placement, and a cold start as
`metrics.load_s`), and while it waits for room, what it is waiting for.

Output files are written under the attempt's own key (core/artifacts.py) the moment they
arrive; they become the job's outputs only through a write fenced by the lease. What an
attempt wrote and did not get recorded (it lost its lease, it failed, or an earlier attempt
had recorded that name) is deleted by `discard_unrecorded`, locally and in object storage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.artifacts import StoredFile
from core.db import retry_transient
from core.events import Event, Log, Metric, ModelSaved, Output, Placement, Progress, TextDelta
from core.jobs import Lease, record_events, record_output, record_placement, record_waiting
from core.tables import Artifact
from scheduler.attempt import JobSnapshot, WorkerParts

log = logging.getLogger(__name__)


class EventRecorder:
    """Writes a job's events to SQL: logs, metrics and model saves as they come, progress at most
    once per `progress_interval_s` (the last one always), and each output as soon as the next
    event arrives — or, when it is the job's last event (a generate job's usual case), in the
    transaction that finishes the job, which saves a write per job. An output's file is
    written the moment it arrives either way. Where the job runs (its Placement) goes with the
    first of these writes: no write of its own.

    A write that meets a lost database connection is tried again (GENQ_TRANSIENT_RETRY_S);
    what it carries stays pending until a transaction holding it has committed."""

    def __init__(self, runner: WorkerParts, job: JobSnapshot, lease: Lease) -> None:
        self.runner, self.job, self.lease = runner, job, lease
        self.pending_progress: Progress | None = None
        self.pending_output: tuple[Output, StoredFile] | None = None
        self.last_progress_at = 0.0
        self.model_saved: ModelSaved | None = None
        self.final_metrics: dict[str, Any] = {}
        # Unix time the job asked for its server: a server that finished loading after it is
        # a cold start for this job.
        self.asked_at = time.time()
        self.waiting_said = ""
        # The resource Ray lacks to place the job's actor, as written on the row (preemption
        # reads it: core/preemption.py).
        self.waiting_resource: str | None = None
        self.pending_placement: dict[str, Any] | None = None
        # Keys of the files this attempt wrote, and those of them that an earlier attempt's
        # output of the same name made redundant.
        self.written: list[str] = []
        self.redundant: list[str] = []
        # What the transaction being built writes: cleared from pending once it commits.
        self._in_flight: list[str] = []

    def record(self, event: Event) -> None:
        if self.pending_output is not None:
            self.transact(self._write_output, "recording an output")
        if isinstance(event, Placement):
            self.pending_placement = event.as_row()
            if event.load_s is not None and (event.loaded_at or 0) >= self.asked_at:
                self.final_metrics["load_s"] = round(event.load_s, 3)
            self.waiting("")
            return
        if isinstance(event, Progress):
            if self.waiting_resource is not None:  # running: it was placed
                self.waiting("")
            self.waiting_said = ""
            self.pending_progress = event
            if time.monotonic() - self.last_progress_at >= self.runner.settings.progress_interval_s:
                self.flush()
            return
        if isinstance(event, Output):
            stored = self.runner.store.write_output(
                self.job.tenant_id, self.job.id, event.name, event.data, self.lease.token
            )
            self.written.append(stored.path)
            self.pending_output = (event, stored)
            return
        if isinstance(event, ModelSaved):
            self.model_saved = event
            self.final_metrics.update(event.metrics)
        if isinstance(event, Metric):
            self.final_metrics.update(event.values)
        assert isinstance(event, Log | Metric | ModelSaved | TextDelta)

        def write(session: Session) -> None:
            self._write_placement(session)
            record_events(session, self.lease, [event])

        self.transact(write, "recording an event")

    def waiting(self, message: str, resource: str | None = None) -> None:
        """Say on the job what it waits for ("waiting for a GPU"); "" once it no longer does.
        `resource`: the Ray resource it lacks while its actor is unplaced (None otherwise)."""
        if resource != self.waiting_resource:
            self.waiting_resource = resource
            self.transact(
                lambda session: record_waiting(session, self.lease, resource),
                "recording what the job waits for",
            )
        if message == self.waiting_said:
            return
        self.waiting_said = message
        self.pending_progress = Progress(0, 0, message)
        self.flush()

    def flush(self) -> None:
        if self.pending_progress is None:
            return

        def write(session: Session) -> None:
            self._write_placement(session)
            self._write_progress(session)

        self.transact(write, "recording progress")
        self.last_progress_at = time.monotonic()

    def transact(self, work: Callable[[Session], Any], what: str) -> Any:
        """Run `work` in a transaction of its own, tried again on a transient database error
        (these writes are safe to repeat), then forget what it wrote from pending."""

        def attempt() -> Any:
            self._in_flight = []
            with self.runner.database.transaction() as session:
                result = work(session)
            self.committed()
            return result

        return retry_transient(
            attempt,
            within_s=self.runner.settings.transient_retry_s,
            what=f"job {self.job.id}: {what}",
        )

    def write_pending(self, session: Session, *, outputs: bool = True) -> None:
        """The placement, the last progress and (with `outputs`) a held output, in the
        caller's (finishing) transaction. The caller calls `committed()` after the commit."""
        self._in_flight = []
        self._write_placement(session)
        self._write_progress(session)
        if outputs:
            self._write_output(session)

    def committed(self) -> None:
        """The transaction that wrote what `write_pending` (or a `transact` work) wrote has
        committed: none of it is pending any more."""
        for what in self._in_flight:
            setattr(self, what, None)
        self._in_flight = []

    def discard_unrecorded(self, *, succeeded: bool) -> None:
        """Delete the files this attempt wrote that are not the job's outputs: after a
        success, those an earlier attempt had already recorded; otherwise every file no row
        names (the attempt lost its lease or failed before recording them)."""
        doomed = list(self.redundant)
        if not succeeded and self.written:
            try:
                with self.runner.database.read() as session:
                    kept = set(
                        session.scalars(
                            select(Artifact.path).where(
                                Artifact.job_id == self.job.id, Artifact.path.in_(self.written)
                            )
                        )
                    )
            except Exception:  # without knowing which were recorded, keep them all
                log.exception("could not tell which outputs were recorded",
                              extra={"job_id": self.job.id})  # fmt: skip
                return
            doomed += [key for key in self.written if key not in kept]
        for key in dict.fromkeys(doomed):
            try:
                self.runner.store.delete(key)
            except Exception:
                log.exception("could not delete %s", key, extra={"job_id": self.job.id})
        if doomed:
            log.warning(
                "deleted %d output file(s) of attempt %d that are not the job's outputs",
                len(set(doomed)),
                self.lease.attempt,
                extra={"job_id": self.job.id},
            )
        self.written, self.redundant = [], []

    def _write_placement(self, session: Session) -> None:
        if self.pending_placement is not None and "pending_placement" not in self._in_flight:
            record_placement(session, self.lease, self.pending_placement)
            self._in_flight.append("pending_placement")

    def _write_progress(self, session: Session) -> None:
        if self.pending_progress is not None:
            record_events(session, self.lease, [self.pending_progress])
            self._in_flight.append("pending_progress")

    def _write_output(self, session: Session) -> None:
        self._write_placement(session)
        if self.pending_output is not None:
            event, stored = self.pending_output
            artifact = record_output(session, self.lease, event, stored)
            if artifact.path != stored.path and stored.path not in self.redundant:
                # An earlier attempt recorded this name: its file stays the job's output.
                self.redundant.append(stored.path)
            self._in_flight.append("pending_output")
