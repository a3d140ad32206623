"""Cross-job batching inside a model server: concurrent generate jobs for the same model with
the same batch key run as one batch, each job still getting its own stream of events.

Each job's `generate` call (one of the server actor's threads) hands its request to the
`Batcher` and then reads its own event queue. One dispatch thread owns the model: it takes the
oldest waiting request and gathers the others with its key while they keep coming: it starts the
batch once none has come for `max_wait_s`, once `max_rows` sample rows are waiting, or at the
latest WAIT_CAP_FACTOR x `max_wait_s` after the first came (jobs submitted together reach the
server spread out by the API and the broker). It runs them through the family's
`generate_batch`. Progress events fan out to every job of the batch, outputs go to the job they
belong to, and a job whose cancel is seen leaves the batch while the others go on. Jobs that
cannot batch (a family without batching, a key of None, a job larger than `max_rows`, a batch of
one) run alone through `generate`, exactly as they would without batching.

Byte-identical outputs. A job's images depend only on its own seed: every image has its own
torch.Generator for its noise, and the model is called with at least `min_rows` rows (padded),
because below some batch size the CPU (oneDNN) and GPU kernels switch algorithms and a row's
result changes in its last bits. Measured on this CPU: a tiny ddpm UNet gives every row the
same bits at any batch of 16 rows or more, whatever the other rows hold, and different bits below
that; so the default pads to 16 rows and a job's PNGs are byte-identical alone and in any batch
(tests/workers/test_batching.py checks it). On other hardware, keep `GENQ_BATCH_MIN_ROWS` at or
above the size where its kernels stop changing (bench/gpu_batching.py measures it); 1 turns the
padding off, faster for a lone small job, identical only where the kernels allow.

Continuous batching. A model with `generate_continuous` (the `transformers` family) is not
handed a fixed batch: the dispatcher starts it as soon as one job waits, and between two
decode steps the model takes the jobs that have arrived since (up to `max_rows` running), so
a job joins the running batch without waiting for it to end, and leaves it, ending its
event stream, as soon as its own text ends. The model yields (index, None) once a job has
sent its last event.

A failure inside a batch (the model raising, out of memory) is not pinned on the whole batch:
the jobs that had not finished are run again one at a time, so only a job that fails alone
fails, and a batch too big for the accelerator's memory still completes job by job.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from core.errors import GenqError, InvalidInputError, ModelError, TransientError
from core.events import Event, Metric, Progress, TextDelta
from workers.families.base import CanceledError, Family, RunContext

log = logging.getLogger(__name__)

# A batch waits for more jobs until none has come for max_wait_s, and at most this many
# max_wait_s after its first job came.
WAIT_CAP_FACTOR = 10
# Where the caller records events at intervals (progress_interval_s > 0), streamed text is
# sent at most this often per job: well inside the 200 ms in which a follower should see it.
TEXT_INTERVAL_S = 0.05
# How often a job waiting in the queue looks at its cancel flag.
WAIT_POLL_S = 0.05
_END = object()  # the last item of a job's event queue


def job_error(exc: BaseException, job_id: str) -> BaseException:
    """What the caller of a job sees for `exc`: CanceledError and genq errors unchanged,
    everything else as a genq error (the caller, a process without torch, may not be able to
    unpickle a torch or diffusers exception)."""
    if isinstance(exc, GenqError | CanceledError):
        return exc
    if isinstance(exc, ValidationError):
        errors = [
            {"field": ".".join(["params", *map(str, e["loc"])]), "message": e["msg"]}
            for e in exc.errors()
        ]
        return InvalidInputError(errors)
    log.error("job_id=%s: the model raised", job_id, exc_info=exc)
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA)
        return TransientError(f"out of accelerator memory: {exc}")
    return ModelError(f"{type(exc).__name__}: {exc}")


@dataclass(eq=False)  # a request is itself: compared and removed by identity
class Request:
    """One job waiting for, or running in, a batch."""

    job_id: str
    params: dict[str, Any]
    ctx: RunContext
    key: Hashable | None  # None: runs alone
    rows: int
    arrived_at: float = field(default_factory=time.monotonic)
    events: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)
    started: bool = False
    finished: bool = False
    progress_interval_s: float = 0.0
    last_progress_at: float = 0.0
    held_text: TextDelta | None = None
    last_text_at: float = 0.0
    # An error the job raised after events its reader has not taken yet (Batcher.take).
    error: BaseException | None = None
    text_lock: threading.Lock = field(default_factory=threading.Lock)

    def put(self, item: Any) -> None:
        if self.finished:
            return
        if isinstance(item, TextDelta) and self.progress_interval_s:
            self._put_text(item)
            return
        self._flush_text()
        if isinstance(item, Progress) and item.step < item.total and self.progress_interval_s:
            # The caller records progress at most this often: a batch of n jobs would otherwise
            # send n events per step through Ray, which costs more than the step itself.
            now = time.monotonic()
            if now - self.last_progress_at < self.progress_interval_s:
                return
            self.last_progress_at = now
        self.events.put(item)

    def _put_text(self, delta: TextDelta) -> None:
        """Pieces of streamed text that come within TEXT_INTERVAL_S of the last one sent go
        out as one (a batch of n language-model jobs makes n pieces a step; each would be a
        Ray message and a recorded event). Any other event sends the held text first, and the
        job's reader sends it once it is due (a slow model's next piece may be seconds away)."""
        with self.text_lock:
            if self.held_text is None:
                self.held_text = delta
            else:
                self.held_text = TextDelta(self.held_text.index, self.held_text.text + delta.text)
        self.flush_text_if_due()

    def flush_text_if_due(self) -> None:
        with self.text_lock:
            now = time.monotonic()
            if self.held_text is not None and now - self.last_text_at >= TEXT_INTERVAL_S:
                self.events.put(self.held_text)
                self.held_text = None
                self.last_text_at = now

    def _flush_text(self) -> None:
        with self.text_lock:
            if self.held_text is not None:
                self.events.put(self.held_text)
                self.held_text = None

    def end(self, error: BaseException | None = None) -> None:
        if not self.finished:
            if error is None:
                self._flush_text()
            self.events.put(job_error(error, self.job_id) if error is not None else _END)
            self.finished = True


@dataclass
class BatchStats:
    batches: int = 0  # runs of generate_batch with two jobs or more
    batched_jobs: int = 0
    solo_jobs: int = 0
    largest_batch_jobs: int = 0
    last_batch_jobs: int = 0
    # Continuous batching: forward passes run, and those that two jobs or more shared.
    steps: int = 0
    shared_steps: int = 0


class Batcher:
    """Owns the model's dispatch thread; `run` is called by each job's thread."""

    def __init__(
        self,
        model: Any,
        family: Family,
        max_wait_s: float,
        min_rows: int,
        progress_interval_s: float = 0.0,
        max_rows: int = 0,
    ) -> None:
        self.model = model
        self.progress_interval_s = progress_interval_s
        self.family = family
        self.max_wait_s = max_wait_s
        self.min_rows = min_rows
        self.is_continuous = hasattr(model, "generate_continuous")
        # The model may lower its family's limit (a language model whose cache cannot be
        # padded says 1); `max_rows` (GENQ_BATCH_MAX_ROWS, 0: none) lowers it for a server.
        self.max_rows = getattr(model, "max_batch_size", family.max_batch_size)
        if not hasattr(model, "generate_batch") and not self.is_continuous:
            self.max_rows = 1
        if max_rows > 0:
            self.max_rows = min(self.max_rows, max_rows)
        self.stats = BatchStats()
        self._cond = threading.Condition()
        self._waiting: list[Request] = []  # in arrival order
        self._running: list[Request] = []
        self._thread = threading.Thread(target=self._dispatch, name="batcher", daemon=True)
        self._thread.start()

    # -- the job side ------------------------------------------------------------------------

    def request(self, job_id: str, params: dict[str, Any], ctx: RunContext) -> Request:
        key, rows = None, 1
        if self.family.is_batching and self.max_rows > 1:
            assert self.family.generate_params is not None and self.family.batch_key is not None
            try:
                p = self.family.generate_params.model_validate(params)
                key = self.family.batch_key(p)
                if key is not None and ctx.adapter is not None:
                    key = (ctx.adapter["id"], key)  # one call runs one adapter
                rows = int(getattr(p, "num_images", 1))
            except ValidationError:
                key = None  # runs alone, where the implementation reports the bad field
        return Request(job_id, params, ctx, key, rows, progress_interval_s=self.progress_interval_s)

    def submit(self, request: Request) -> None:
        """Queue the job for the dispatcher; its events come from `take`."""
        with self._cond:
            self._waiting.append(request)
            self._cond.notify_all()

    def run(self, request: Request) -> Iterator[Event]:
        """Queue the job, then yield its events as the dispatcher produces them."""
        self.submit(request)
        while True:
            events, ended = self.take(request, wait_s=WAIT_POLL_S, coalesce_s=0.0)
            yield from events
            if ended:
                return

    def take(
        self,
        request: Request,
        wait_s: float,
        coalesce_s: float,
        lead: tuple[Event, ...] = (),
    ) -> tuple[list[Event], bool]:
        """The job's events that came, and whether it has ended: `lead` (events the caller
        puts first), then those the dispatcher produced. Returns once the job ends, once
        `coalesce_s` has passed since the first of them came (so that one answer carries
        what a model makes in a burst), or after `wait_s` (with what there is, perhaps
        nothing). An error the job raised comes out of this call, or of the next one when
        events came before it. A job canceled while it waits for a batch leaves the queue."""
        if request.error is not None:
            error, request.error = request.error, None
            raise error
        out = list(lead)
        now = time.monotonic()
        deadline = now + wait_s
        first_at: float | None = None
        while True:
            until = deadline if first_at is None else min(deadline, first_at + coalesce_s)
            left = until - now
            try:
                if left <= 0:
                    item = request.events.get_nowait()
                else:
                    item = request.events.get(timeout=min(left, WAIT_POLL_S))
            except queue.Empty:
                if left <= 0:
                    return out, False
                request.flush_text_if_due()
                if request.ctx.is_canceled() and self._withdraw(request):
                    item = CanceledError(f"job {request.job_id} was canceled")
                else:
                    now = time.monotonic()
                    continue
            if item is _END:
                return out, True
            if isinstance(item, BaseException):
                if out:
                    request.error = item
                    return out, False
                raise item
            out.append(item)
            now = time.monotonic()
            if first_at is None:
                first_at = now

    def _withdraw(self, request: Request) -> bool:
        """Take a job that has not started out of the queue; False once it runs."""
        with self._cond:
            if request.started or request not in self._waiting:
                return False
            self._waiting.remove(request)
            request.finished = True
            return True

    def pending_jobs(self) -> int:
        with self._cond:
            return len(self._waiting) + len(self._running)

    # -- the dispatcher ----------------------------------------------------------------------

    def _take(self) -> list[Request]:
        """The next batch: the oldest request and those with its key that fit, once the
        batch is full or the oldest has waited max_wait_s. Blocks until there is one."""
        with self._cond:
            while True:
                while not self._waiting:
                    self._cond.wait()
                first = self._waiting[0]
                # A continuous batch starts at once: the others join it between steps.
                if first.key is None or first.rows >= self.max_rows or self.is_continuous:
                    batch = [first]
                    break
                batch, rows = [], 0
                for r in self._waiting:
                    if r.key == first.key and rows + r.rows <= self.max_rows:
                        batch.append(r)
                        rows += r.rows
                # Wait while compatible jobs keep coming (each resets the wait), but no
                # longer than WAIT_CAP_FACTOR waits after the first one came.
                now = time.monotonic()
                left_s = (
                    min(
                        batch[-1].arrived_at + self.max_wait_s,
                        first.arrived_at + WAIT_CAP_FACTOR * self.max_wait_s,
                    )
                    - now
                )
                if rows >= self.max_rows or left_s <= 0:
                    break
                self._cond.wait(timeout=left_s)
            for r in batch:
                self._waiting.remove(r)
                r.started = True
            self._running = batch
            return batch

    def _dispatch(self) -> None:
        while True:
            batch = self._take()
            try:
                if self.is_continuous and batch[0].key is not None:
                    self._run_continuous(batch)
                elif len(batch) == 1:
                    self._run_alone(batch[0])
                else:
                    self._run_batch(batch)
            except BaseException:  # noqa: BLE001 - the dispatcher must outlive any job
                log.exception("the batch dispatcher failed")
                for r in batch:
                    r.end(ModelError("the model server failed while running this job"))
            finally:
                with self._cond:
                    self._running = []

    def _run_alone(self, request: Request) -> None:
        self.stats.solo_jobs += 1
        if self.max_rows > 1:  # a family that batches says how each job ran
            request.put(Metric(0, {"batch_jobs": 1.0, "batch_rows": float(request.rows)}))
        started = time.perf_counter()
        try:
            for event in self.model.generate(request.params, request.ctx):
                request.put(event)
        except BaseException as exc:  # noqa: BLE001 - the job's failure, reported to it
            request.end(exc)
            return
        if self.max_rows > 1:
            request.put(Metric(0, {"batch_s": time.perf_counter() - started}))
        request.end()

    def _join(self, joined: list[Request], key: Hashable, free: int) -> list[Any]:
        """The jobs with `key` that have arrived, up to `free` rows, now part of the running
        batch `joined` (their index: their place in it)."""
        with self._cond:
            running = sum(1 for r in joined if not r.finished)
            room = min(free, self.max_rows - running)
            new = [r for r in self._waiting if r.key == key][: max(room, 0)]
            for r in new:
                self._waiting.remove(r)
                r.started = True
            start = len(joined)
            joined.extend(new)
            self._running = joined
        return [(start + n, r.params, r.ctx) for n, r in enumerate(new)]

    def _stepped(self, rows: int) -> None:
        self.stats.steps += 1
        if rows > 1:
            self.stats.shared_steps += 1
        self.stats.last_batch_jobs = rows
        self.stats.largest_batch_jobs = max(self.stats.largest_batch_jobs, rows)

    def _run_continuous(self, first: list[Request]) -> None:
        """Run jobs through the model's continuous batch until none runs and none waits."""
        joined: list[Request] = []
        key = first[0].key
        with self._cond:
            # _take already moved them out of the queue: back in front, in order, to join.
            self._waiting[:0] = [r for r in first if r not in self._waiting]
        assert key is not None
        try:
            items = self.model.generate_continuous(
                lambda free: self._join(joined, key, free), self._stepped
            )
            for index, item in items:
                r = joined[index]
                if item is None:
                    r.end()
                elif isinstance(item, BaseException):
                    r.end(item)
                else:
                    r.put(item)
        except BaseException as exc:  # noqa: BLE001 - isolate it: rerun the rest alone
            self._rerun_alone([r for r in joined if not r.finished], exc)
            return
        finally:
            if len(joined) > 1:
                self.stats.batches += 1
                self.stats.batched_jobs += len(joined)
            elif joined:
                self.stats.solo_jobs += 1
        for r in joined:  # a job the model forgot to end must not wait forever
            r.end(ModelError("the model ended without finishing this job"))

    def _rerun_alone(self, survivors: list[Request], exc: BaseException) -> None:
        log.warning(
            "a batch failed (%s: %s); running its %d unfinished jobs alone",
            type(exc).__name__,
            exc,
            len(survivors),
        )
        for r in survivors:
            if r.ctx.is_canceled():
                r.end(CanceledError(f"job {r.job_id} was canceled"))
            else:
                self._run_alone(r)

    def _run_batch(self, batch: list[Request]) -> None:
        rows = sum(r.rows for r in batch)
        log.info("running %d jobs (%d rows) as one batch", len(batch), rows)
        self.stats.batches += 1
        self.stats.batched_jobs += len(batch)
        self.stats.last_batch_jobs = len(batch)
        self.stats.largest_batch_jobs = max(self.stats.largest_batch_jobs, len(batch))
        metric = Metric(0, {"batch_jobs": float(len(batch)), "batch_rows": float(rows)})
        for r in batch:
            r.put(metric)
        started = time.perf_counter()
        try:
            jobs = [(r.params, r.ctx) for r in batch]
            for index, item in self.model.generate_batch(jobs):
                targets = batch if index is None else [batch[index]]
                for r in targets:
                    if isinstance(item, BaseException):
                        r.end(item)
                    else:
                        r.put(item)
        except BaseException as exc:  # noqa: BLE001 - isolate it: rerun the rest alone
            self._rerun_alone([r for r in batch if not r.finished], exc)
            return
        # The model time of the whole batch, for each job (bench/batching.py reads it).
        done = Metric(0, {"batch_s": time.perf_counter() - started})
        for r in batch:
            r.put(done)
            r.end()
