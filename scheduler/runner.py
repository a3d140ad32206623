"""Running one job: the body of the `run_job` Celery task. A broker message is a token for a
free slot on its queue: the runner claims the best queued job of that queue (core/fairness.py;
it may be another job than the message names), hands the work to a Ray actor, has its events
recorded as they stream back (scheduler/recorder.py) and ends the attempt by the outcome rules
(scheduler/outcomes.py). A token that starts nothing is handled in scheduler/tokens.py.

The task only orchestrates: it waits on Ray, so the Celery worker runs a thread pool and no GPU
work ever happens in its process. A second thread per job renews the lease and watches for a
cancel request; every write is fenced by the lease token, so an attempt whose lease was taken
over (it was too slow to renew, and the reaper requeued it) changes nothing.

The runner watches the actor doing the work (scheduler/stall.py): one that sends nothing and
answers no ping for GENQ_STALL_TIMEOUT_S is killed and its job goes back to the queue
(`stalled`). When the worker shuts down (`stopping`), each running attempt is released within
about a second, its job back in the queue.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError

from core.artifacts import ArtifactStore
from core.db import Database
from core.errors import InvalidInputError, LeaseLostError, StalledError, WorkerStoppingError
from core.events import Event, Log, Placement
from core.leases import Lease
from core.logs import current_job_context, job_context
from core.settings import Settings
from core.states import JobKind, JobState
from scheduler.attempt import JobSnapshot, claim_for_token
from scheduler.enqueue import Publisher
from scheduler.lease import LeaseKeeper
from scheduler.outcomes import BROKER_ERRORS, fail, succeed
from scheduler.preemption import TrainerPreempter
from scheduler.recorder import EventRecorder
from scheduler.stall import Liveness
from scheduler.tokens import claim_failed, unused_token, wake_held
from workers.families.base import Family
from workers.registry import get_family
from workers.room import free_by_node, is_unplaced, resource_of, waiting_for
from workers.server import ServingOptions, attempt_key

log = logging.getLogger(__name__)

# While a job's actor has sent nothing yet, the runner looks this often at why (its progress
# message says "waiting for a GPU" while Ray cannot place the actor).
START_LOOK_S = 1.0
# A model server's answer to `start` comes at the latest after this long: a job that runs
# longer is then read on as a stream, and is seen placed (no longer "loading the model")
# well within START_LOOK_S.
START_WAIT_S = 0.5
# What a job's log says when its server died before the job's first event and the job goes on,
# in the same attempt, on a live server.
MOVED_NOTICE = (
    "the model server stopped before this job's first event; running the job on a live server"
)


class Runner:
    """One per Celery worker process: the database, the broker publisher, the artifact store
    and the Ray connection, shared by the task threads."""

    def __init__(self, settings: Settings, database: Database, publisher: Publisher) -> None:
        self.settings = settings
        self.database = database
        self.publisher = publisher
        self.store = ArtifactStore.from_settings(settings)
        self._ray_lock = threading.Lock()
        self.serving = ServingOptions.from_settings(settings)
        # Set when the worker shuts down: running attempts give their jobs back at once.
        self.stopping = threading.Event()

    def connect_ray(self) -> None:
        if ray.is_initialized():
            return
        with self._ray_lock:
            if not ray.is_initialized():
                # With GENQ_NODE_IP set, the driver uses this machine's node at that address
                # (a machine may have several addresses; Ray would guess).
                ray.init(
                    address=self.settings.ray_address or "auto",
                    namespace="genq",
                    log_to_driver=False,
                    configure_logging=False,
                    _node_ip_address=self.settings.node_ip,
                )

    # -- the task body -----------------------------------------------------------------------

    def run(self, job_id: str, queue_hint: str | None = None) -> str:
        """A message for `job_id` says that a slot on its queue is free: claim the best queued
        job of that queue (core/fairness.py), which may be another one, and run it. Returns
        what happened (for logs). `queue_hint`: the queue the message came from."""
        try:
            claim = claim_for_token(
                self.database, job_id, queue_hint, lease_ttl_s=self.settings.lease_ttl_s
            )
        except Exception as exc:
            return claim_failed(self, job_id, queue_hint, exc)
        if claim.queue is None:
            log.info("not claimed (state missing)", extra={"job_id": job_id})
            return "skipped:missing"
        lease, snapshot = claim.lease, claim.snapshot
        if lease is None or snapshot is None:
            return unused_token(self, job_id, claim.queue)
        # The claimed job no longer needs a message. When it is not the token's own job, its
        # message is still in the broker and will serve the token's job (which keeps its
        # marker) in turn, so the number of messages still matches the queued jobs.
        try:
            self.publisher.forget(lease.job_id)
        except BROKER_ERRORS as exc:  # the marker expires by itself; the job runs regardless
            log.warning("could not drop the message marker: %s", exc, extra={"job_id": job_id})
        # Every line of this attempt (here and in the Ray actor) names the job (core/logs.py).
        with job_context(
            job_id=lease.job_id,
            tenant=snapshot.tenant_id,
            attempt=lease.attempt,
            request_id=snapshot.request_id,
        ):
            if lease.job_id != job_id:
                log.info("claimed %s with the token of %s", lease.job_id, job_id)
            log.info("claimed, attempt %d", lease.attempt, extra={"job_id": lease.job_id})
            keeper = LeaseKeeper(self.database, self.settings, lease, timeout_s=snapshot.timeout_s)
            keeper.begin()
            try:
                return self._drive(snapshot, lease, keeper)
            finally:
                keeper.stop()
                if snapshot.has_quota:
                    wake_held(self, snapshot.tenant_id)

    def _drive(self, job: JobSnapshot, lease: Lease, keeper: LeaseKeeper) -> str:
        from workers.actors import start_trainer, trainer_resources
        from workers.room import trainer_need
        from workers.routing import admit_trainer

        family = get_family(job.family)
        recorder = EventRecorder(self, job, lease)
        trainer = preempter = None
        succeeded = False
        stream: Iterator[Event]
        try:
            self.connect_ray()
            if job.kind == JobKind.GENERATE:
                stream = self._generate(job, family, keeper, recorder)
            else:
                trainer = start_trainer(
                    job.id,
                    family,
                    num_gpus=job.num_gpus,
                    gpu_memory_gb=job.gpu_memory_gb,
                    attempt=lease.token,
                )
                keeper.on_cancel = _trainer_stopper(
                    trainer, self.settings.cancel_grace_s, lease.token
                )
                preempter = TrainerPreempter(
                    trainer, self.settings.preemption_grace_s, job.id, lease.token
                )
                keeper.on_preempt = preempter
                need = trainer_need(trainer_resources(family, job.num_gpus, job.gpu_memory_gb))
                actor_id = trainer._actor_id.hex()
                # The pool unloads idle servers if the trainer fits nowhere, and keeps doing so
                # until Ray places it.
                said = admit_trainer(f"trainer-{job.id}", actor_id, need, job.priority)
                recorder.waiting(said, resource_of(said))
                ctx = self._train_ctx(job)
                refs: Any = trainer.train.remote(job.id, str(job.kind), job.params, ctx)
                if keeper.cancel_requested.is_set():  # canceled while the actor was starting
                    keeper.on_cancel()
                liveness = Liveness(trainer, self.settings.stall_timeout_s, "trainer", job.id)
                keeper.is_stalled = liveness.is_stalled
                stream = self._started(refs, trainer, need, recorder, "", liveness)
            for event in stream:
                recorder.record(event)
            # From here the attempt ends: the keeper raises no alarm about the token that the
            # finish itself clears.
            keeper.stop()
            if keeper.lost.is_set():
                return "lease-lost"
            outcome = succeed(self, job, lease, recorder)
            succeeded = outcome == JobState.SUCCEEDED
            return outcome
        except LeaseLostError:
            log.warning("lease lost while recording", extra={"job_id": job.id})
            keeper.abandon()
            return "lease-lost"
        except BaseException as exc:  # noqa: BLE001 - every outcome must end the attempt
            keeper.stop()
            return fail(self, job, lease, keeper, exc, recorder)
        finally:
            if preempter is not None:
                preempter.cancel()
            if trainer is not None:
                ray.kill(trainer)
            # Files of this attempt that are not the job's outputs (a stale attempt's, a
            # failed one's, a duplicate of an earlier attempt's) are deleted.
            recorder.discard_unrecorded(succeeded=succeeded)

    def _started(
        self,
        refs: Any,
        actor: Any,
        need: dict[str, float],
        recorder: EventRecorder,
        loading: str,
        liveness: Liveness,
        *,
        placed: bool = False,
    ) -> Iterator[Event]:
        """The events of `refs`; until the first comes, the job's progress message says what
        it waits for: the resource Ray lacks to place the actor, else `loading` (`placed`:
        the actor has sent events already). Between events it checks that the actor lives (a
        stalled one is killed: StalledError) and that the worker is not stopping
        (WorkerStoppingError)."""
        if not placed:
            self._await_first(refs, actor, need, recorder, loading)
        while True:
            self._check_stopping()
            if not ray.wait([refs], timeout=START_LOOK_S)[0]:
                try:
                    liveness.check()
                except StalledError:
                    ray.kill(actor, no_restart=True)
                    raise
                continue
            try:
                ref = next(refs)
            except StopIteration:
                return
            event = ray.get(ref)
            liveness.saw_event()
            yield event

    def _served(
        self,
        first: Any,
        key: str,
        server: Any,
        need: dict[str, float],
        recorder: EventRecorder,
        loading: str,
        liveness: Liveness,
    ) -> Iterator[Event]:
        """The events of an attempt on a model server: those of the answer `first` to its
        `start` (the whole job when it was quick), then, if it has not ended, those of a
        `follow` stream (workers/server.py). Until the answer, the job's progress message says
        what it waits for, as in `_started`."""
        self._await_first(first, server, need, recorder, loading)
        events, ended = ray.get(first)
        liveness.saw_event()
        yield from events
        if not ended:
            self._check_stopping()
            refs = server.follow.remote(key)
            yield from self._started(refs, server, need, recorder, loading, liveness, placed=True)

    def _await_first(
        self, ref: Any, actor: Any, need: dict[str, float], recorder: EventRecorder, loading: str
    ) -> None:
        """Until `ref` (the actor's first answer or stream) is ready, say on the job what it
        waits for, once a START_LOOK_S: the resource Ray lacks to place the actor, else
        `loading`; checking meanwhile that the worker is not stopping."""
        actor_id = actor._actor_id.hex()
        while not ray.wait([ref], timeout=START_LOOK_S)[0]:
            self._check_stopping()
            if is_unplaced(actor_id):
                said = waiting_for(need, free_by_node())
                recorder.waiting(said, resource_of(said))
            else:
                recorder.waiting(loading)

    def _check_stopping(self) -> None:
        if self.stopping.is_set():
            raise WorkerStoppingError("the worker is shutting down; the job goes back to the queue")

    def _generate(
        self, job: JobSnapshot, family: Family, keeper: LeaseKeeper, recorder: EventRecorder
    ) -> Iterator[Event]:
        """The events of a generate job from a replica of its model (the one with the fewest
        jobs in hand). A replica found dead before it sent anything (it crashed, or was
        unloaded, just after the pool handed it out) is replaced once, within the attempt: the
        job had not started on it."""
        from workers.room import server_need
        from workers.routing import choose_server

        assert job.serve_model_id is not None
        # The model's path as registered: the server fetches the folder on its own machine.
        model_dir = job.serve_model_path or None
        need = server_need(family, family.resources.num_gpus)
        inputs = self._read_inputs(job)
        # The replica found dead on the first try: the pool forgets it (and the rest are
        # checked) before the second. What this process saw is proof enough: Ray's control
        # store may still call a just-killed actor alive for a moment.
        dead: str | None = None
        for verify in (False, True):
            choice = choose_server(
                job.serve_model_id,
                family.name,
                model_dir,
                job.serve_model_config,
                self.serving,
                verify=verify,
                priority=job.priority,
                dead=dead,
            )
            actor = choice.handle
            liveness = Liveness(actor, self.settings.stall_timeout_s, "model server", job.id)
            keeper.is_stalled = liveness.is_stalled
            # Every message names the attempt (its lease token; workers/server.py).
            token = keeper.lease.token
            keeper.on_cancel = lambda actor=actor, token=token: actor.cancel.remote(job.id, token)
            if keeper.cancel_requested.is_set():  # canceled while the server was starting
                keeper.on_cancel()
            started = False
            try:
                first: Any = actor.start.remote(
                    job.id,
                    job.params,
                    token,
                    log_context=current_job_context(),
                    adapter=job.adapter,
                    inputs=inputs,
                    number=keeper.lease.attempt,
                    wait_s=START_WAIT_S,
                )
                loading = "loading the model"
                key = attempt_key(job.id, token)
                for event in self._served(first, key, actor, need, recorder, loading, liveness):
                    # Where the job landed comes first and is no work done: a server that dies
                    # after it has still not started the job, which then runs on a live one.
                    started = started or not isinstance(event, Placement)
                    yield event
                return
            except (ActorDiedError, ActorUnavailableError) as exc:
                if started or verify:
                    raise
                if isinstance(exc, ActorDiedError):
                    dead = actor._actor_id.hex()
                log.warning("model server gone, trying a live one: %s", exc)
                yield Log(MOVED_NOTICE, level="warning")
            finally:
                choice.done()

    def _read_inputs(self, job: JobSnapshot) -> dict[str, bytes]:
        """The bytes of the input files the job names (each at most input_max_bytes)."""
        if job.input_error is not None:
            raise job.input_error
        inputs = {}
        limit = self.settings.input_max_bytes
        for name, key in job.input_keys.items():
            try:
                with self.store.open(key) as stream:
                    data = stream.read(limit + 1)
            except FileNotFoundError:
                raise InvalidInputError.one(f"params.{name}", "the input file is gone") from None
            if len(data) > limit:
                raise InvalidInputError.one(
                    f"params.{name}", f"the input file is over {limit} bytes"
                )
            inputs[name] = data
        return inputs

    def _train_ctx(self, job: JobSnapshot) -> dict[str, Any]:
        """What a trainer on any machine needs: the store's URL and keys in it (never a path
        on this machine; see workers/staging.py)."""
        ctx: dict[str, Any] = {
            "artifact_url": self.store.url,
            "dataset": job.dataset,
            "model_dir_rel": self.store.model_dir(job.id),
            # What the trainer's log lines say about the job (core/logs.py).
            "log_context": current_job_context(),
        }
        if job.kind == JobKind.FINETUNE and job.model_path:
            ctx["parent_model_path"] = job.model_path
            ctx["parent_config"] = job.model_config
        return ctx


def _trainer_stopper(trainer: Any, grace_s: float, attempt: str) -> Callable[[], None]:
    """Ask a trainer to stop at its next step (the request names the attempt); kill it if it
    has not after `grace_s` (its GPU is freed either way, and the attempt ends canceled)."""

    def stop() -> None:
        trainer.cancel.remote(attempt)
        timer = threading.Timer(grace_s, lambda: ray.kill(trainer))
        timer.daemon = True
        timer.start()

    return stop
