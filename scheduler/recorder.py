"""Recording a job's events as they stream back from its actor: logs, metrics and model saves
as they come, progress at most once per `progress_interval_s`, outputs with the next event or
the finishing transaction, where the job runs (its placement, and a cold start as
`metrics.load_s`), and while it waits for room, what it is waiting for.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from core.artifacts import StoredFile
from core.events import Event, Log, Metric, ModelSaved, Output, Placement, Progress, TextDelta
from core.jobs import Lease, record_events, record_output, record_placement, record_waiting

if TYPE_CHECKING:
    from scheduler.runner import JobSnapshot, Runner


class EventRecorder:
    """Writes a job's events to SQL: logs, metrics and model saves as they come, progress at most
    once per `progress_interval_s` (the last one always), and each output as soon as the next
    event arrives — or, when it is the job's last event (a generate job's usual case), in the
    transaction that finishes the job, which saves a write per job. An output's file is
    written the moment it arrives either way. Where the job runs (its Placement) goes with the
    first of these writes: no write of its own."""

    def __init__(self, runner: Runner, job: JobSnapshot, lease: Lease) -> None:
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

    def record(self, event: Event) -> None:
        db = self.runner.database
        if self.pending_output is not None:
            with db.transaction() as session:
                self._write_output(session)
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
                self.job.tenant_id, self.job.id, event.name, event.data
            )
            self.pending_output = (event, stored)
            return
        if isinstance(event, ModelSaved):
            self.model_saved = event
            self.final_metrics.update(event.metrics)
        if isinstance(event, Metric):
            self.final_metrics.update(event.values)
        assert isinstance(event, Log | Metric | ModelSaved | TextDelta)
        with db.transaction() as session:
            self._write_placement(session)
            record_events(session, self.lease, [event])

    def waiting(self, message: str, resource: str | None = None) -> None:
        """Say on the job what it waits for ("waiting for a GPU"); "" once it no longer does.
        `resource`: the Ray resource it lacks while its actor is unplaced (None otherwise)."""
        if resource != self.waiting_resource:
            self.waiting_resource = resource
            with self.runner.database.transaction() as session:
                record_waiting(session, self.lease, resource)
        if message == self.waiting_said:
            return
        self.waiting_said = message
        self.pending_progress = Progress(0, 0, message)
        self.flush()

    def flush(self) -> None:
        if self.pending_progress is None:
            return
        with self.runner.database.transaction() as session:
            self._write_placement(session)
            record_events(session, self.lease, [self.pending_progress])
        self.pending_progress = None
        self.last_progress_at = time.monotonic()

    def write_pending(self, session: Session) -> None:
        """The placement, the last progress and a held output, in the caller's (finishing)
        transaction."""
        self._write_placement(session)
        if self.pending_progress is not None:
            record_events(session, self.lease, [self.pending_progress])
            self.pending_progress = None
        self._write_output(session)

    def _write_placement(self, session: Session) -> None:
        if self.pending_placement is not None:
            record_placement(session, self.lease, self.pending_placement)
            self.pending_placement = None

    def _write_output(self, session: Session) -> None:
        self._write_placement(session)
        if self.pending_output is not None:
            event, stored = self.pending_output
            record_output(session, self.lease, event, stored)
            self.pending_output = None
