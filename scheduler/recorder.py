"""Recording a job's events as they stream back from its actor: logs, metrics and model saves
as they come, progress at most once per `progress_interval_s`, streamed text at most once per
`token_flush_ms`, outputs with the next event or the finishing transaction, where the job runs
(its placement, and a cold start as `metrics.load_s`), and while it waits for room, what it is
waiting for. After each commit the job's followers are woken (scheduler/wakeups.py).

Streamed text is coalesced: a language model's tokens would otherwise cost a transaction each.
The pieces made since the last write wait in memory and go out together, as one text_delta
event, when the flush interval has passed since the recorder's last write (a timer writes
them if no token comes to do it), with any other event (before it, so the history keeps its
order) and in the transaction that ends the attempt (succeeded, failed, canceled or back to
the queue). A crash loses what waited, at most one interval of text, which the attempt that
runs next streams again from its start.

Output files are written under the attempt's own key (core/artifacts.py) the moment they
arrive; they become the job's outputs only through a write fenced by the lease. What an
attempt wrote and did not get recorded (it lost its lease, it failed, or an earlier attempt
had recorded that name) is deleted by `discard_unrecorded`, locally and in object storage.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.artifacts import StoredFile
from core.db import retry_transient
from core.errors import LeaseLostError
from core.events import Event, Log, Metric, ModelSaved, Output, Placement, Progress, TextDelta
from core.leases import Lease
from core.recording import (
    record_events,
    record_output,
    record_placement,
    record_text,
    record_waiting,
)
from core.tables import Artifact
from scheduler.attempt import JobSnapshot, WorkerParts
from scheduler.wakeups import announce

log = logging.getLogger(__name__)


class EventRecorder:
    """Writes a job's events to SQL: logs, metrics and model saves as they come, progress at most
    once per `progress_interval_s` (the last one always), and each output as soon as the next
    event arrives — or, when it is the job's last event (a generate job's usual case), in the
    transaction that finishes the job, which saves a write per job. An output's file is
    written the moment it arrives either way. Where the job runs (its Placement) goes with the
    first of these writes: no write of its own.

    Streamed text (TextDelta) is written at most once per `token_flush_ms`, the pieces made
    meanwhile in one event; progress due meanwhile goes with it, so a streaming job costs one
    transaction per interval. The write falls to whichever comes first once the interval is
    over: the next token (the task's thread) or a timer (a thread of its own). Every write of
    the recorder holds `write_lock`, so they never overlap; the finishing transaction (which
    the runner opens) waits for a timer's write in flight and then stops the timer.

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
        # What the transaction being built writes (attribute -> the value written): cleared
        # from pending once it commits, unless a newer value came meanwhile (the timer writes
        # while the task's thread records).
        self._in_flight: dict[str, Any] = {}
        # Streamed text not yet written, and how many of its pieces the transaction being
        # built writes. `text_lock` guards these, the timer and the fields after them.
        self.flush_s = runner.settings.token_flush_ms / 1000
        self.pending_text: list[TextDelta] = []
        self._text_in_flight = 0
        self.text_lock = threading.Lock()
        self._timer: threading.Timer | None = None
        # When the last write began (monotonic): text waits until flush_s after it.
        self.last_write_at = 0.0
        self.has_text = False
        # Set once the attempt's last transaction has begun: no timer writes after it.
        self._closing = False
        # A timer's write is inside its transaction (the finishing one waits for it).
        self._timer_writing = False
        self._timer_done = threading.Condition(self.text_lock)
        self.write_lock = threading.Lock()

    def record(self, event: Event) -> None:
        if self.pending_output is not None:
            self.transact(self._write_output, "recording an output")
        if isinstance(event, TextDelta):
            self._add_text(event)
            return
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
            if self._is_progress_due():
                if self.has_text:  # while text streams, progress goes with its writes
                    self.transact(self._write_due, "recording progress", paced=True)
                else:
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
        assert isinstance(event, Log | Metric | ModelSaved)

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

    def transact(
        self,
        work: Callable[[Session], Any],
        what: str,
        *,
        paced: bool = False,
        timer: bool = False,
    ) -> Any:
        """Run `work` in a transaction of its own, after the text waiting to be written (so
        events keep their order), tried again on a transient database error (these writes are
        safe to repeat; text is checked against a lost commit), then forget what it wrote from
        pending. `paced`: a write for the text only, skipped (the timer set instead) when
        another write went out less than the flush interval ago. `timer`: the timer's write,
        which stands down once the attempt is ending."""
        tries = 0

        def attempt() -> Any:
            nonlocal tries
            tries += 1
            try:
                with self.runner.database.transaction() as session:
                    if timer:
                        with self.text_lock:
                            if self._closing:
                                return None
                            self._timer_writing = True
                    self._in_flight, self._text_in_flight = {}, 0
                    # Writes begin at least an interval apart, counted from the transaction's
                    # start on its connection (after the pool's checkout and ping).
                    session.connection()
                    with self.text_lock:
                        self.last_write_at = time.monotonic()
                    self._write_text(session, again=tries > 1)
                    result = work(session)
                self.committed()
                return result
            finally:
                if timer:
                    with self.text_lock:
                        self._timer_writing = False
                        self._timer_done.notify_all()

        with self.write_lock:
            if paced:
                with self.text_lock:
                    if timer and self._closing:
                        return None
                    # Another write went out meanwhile: the text waits for the timer.
                    wait_s = self._text_wait_s()
                    if wait_s > 0:
                        self._arm(wait_s)
                        return None
            return retry_transient(
                attempt,
                within_s=self.runner.settings.transient_retry_s,
                what=f"job {self.job.id}: {what}",
            )

    def write_pending(self, session: Session, *, outputs: bool = True) -> None:
        """The text waiting to be written, the placement, the last progress and (with
        `outputs`) a held output, in the caller's (finishing) transaction. The caller calls
        `committed()` after the commit.

        No timer writes after this: one whose transaction is open is waited for first (on
        PostgreSQL it may hold the job's row; this transaction has locked nothing yet, being
        its first work; on SQLite the writer lock this one holds rules it out)."""
        with self.text_lock:
            self._closing = True
            self._stop_timer()
            while self._timer_writing:
                self._timer_done.wait()
        self._in_flight, self._text_in_flight = {}, 0
        self._write_text(session, again=False)
        self._write_placement(session)
        self._write_progress(session)
        if outputs:
            self._write_output(session)

    def committed(self) -> None:
        """The transaction that wrote what `write_pending` (or a `transact` work) wrote has
        committed: none of it is pending any more, and the job's followers are woken."""
        for what, written in self._in_flight.items():
            if what == "pending_progress":
                self.last_progress_at = time.monotonic()
            if getattr(self, what) is written:
                setattr(self, what, None)
        self._in_flight = {}
        with self.text_lock:
            del self.pending_text[: self._text_in_flight]
            self._text_in_flight = 0
        announce(self.runner.publisher.redis, self.job.id)

    def discard_unrecorded(self, *, succeeded: bool) -> None:
        """Delete the files this attempt wrote that are not the job's outputs: after a
        success, those an earlier attempt had already recorded; otherwise every file no row
        names (the attempt lost its lease or failed before recording them)."""
        with self.text_lock:  # the attempt is over: nothing more is written
            self._closing = True
            self._stop_timer()
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

    # -- streamed text ---------------------------------------------------------------------

    def _add_text(self, event: TextDelta) -> None:
        """Hold a piece of text; write what is held now if the interval since the last write
        is over, else make sure the timer will."""
        with self.text_lock:
            self.has_text = True
            self.pending_text.append(event)
            wait_s = self._text_wait_s()
            if wait_s > 0:
                self._arm(wait_s)
                return
        self.transact(self._write_due, "recording text", paced=True)

    def _text_wait_s(self) -> float:
        """How long text must still wait for its write (caller holds text_lock)."""
        return self.last_write_at + self.flush_s - time.monotonic()

    def _is_progress_due(self) -> bool:
        interval_s = self.runner.settings.progress_interval_s
        return time.monotonic() - self.last_progress_at >= interval_s

    def _arm(self, wait_s: float) -> None:
        """Start the timer that writes what is held in `wait_s` (caller holds text_lock)."""
        if self._timer is None and not self._closing:
            self._timer = threading.Timer(wait_s, self._write_late)
            self._timer.daemon = True
            self._timer.start()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _write_late(self) -> None:
        """The timer: write the text held (and progress due) when no token came to."""
        with self.text_lock:
            self._timer = None
            if self._closing or not (self.pending_text or self.pending_progress):
                return
        try:
            self.transact(self._write_due, "recording text", paced=True, timer=True)
        except LeaseLostError:  # the task's thread finds out at its next write, and ends
            log.info("lease lost while recording text", extra={"job_id": self.job.id})
        except Exception:  # what is held stays pending: the next write takes it
            log.exception("could not record text", extra={"job_id": self.job.id})

    def _write_due(self, session: Session) -> None:
        """With the text (which `transact` writes first): the placement, and progress if due."""
        self._write_placement(session)
        if self._is_progress_due():
            self._write_progress(session)

    def _write_text(self, session: Session, *, again: bool) -> None:
        with self.text_lock:
            pieces = list(self.pending_text)
        if pieces:
            text = "".join(piece.text for piece in pieces)
            record_text(session, self.lease, pieces[0].index, text, again=again)
            self._text_in_flight = len(pieces)

    def _write_placement(self, session: Session) -> None:
        if self.pending_placement is not None and "pending_placement" not in self._in_flight:
            placement = self.pending_placement
            record_placement(session, self.lease, placement)
            self._in_flight["pending_placement"] = placement

    def _write_progress(self, session: Session) -> None:
        progress = self.pending_progress
        if progress is not None:
            record_events(session, self.lease, [progress])
            self._in_flight["pending_progress"] = progress

    def _write_output(self, session: Session) -> None:
        self._write_placement(session)
        held = self.pending_output
        if held is not None:
            event, stored = held
            artifact = record_output(session, self.lease, event, stored)
            if artifact.path != stored.path and stored.path not in self.redundant:
                # An earlier attempt recorded this name: its file stays the job's output.
                self.redundant.append(stored.path)
            self._in_flight["pending_output"] = held
