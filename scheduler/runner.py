"""Running one job: claim its row, hand the work to a Ray actor, record the events it streams
back, store its outputs, and finish the row. This is the body of the `run_job` Celery task.

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
from dataclasses import dataclass, field
from typing import Any

import kombu.exceptions
import ray
import redis
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    ObjectLostError,
    RayActorError,
    RayTaskError,
)
from sqlalchemy import bindparam, select

from core.artifacts import ArtifactStore
from core.catalog import register_model
from core.db import Database, is_transient_db_error, retry_transient
from core.errors import (
    GenqError,
    InvalidInputError,
    JobFailedError,
    LeaseLostError,
    StalledError,
    WorkerStoppingError,
)
from core.events import Event, Log, Placement
from core.fairness import claim_next
from core.inputfiles import resolve_input
from core.jobs import (
    Lease,
    finish_job,
    has_succeeded,
    release_job,
    retry_backoff_s,
)
from core.logs import current_job_context, job_context
from core.preemption import requeue_preempted
from core.settings import Settings
from core.states import JobKind, JobState
from core.tables import Dataset, Job, Model, Tenant, utcnow
from scheduler.enqueue import Publication, Publisher
from scheduler.lease import LeaseKeeper
from scheduler.preemption import TrainerPreempter
from scheduler.recorder import EventRecorder
from scheduler.stall import Liveness
from workers.families.base import CanceledError, Family
from workers.registry import get_family
from workers.room import free_by_node, is_unplaced, resource_of, waiting_for
from workers.server import ServingOptions

log = logging.getLogger(__name__)

_QUEUE_OF = select(Job.queue).where(Job.id == bindparam("job_id"))
# While a job's actor has sent nothing yet, the runner looks this often at why (its progress
# message says "waiting for a GPU" while Ray cannot place the actor).
START_LOOK_S = 1.0

# Failures of the Ray machinery itself (an actor or node died): worth another attempt.
RAY_TRANSIENT = (ActorDiedError, ActorUnavailableError, RayActorError, ObjectLostError)
# The broker (Redis) could not be reached.
BROKER_ERRORS = (redis.ConnectionError, redis.TimeoutError, kombu.exceptions.OperationalError)


def is_infrastructure_error(exc: BaseException) -> bool:
    """A database or broker error: it says nothing about the job, so the attempt is released
    without using up one of the job's attempts (and is never a `model-error`)."""
    return is_transient_db_error(exc) or isinstance(exc, BROKER_ERRORS)


