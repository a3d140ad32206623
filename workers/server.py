"""The model server: one loaded model kept warm, running concurrent generate jobs through the
batcher (workers/batching.py), unloading itself after a spell without jobs.

`ModelServer` is a plain class: workers/actors.py makes it a Ray actor (one per registered
model, named, detached), and bench/gpu_batching.py drives it directly where Ray is not
installed, so nothing here imports Ray at module level. Its `generate` is a generator of
core.events; errors reach the caller as genq errors or CanceledError (see workers/actors.py).

The runner calls `start` instead, a plain call that begins the attempt and answers with its
first events, a list: at once when the attempt ends, COALESCE_S after its first event (a burst
travels as one answer), or after the caller's `wait_s`. A Ray streaming call costs its caller
and this actor about twice what a plain call does, however few its items
(bench/server_calls.py), so a quick job, most of them, costs one plain call; an attempt still
running after its answer is read to its end with `follow`, a stream, whose further events cost
little each. An attempt is the server's from its start to its end; one that nobody follows
within ABANDON_S of its start (its worker died in between) is canceled and dropped.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from core.artifacts import ArtifactStore
from core.errors import TransientError
from core.events import Event, Placement
from core.settings import Settings
from workers.batching import WAIT_POLL_S, Batcher, Request
from workers.families.base import CanceledError, RunContext
from workers.registry import get_family
from workers.staging import Staging, store_errors

log = logging.getLogger(__name__)

# A cancel for a job this server has not seen (yet) is remembered this long.
CANCEL_TTL_S = 600.0
# The answer to `start` waits this long after the job's first event for more (a model's burst
# of events travels as one answer).
COALESCE_S = 0.02
# An attempt nobody has read for this long was given up by its worker (it died between its
# `start` and its `follow`): the server drops it, looking this often.
ABANDON_S = 120.0
REAP_EVERY_S = 5.0


@dataclass(eq=False)
class _Run:
    """An attempt started here: its batcher request and when it was last read (monotonic)."""

    key: str
    request: Request
    about: dict[str, Any]
    read_at: float


@dataclass(frozen=True)
class ServingOptions:
    """The settings a model server and the pool that places servers need (from Settings, so
    the actors need not read the environment themselves)."""

    batch_max_wait_ms: float = 10.0
    batch_min_rows: int = 16
    # The most rows (images, or language-model jobs) one batch holds; 0: each family's own.
    batch_max_rows: int = 0
    idle_unload_s: float | None = 900.0
    # The last replica of a model unloads after this long idle (None: as idle_unload_s).
    last_idle_unload_s: float | None = None
    gpu_memory_budget_gb: float | None = None
    # Progress events are passed on to a job at most this often (its last one always).
    progress_interval_s: float = 0.0
    # The artifact store that a model's path is a key of (core/artifacts.py); the server
    # downloads the folder into its machine's cache. None: model paths are local folders.
    artifact_url: str | None = None
    # A ready replica that answers no info() call for this long is stalled: the pool kills it.
    stall_timeout_s: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> ServingOptions:
        return cls(
            batch_max_wait_ms=settings.batch_max_wait_ms,
            batch_min_rows=settings.batch_min_rows,
            batch_max_rows=settings.batch_max_rows,
            idle_unload_s=settings.model_idle_unload_s,
            last_idle_unload_s=settings.model_last_idle_unload_s,
            gpu_memory_budget_gb=settings.gpu_memory_budget_gb,
            # The runner writes progress this often at most: sending more is wasted (each event
            # is a Ray message per job; a batch of 16 jobs would send 16 per interval).
            progress_interval_s=settings.progress_interval_s,
            artifact_url=ArtifactStore.from_settings(settings).url,
            stall_timeout_s=settings.stall_timeout_s,
        )


def device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def gpu_info(device: str) -> dict[str, Any] | None:
    """What this actor's GPU reports (for the dashboard), or None on a CPU. Utilisation needs
    NVML (the nvidia-ml-py package); without it that field is None rather than a guess."""
    if device != "cuda":
        return None
    import torch

    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    try:
        utilization: int | None = int(torch.cuda.utilization(index))
    except Exception:  # no NVML
        utilization = None
    return {
        "index": index,
        "name": props.name,
        "memory_allocated_bytes": int(torch.cuda.memory_allocated(index)),
        "memory_reserved_bytes": int(torch.cuda.memory_reserved(index)),
        "memory_total_bytes": int(props.total_memory),
        "utilization_percent": utilization,
    }


def ray_placement() -> dict[str, Any]:
    """The Ray resources, GPU ids and node of this actor; empty outside Ray."""
    try:
        import ray
    except ImportError:
        return {}
    if not ray.is_initialized():
        return {}
    context = ray.get_runtime_context()
    return {
        "resources": dict(context.get_assigned_resources()),
        "gpu_ids": [str(i) for i in context.get_accelerator_ids().get("GPU", [])],
        "node_id": context.get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "hostname": socket.gethostname(),
        "replica": context.get_actor_name() or "",
    }


def placement_event(
    load_s: float | None = None, loaded_at: float | None = None
) -> Placement | None:
    """Where this actor runs, as the first event of a job; None outside Ray."""
    where = ray_placement()
    if not where:
        return None
    return Placement(
        node_id=where["node_id"],
        node_ip=where["node_ip"],
        hostname=where["hostname"],
        gpu_ids=where["gpu_ids"],
        replica=where["replica"],
        load_s=load_s,
        loaded_at=loaded_at,
    )


def attempt_key(job_id: str, attempt: str) -> str:
    """How a server tells attempts of one job apart (`attempt`: the lease token)."""
    return f"{job_id}#{attempt}" if attempt else job_id


class ModelServer:
    """One model, loaded once and kept warm. Concurrent jobs with the same batch key run as
    one batch; a job waiting for its turn can still be canceled. `on_idle` is called once the
    server has had no job for `idle_unload_s` (the Ray actor kills itself there)."""

    def __init__(
        self,
        family: str,
        model_dir: str | None,
        config: dict[str, Any],
        options: ServingOptions | None = None,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        self.family = get_family(family)
        self.options = options or ServingOptions()
        # A family that asks for no GPU runs on the CPU: no torch import (echo starts in a
        # second, which is what a new replica of it costs).
        self.device = device_name() if self.family.resources.num_gpus > 0 else "cpu"
        started = time.perf_counter()
        self._placement = placement_event()
        implementation = self.family.load_implementation()
        folder = Path(model_dir) if model_dir else None
        if model_dir and self.options.artifact_url:  # on any machine: from the store
            with store_errors():
                folder = Staging.for_url(self.options.artifact_url).model_folder(model_dir)
        self.model = implementation.load(folder, config, self.device)
        self.load_s = time.perf_counter() - started
        self.jobs_served = 0
        self.loaded_at = time.time()
        self.last_used_at = self.loaded_at
        self._last_used = time.monotonic()
        self._state_lock = threading.Lock()
        # attempt_key -> when its cancel was asked; the attempts running or waiting here.
        self._canceled: dict[str, float] = {}
        # attempt key -> when it arrived (monotonic): the attempts running or waiting here.
        self._active: dict[str, float] = {}
        # job id -> {attempt key: attempt number} of the numbered attempts here (see generate).
        self._numbers: dict[str, dict[str, int]] = {}
        # attempt key -> the attempt, from its start to its end or its reader giving it up.
        self._runs: dict[str, _Run] = {}
        self.abandon_s = ABANDON_S
        # Seconds of jobs in hand, summed over the jobs that have left: with the running ones,
        # the pool's measure of this replica's load (its mean jobs in hand between two looks).
        self._in_hand_done_s = 0.0
        self.batcher = Batcher(
            self.model,
            self.family,
            max_wait_s=self.options.batch_max_wait_ms / 1000,
            min_rows=self.options.batch_min_rows,
            progress_interval_s=self.options.progress_interval_s,
            max_rows=self.options.batch_max_rows,
        )
        threading.Thread(target=self._reap, name="reaper", daemon=True).start()
        if on_idle is not None and self.options.idle_unload_s:
            watcher = threading.Thread(
                target=self._watch_idle, args=(on_idle,), name="idle-unload", daemon=True
            )
            watcher.start()
        if self._placement is not None:
            self._placement = replace(self._placement, load_s=self.load_s, loaded_at=self.loaded_at)
        log.info("loaded %s model on %s in %.2f s", family, self.device, self.load_s)

    def _is_canceled(self, key: str) -> Callable[[], bool]:
        return lambda: key in self._canceled

    def generate(
        self,
        job_id: str,
        params: dict[str, Any],
        attempt: str = "",
        log_context: dict[str, Any] | None = None,
        adapter: dict[str, str] | None = None,
        inputs: dict[str, bytes] | None = None,
        number: int = 0,
    ) -> Iterator[Event]:
        """Run one attempt of a job, yielding its events (a Ray streaming call; the runner
        uses `start` and `follow` instead, which cost less per job). `attempt` (the attempt's
        lease token) names it: a cancel must name the same attempt to stop it, so a stale
        attempt of a job (its worker was paused past its lease) cannot stop the attempt that
        took over. `number` (the attempt's number, 0 for none) lets a newer attempt end an
        older one still here: a job's attempt n+1 is claimed only once attempt n has lost its
        lease, so whatever n still does is fenced off and would only hold a place in the batch
        (its worker was killed, say, and nothing reads its events). The older attempt ends as
        canceled; one arriving after a newer one is canceled at once. `log_context`: what
        this server's lines about the job carry (job_id, tenant, attempt, request_id;
        core/logs.py). `adapter`: {"id", "path"} of an adapter version this base serves (its
        path as registered, fetched to this machine); `inputs`: the bytes of the files the
        params name."""
        run = self._begin(job_id, params, attempt, log_context, adapter, inputs, number)
        lead = (self._placement,) if self._placement is not None else ()
        yield from self._follow(run, lead)

    def start(
        self,
        job_id: str,
        params: dict[str, Any],
        attempt: str = "",
        log_context: dict[str, Any] | None = None,
        adapter: dict[str, str] | None = None,
        inputs: dict[str, bytes] | None = None,
        number: int = 0,
        wait_s: float = 1.0,
    ) -> tuple[list[Event], bool]:
        """Begin one attempt of a job (the arguments as for `generate`) and answer with its
        first events (this server's placement first) and whether it has ended: once it ends,
        COALESCE_S after its first event, or after `wait_s`. The job's error comes out of this
        call, or of `follow` when events came before it. An attempt that has not ended is
        read on with `follow(attempt_key(job_id, attempt))`."""
        run = self._begin(job_id, params, attempt, log_context, adapter, inputs, number)
        lead = (self._placement,) if self._placement is not None else ()
        return self._take(run, wait_s, COALESCE_S, lead)

    def follow(self, key: str) -> Iterator[Event]:
        """The events of an attempt begun by `start` that its answer did not carry, as they
        come (a Ray streaming call: each further event costs little once it is open), until
        the attempt ends; its error, if it failed, at the end. An attempt nobody followed
        within `abandon_s` of its start (ABANDON_S) was dropped: TransientError."""
        with self._state_lock:
            run = self._runs.get(key)
        if run is None:
            raise TransientError(
                f"the model server holds no attempt {key}: it has ended, or it was dropped "
                f"when nobody followed it for {self.abandon_s:g} s"
            )
        yield from self._follow(run)

    def _follow(self, run: _Run, lead: tuple[Event, ...] = ()) -> Iterator[Event]:
        ended = False
        try:
            while not ended:
                events, ended = self._take(run, WAIT_POLL_S, 0.0, lead)
                lead = ()
                for event in events:  # noqa: UP028 - Ray sends to the generator: no `yield from`
                    yield event
        finally:
            if not ended:  # the reader stopped early, or the job raised (already ended)
                self._drop(run.key)

    def _begin(
        self,
        job_id: str,
        params: dict[str, Any],
        attempt: str,
        log_context: dict[str, Any] | None,
        adapter: dict[str, str] | None,
        inputs: dict[str, bytes] | None,
        number: int,
    ) -> _Run:
        """Register an attempt and hand it to the batcher (unless it was canceled already:
        its first answer then says so)."""
        key = attempt_key(job_id, attempt)
        about = {**(log_context or {}), "job_id": job_id}
        log.info("job received (%s)", self.family.name, extra=about)
        ctx = RunContext(
            job_id=job_id,
            device=self.device,
            is_canceled=self._is_canceled(key),
            min_rows=self.options.batch_min_rows,
            adapter=self._adapter_folder(adapter) if adapter else None,
            inputs=dict(inputs or {}),
        )
        request = self.batcher.request(job_id, params, ctx)
        run = _Run(key, request, about, read_at=time.monotonic())
        with self._state_lock:
            self._active[key] = time.monotonic()
            self._runs[key] = run
            if number:
                self._supersede(job_id, key, number, about)
            self._touch()
        if ctx.is_canceled():
            request.end(CanceledError(f"job {job_id} was canceled"))
        else:
            self.batcher.submit(request)
        return run

    def _take(
        self, run: _Run, wait_s: float, coalesce_s: float, lead: tuple[Event, ...] = ()
    ) -> tuple[list[Event], bool]:
        run.read_at = time.monotonic()
        try:
            events, ended = self.batcher.take(run.request, wait_s, coalesce_s, lead)
        except BaseException as exc:
            log.info("job ended: %s", type(exc).__name__, extra=run.about)
            self._drop(run.key)
            raise
        if ended:
            self.jobs_served += 1
            log.info("job done", extra=run.about)
            self._drop(run.key)
        return events, ended

    def _drop(self, key: str) -> None:
        """The attempt has left this server: it ended, or its reader gave it up (then it is
        canceled, so that it stops at its next cancel check instead of running for no one)."""
        now = time.monotonic()
        with self._state_lock:
            run = self._runs.pop(key, None)
            arrived = self._active.pop(key, None)
            if arrived is not None:
                self._in_hand_done_s += now - arrived
            if run is not None and not run.request.finished:
                self._canceled[key] = now
            else:
                self._canceled.pop(key, None)
            job_id = key.partition("#")[0]
            numbered = self._numbers.get(job_id)
            if numbered is not None:
                numbered.pop(key, None)
                if not numbered:
                    del self._numbers[job_id]
            self._touch()

    def _reap(self) -> None:
        """Drop the attempts started here that nobody has read for ABANDON_S: their worker
        died or gave them up (a newer attempt would end them too, but one may never come)."""
        while True:
            time.sleep(min(REAP_EVERY_S, self.abandon_s / 4))
            now = time.monotonic()
            with self._state_lock:
                gone = [k for k, run in self._runs.items() if now - run.read_at > self.abandon_s]
            for key in gone:
                log.warning("attempt %s not read for %.0f s: dropped", key, self.abandon_s)
                self._drop(key)

    def _supersede(self, job_id: str, key: str, number: int, about: dict[str, Any]) -> None:
        """Cancel the attempts of `job_id` here older than `number`, or this one (`key`) if a
        newer one is here. Called under the state lock."""
        numbered = self._numbers.setdefault(job_id, {})
        now = time.monotonic()
        if any(other > number for other in numbered.values()):
            log.warning("attempt %d arrived after a newer one: canceled", number, extra=about)
            self._canceled[key] = now
        for older, other in numbered.items():
            if other < number:
                log.warning("attempt %d ends attempt %d, still here", number, other, extra=about)
                self._canceled[older] = now
        numbered[key] = number

    def _adapter_folder(self, adapter: dict[str, str]) -> dict[str, str]:
        folder = Path(adapter["path"])
        if self.options.artifact_url:  # on any machine: from the store
            with store_errors():
                folder = Staging.for_url(self.options.artifact_url).model_folder(adapter["path"])
        return {"id": adapter["id"], "dir": str(folder)}

    def _touch(self) -> None:
        self._last_used = time.monotonic()
        self.last_used_at = time.time()

    def _watch_idle(self, on_idle: Callable[[], None]) -> None:
        idle_s = float(self.options.idle_unload_s or 0)
        while True:
            time.sleep(min(1.0, idle_s / 4))
            with self._state_lock:
                quiet_s = time.monotonic() - self._last_used
                if self._active or self.batcher.pending_jobs() or quiet_s < idle_s:
                    continue
            log.info("no job for %.0f s: unloading the %s model", quiet_s, self.family.name)
            on_idle()
            return

    def cancel(self, job_id: str, attempt: str = "") -> bool:
        """Ask an attempt of a job to stop; True if it is running or waiting here now. Only
        the attempt named stops: another attempt of the same job is not touched. A cancel for
        an attempt that has not arrived yet is kept for CANCEL_TTL_S, so a cancel that
        overtakes its generate call still works."""
        key = attempt_key(job_id, attempt)
        now = time.monotonic()
        with self._state_lock:
            for stale in [j for j, at in self._canceled.items() if now - at > CANCEL_TTL_S]:
                if stale not in self._active:
                    del self._canceled[stale]
            self._canceled[key] = now
            return key in self._active

    def ping(self) -> int:
        """Liveness: answered by any thread of a live, unpaused server (the runner's stall watch,
        scheduler/stall.py). Returns this process's id."""
        return os.getpid()

    def info(self) -> dict[str, Any]:
        with self._state_lock:
            active = sorted(key.partition("#")[0] for key in self._active)
            clock_s = time.monotonic()
            in_hand_s = self._in_hand_done_s + sum(clock_s - at for at in self._active.values())
        return {
            "family": self.family.name,
            "device": self.device,
            "load_s": self.load_s,
            "jobs_served": self.jobs_served,
            "active_jobs": active,
            # Job-seconds in hand so far, on this server's own clock: between two answers,
            # their difference over the clock's is the mean jobs in hand (the scaler's load).
            "in_hand_job_s": in_hand_s,
            "clock_s": clock_s,
            "loaded_at": self.loaded_at,
            "last_used_at": self.last_used_at,
            "idle_s": 0.0 if active else time.monotonic() - self._last_used,
            "batching": {
                "max_batch_size": self.batcher.max_rows,
                "max_wait_ms": self.options.batch_max_wait_ms,
                "min_rows": self.options.batch_min_rows,
                **asdict(self.batcher.stats),
            },
            "idle_unload_s": self.options.idle_unload_s,
            "resources": {},
            **ray_placement(),
            "gpu": gpu_info(self.device),
        }