@dataclass
class JobSnapshot:
    """What the runner needs of the job row, read once right after the claim."""

    id: str
    tenant_id: str
    kind: JobKind
    family: str
    queue: str
    priority: int
    params: dict[str, Any]
    target_name: str | None
    model_id: str | None = None
    model_path: str | None = None
    model_config: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] | None = None
    dataset_id: str | None = None
    timeout_s: float | None = None
    num_gpus: float | None = None
    gpu_memory_gb: float | None = None
    # The tenant has a running cap or a budget: its held jobs may need a token when this ends.
    has_quota: bool = False
    # X-Request-ID of the submission (log lines carry it).
    request_id: str | None = None
    # A generate job on an adapter version (config `served_by_base`) runs on its base model's
    # servers: the base's id, path and config, and the adapter {"id", "path"} sent per job.
    serve_model_id: str | None = None
    serve_model_path: str | None = None
    serve_model_config: dict[str, Any] = field(default_factory=dict)
    adapter: dict[str, str] | None = None
    # Input files the params name (Family.input_fields): param -> key in the artifact store.
    input_keys: dict[str, str] = field(default_factory=dict)
    input_error: GenqError | None = None


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
            with self.database.transaction() as session:
                queue = session.scalar(_QUEUE_OF, {"job_id": job_id})
                if queue is None:
                    log.info("not claimed (state missing)", extra={"job_id": job_id})
                    return "skipped:missing"
                lease = claim_next(session, queue, lease_ttl_s=self.settings.lease_ttl_s)
                if lease is not None:
                    snapshot = self._snapshot(session, lease.job_id)
        except Exception as exc:
            return self._claim_failed(job_id, queue_hint, exc)
        if lease is None:
            return self._unused_token(job_id, queue)
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
            keeper.start()
            try:
                return self._drive(snapshot, lease, keeper)
            finally:
                keeper.stop()
                if snapshot.has_quota:
                    self._wake_held(snapshot.tenant_id, queue)

    def _claim_failed(self, job_id: str, queue: str | None, exc: Exception) -> str:
        """The claim's transaction failed (nothing of it was written): the message that
        carried the token is consumed, so the job gets a new one, after the first backoff;
        where that cannot be sent (or the queue is not known) its marker is dropped, and the
        reconciler re-publishes it within GENQ_REPUBLISH_AFTER_S."""
        log.warning("the claim failed; the job stays queued: %s: %s", type(exc).__name__, exc,
                    extra={"job_id": job_id})  # fmt: skip
        sent = []
        if queue:
            again = Publication(job_id, queue, countdown_s=self.settings.retry_backoff_base_s)
            sent = self.publisher.publish(self.database, [again], mark=False)
        if not sent:
            try:
                self.publisher.forget(job_id)
            except BROKER_ERRORS:
                log.exception("could not drop the message marker", extra={"job_id": job_id})
        return "claim-failed"

    def _unused_token(self, job_id: str, queue: str) -> str:
        """A token that found nothing to start: every queued job of the queue waits for its
        backoff or its tenant's quota (or the queue is empty). Its own job, if waiting for a
        backoff, gets its message back when due. Otherwise one queued job (its own, if still
        queued) keeps its marker for only `held_recheck_s`: then the reconciler sends a new
        token, unless the end of a job of a capped tenant has sent one sooner."""
        now = utcnow()
        with self.database.transaction() as session:
            row = session.get(Job, job_id)
            state = row.state if row is not None else "missing"
            due_in_s = None
            if row is not None and row.state == JobState.QUEUED and row.not_before is not None:
                due_in_s = (row.not_before - now).total_seconds()
            waiting = list(
                session.scalars(
                    select(Job.id)
                    .where(Job.state == JobState.QUEUED, Job.queue == queue)
                    .order_by(Job.id)
                    .limit(50)
                )
            )
        if due_in_s is not None and due_in_s > 0:
            assert row is not None
            self.publisher.publish(
                self.database, [Publication(job_id, queue, row.priority, countdown_s=due_in_s)]
            )
        else:
            first = [job_id] if state == JobState.QUEUED else []
            if self.publisher.hold(first + waiting, self.settings.held_recheck_s) is None and first:
                self.publisher.forget(job_id)
        log.info("not claimed (state %s)", state, extra={"job_id": job_id})
        return f"skipped:{state}"

    def _wake_held(self, tenant_id: str, queue: str) -> None:
        """A job of a tenant with quotas ended: its queued jobs' tokens may have been used up
        while it was at its cap, so send one more. It is sent whether or not one is in flight:
        checking would race with a token being turned away right now, and a spare token only
        finds nothing to start (or starts other work)."""
        try:
            with self.database.transaction() as session:
                first = session.execute(
                    select(Job.id, Job.queue, Job.priority)
                    .where(Job.state == JobState.QUEUED, Job.tenant_id == tenant_id)
                    .order_by(Job.priority.desc(), Job.created_at)
                    .limit(1)
                ).first()
            if first is not None:
                self.publisher.publish(
                    self.database, [Publication(first.id, first.queue, first.priority)]
                )
        except Exception:  # the reconciler covers it
            log.exception("could not wake the held jobs of tenant %s", tenant_id)

    def _snapshot(self, session: Any, job_id: str) -> JobSnapshot:
        job = session.get(Job, job_id)  # the claim loaded it
        assert job is not None
        snap = JobSnapshot(
            id=job.id,
            tenant_id=job.tenant_id,
            kind=JobKind(job.kind),
            family=job.family,
            queue=job.queue,
            priority=job.priority,
            params=dict(job.params),
            target_name=job.target_name,
            model_id=job.model_id,
            dataset_id=job.dataset_id,
            timeout_s=job.timeout_s,
            num_gpus=job.num_gpus,
            gpu_memory_gb=job.gpu_memory_gb,
            request_id=job.request_id,
        )
        tenant = session.get(Tenant, job.tenant_id)
        snap.has_quota = tenant is not None and (
            tenant.max_running is not None or tenant.gpu_seconds_budget is not None
        )
        if job.model_id:
            model = session.get(Model, job.model_id)
            snap.model_path = model.path
            snap.model_config = dict(model.config or {})
            snap.serve_model_id, snap.serve_model_path = model.id, model.path
            snap.serve_model_config = snap.model_config
            base = session.get(Model, model.parent_id) if model.parent_id else None
            if snap.model_config.get("served_by_base") and base is not None:
                snap.serve_model_id, snap.serve_model_path = base.id, base.path
                snap.serve_model_config = dict(base.config or {})
                snap.adapter = {"id": model.id, "path": model.path or ""}
        if snap.kind == JobKind.GENERATE:
            try:
                for name in get_family(job.family).input_fields:
                    if isinstance(ref := snap.params.get(name), str):
                        snap.input_keys[name] = resolve_input(
                            session, job.tenant_id, ref, f"params.{name}"
                        )
            except GenqError as exc:  # deleted since submit: the attempt fails on it
                snap.input_error = exc
        if job.dataset_id:
            ds = session.get(Dataset, job.dataset_id)
            # `path`: the data set's key in the store; the trainer fetches it where it runs.
            snap.dataset = {"name": ds.name, "kind": ds.kind, "path": ds.path}
        return snap

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
            outcome = self._succeed(job, lease, recorder)
            succeeded = outcome == JobState.SUCCEEDED
            return outcome
        except LeaseLostError:
            log.warning("lease lost while recording", extra={"job_id": job.id})
            keeper.abandon()
            return "lease-lost"
        except BaseException as exc:  # noqa: BLE001 - every outcome must end the attempt
            keeper.stop()
            return self._fail(job, lease, keeper, exc, recorder)
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
    ) -> Iterator[Event]:
        """The events of `refs`; until the first comes, the job's progress message says what
        it waits for: the resource Ray lacks to place the actor, else `loading`. Between
        events it checks that the actor lives (a stalled one is killed: StalledError) and that
        the worker is not stopping (WorkerStoppingError)."""
        actor_id = actor._actor_id.hex()
        while not ray.wait([refs], timeout=START_LOOK_S)[0]:
            self._check_stopping()
            if is_unplaced(actor_id):
                said = waiting_for(need, free_by_node())
                recorder.waiting(said, resource_of(said))
            else:
                recorder.waiting(loading)
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
        for verify in (False, True):
            choice = choose_server(
                job.serve_model_id,
                family.name,
                model_dir,
                job.serve_model_config,
                self.serving,
                verify=verify,
                priority=job.priority,
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
                refs: Any = actor.generate.remote(
                    job.id,
                    job.params,
                    token,
                    log_context=current_job_context(),
                    adapter=job.adapter,
                    inputs=inputs,
                )
                loading = "loading the model"
                for event in self._started(refs, actor, need, recorder, loading, liveness):
                    # Where the job landed comes first and is no work done: a server that dies
                    # after it has still not started the job, which then runs on a live one.
                    started = started or not isinstance(event, Placement)
                    yield event
                return
            except (ActorDiedError, ActorUnavailableError) as exc:
                if started or verify:
                    raise
                log.warning("model server gone, trying a live one: %s", exc)
                yield Log(
                    "the model server stopped before this job's first event; "
                    "running the job on a live server",
                    level="warning",
                )
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

    # -- endings -----------------------------------------------------------------------------

    def _succeed(self, job: JobSnapshot, lease: Lease, recorder: EventRecorder) -> str:
        """The fenced finish: the outputs, the model and the state in one transaction, tried
        again on a lost connection. A try whose commit was lost in flight but applied shows
        as a lease no longer held by a job this attempt marked succeeded."""
        try:
            state = retry_transient(
                lambda: self._finish_succeeded(job, lease, recorder),
                within_s=self.settings.transient_retry_s,
                what=f"job {job.id}: finishing",
            )
        except LeaseLostError:
            with self.database.read() as session:
                if not has_succeeded(session, lease):
                    raise
            recorder.committed()
            state = JobState.SUCCEEDED
        log.info("finished: %s", state, extra={"job_id": job.id})
        return str(state)

    def _finish_succeeded(self, job: JobSnapshot, lease: Lease, recorder: EventRecorder) -> str:
        with self.database.transaction() as session:
            recorder.write_pending(session)
            result_model_id = None
            if job.kind in (JobKind.TRAIN, JobKind.FINETUNE):
                saved = recorder.model_saved
                if saved is None:
                    state = finish_job(
                        session,
                        lease,
                        JobState.FAILED,
                        error_type="model-error",
                        error_detail="training ended without saving a model",
                    )
                    return str(state)
                model = register_model(
                    session,
                    tenant_id=job.tenant_id,
                    name=job.target_name or job.family,
                    family=job.family,
                    path=saved.path,
                    config=saved.config,
                    metrics=saved.metrics,
                    dataset_id=job.dataset_id,
                    parent_id=job.model_id if job.kind == JobKind.FINETUNE else None,
                    job_id=job.id,
                )
                result_model_id = model.id
            state = finish_job(
                session,
                lease,
                JobState.SUCCEEDED,
                metrics=recorder.final_metrics,
                result_model_id=result_model_id,
            )
        recorder.committed()
        return str(state)

    def _fail(
        self,
        job: JobSnapshot,
        lease: Lease,
        keeper: LeaseKeeper,
        exc: BaseException,
        recorder: EventRecorder | None = None,
    ) -> str:
        cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
        backoff_s = retry_backoff_s(
            lease.attempt,
            base_s=self.settings.retry_backoff_base_s,
            cap_s=self.settings.retry_backoff_max_s,
        )
        if keeper.lost.is_set():
            return "lease-lost"
        # Preempted (core/preemption.py): back to the queue without using an attempt, held
        # off for a while so that the slot goes to the job it made room for.
        preempted = keeper.preempt_requested.is_set() and not keeper.cancel_requested.is_set()
        hold_s = self.settings.preempt_after_s
        try:
            state = retry_transient(
                lambda: self._end_attempt(job, lease, keeper, cause, recorder, backoff_s),
                within_s=self.settings.transient_retry_s,
                what=f"job {job.id}: ending the attempt",
            )
        except LeaseLostError:
            return "lease-lost"
        except Exception:
            # The database stayed out of reach: the lease expires and the reaper gives the
            # job back to the queue (or fails it `lost` once its attempts are used up).
            log.exception("could not end the attempt; its lease will expire",
                          extra={"job_id": job.id})  # fmt: skip
            state = JobState.RUNNING
        finally:
            if job.kind == JobKind.GENERATE:  # (a trainer is killed when the attempt ends)
                keeper.stop_actor()  # what still runs for this attempt (nothing, usually)
        if state == JobState.QUEUED:
            # Its token arrives when the backoff is over (not_before holds other tokens off).
            try:
                self.publisher.publish(
                    self.database,
                    [
                        Publication(
                            job.id,
                            job.queue,
                            job.priority,
                            countdown_s=hold_s if preempted else backoff_s,
                        )
                    ],
                )
            except Exception:  # the row says queued and unpublished: the reconciler sends it
                log.exception("could not publish the job again", extra={"job_id": job.id})
        log.info("attempt ended: %s (%s)", state, type(cause).__name__, extra={"job_id": job.id})
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise exc
        return "abandoned" if state == JobState.RUNNING else str(state)

    def _end_attempt(
        self,
        job: JobSnapshot,
        lease: Lease,
        keeper: LeaseKeeper,
        cause: BaseException,
        recorder: EventRecorder | None,
        backoff_s: float,
    ) -> JobState:
        """One transaction that ends a failed attempt: canceled, failed, or back to the queue.
        An output that was still held is recorded only when the job ends canceled or is
        preempted (what it made before it was stopped); a failed or released attempt records
        none."""
        preempted = keeper.preempt_requested.is_set() and not keeper.cancel_requested.is_set()
        canceled = (
            not preempted and keeper.cancel_requested.is_set() and not keeper.timed_out.is_set()
        )
        with self.database.transaction() as session:
            if recorder is not None:  # where it ran and how far it got are kept
                recorder.write_pending(session, outputs=canceled or preempted)
            if keeper.timed_out.is_set():
                state = finish_job(
                    session,
                    lease,
                    JobState.FAILED,
                    error_type="timeout",
                    error_detail=f"the attempt ran longer than timeout_s={job.timeout_s:g}",
                )
            elif preempted:  # before CanceledError: PreemptedError is one
                state = requeue_preempted(session, lease, hold_s=self.settings.preempt_after_s)
            elif canceled:
                state = finish_job(session, lease, JobState.CANCELED)
            elif isinstance(cause, CanceledError):
                # The actor stopped this attempt though nobody here asked it to: the work was
                # not done and not the job's fault, so the job goes back to the queue (or ends
                # canceled, if a cancel was requested meanwhile).
                state = release_job(
                    session,
                    lease,
                    reason="the attempt was stopped by its actor without a cancel request",
                    backoff_s=backoff_s,
                    counted=False,
                )
            elif isinstance(cause, StalledError | WorkerStoppingError) or self.stopping.is_set():
                # A stall (counted: the job may be what hangs) or a shutdown (not counted; a
                # Ray error while the worker stops is its Ray connection going away).
                stopping = not isinstance(cause, StalledError)
                detail = cause.detail if isinstance(cause, GenqError) else str(cause)
                state = release_job(
                    session,
                    lease,
                    reason=detail[:2000],
                    backoff_s=0.0 if stopping else backoff_s,
                    counted=not stopping,
                )
            elif is_infrastructure_error(cause):
                state = release_job(
                    session,
                    lease,
                    reason=f"{type(cause).__name__}: {cause}"[:2000],
                    backoff_s=backoff_s,
                    counted=False,
                )
            elif is_out_of_memory(cause):
                state = release_job(
                    session,
                    lease,
                    reason=f"out of memory: {cause}"[:2000],
                    params=smaller_batch(job.params),
                    backoff_s=backoff_s,
                )
            elif isinstance(cause, RAY_TRANSIENT) or (
                isinstance(cause, JobFailedError) and cause.transient
            ):
                state = release_job(
                    session,
                    lease,
                    reason=f"{type(cause).__name__}: {cause}",
                    backoff_s=backoff_s,
                )
            elif isinstance(cause, GenqError):
                state = finish_job(
                    session,
                    lease,
                    JobState.FAILED,
                    error_type=cause.type,
                    error_detail=cause.detail,
                )
            else:
                log.error("job raised", exc_info=cause, extra={"job_id": job.id})
                state = finish_job(
                    session,
                    lease,
                    JobState.FAILED,
                    error_type="model-error",
                    error_detail=f"{type(cause).__name__}: {cause}"[:4000],
                )
        if recorder is not None:
            recorder.committed()
        return state


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, recognised by name: the scheduler does not import torch."""
    return type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc)


def smaller_batch(params: dict[str, Any]) -> dict[str, Any] | None:
    """The out-of-memory policy: a job with a `batch_size` above 1 is retried with half of it
    (the new value is in the job's params and its state event); others retry as they are."""
    size = params.get("batch_size")
    if isinstance(size, int) and size > 1:
        return {**params, "batch_size": size // 2}
    return None


def _trainer_stopper(trainer: Any, grace_s: float, attempt: str) -> Callable[[], None]:
    """Ask a trainer to stop at its next step (the request names the attempt); kill it if it
    has not after `grace_s` (its GPU is freed either way, and the attempt ends canceled)."""

    def stop() -> None:
        trainer.cancel.remote(attempt)
        timer = threading.Timer(grace_s, lambda: ray.kill(trainer))
        timer.daemon = True
        timer.start()

    return stop
