"""How an attempt ends: the rules that turn what happened into the job's next state, each in
one transaction fenced by the lease. `succeed` records the pending outputs (and, for training,
registers the model) with the finish; `fail` sorts a failure into canceled, timed out,
preempted, released back to the queue (a stall, a worker shutting down, a database or broker
error, a Ray failure or a transient job error; out of memory with half the batch) or failed,
and sends the job a new token when it goes back to the queue.
"""

from __future__ import annotations

import logging
from typing import Any

import kombu.exceptions
import redis
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    ObjectLostError,
    RayActorError,
    RayTaskError,
)

from core.catalog import register_model
from core.db import is_transient_db_error, retry_transient
from core.errors import (
    GenqError,
    JobFailedError,
    LeaseLostError,
    StalledError,
    WorkerStoppingError,
)
from core.leases import Lease, finish_job, has_succeeded, release_job, retry_backoff_s
from core.preemption import requeue_preempted
from core.states import JobKind, JobState
from scheduler.attempt import JobSnapshot, WorkerParts
from scheduler.enqueue import Publication
from scheduler.lease import LeaseKeeper
from scheduler.recorder import EventRecorder
from workers.families.base import CanceledError

log = logging.getLogger(__name__)

# Failures of the Ray machinery itself (an actor or node died): worth another attempt.
RAY_TRANSIENT = (ActorDiedError, ActorUnavailableError, RayActorError, ObjectLostError)
# The broker (Redis) could not be reached.
BROKER_ERRORS = (redis.ConnectionError, redis.TimeoutError, kombu.exceptions.OperationalError)


def is_infrastructure_error(exc: BaseException) -> bool:
    """A database or broker error: it says nothing about the job, so the attempt is released
    without using up one of the job's attempts (and is never a `model-error`)."""
    return is_transient_db_error(exc) or isinstance(exc, BROKER_ERRORS)


def succeed(parts: WorkerParts, job: JobSnapshot, lease: Lease, recorder: EventRecorder) -> str:
    """The fenced finish: the outputs, the model and the state in one transaction, tried
    again on a lost connection. A try whose commit was lost in flight but applied shows
    as a lease no longer held by a job this attempt marked succeeded."""
    try:
        state = retry_transient(
            lambda: _finish_succeeded(parts, job, lease, recorder),
            within_s=parts.settings.transient_retry_s,
            what=f"job {job.id}: finishing",
        )
    except LeaseLostError:
        with parts.database.read() as session:
            if not has_succeeded(session, lease):
                raise
        recorder.committed()
        state = JobState.SUCCEEDED
    log.info("finished: %s", state, extra={"job_id": job.id})
    return str(state)


def _finish_succeeded(
    parts: WorkerParts, job: JobSnapshot, lease: Lease, recorder: EventRecorder
) -> str:
    with parts.database.transaction() as session:
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


def fail(
    parts: WorkerParts,
    job: JobSnapshot,
    lease: Lease,
    keeper: LeaseKeeper,
    exc: BaseException,
    recorder: EventRecorder | None = None,
) -> str:
    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    backoff_s = retry_backoff_s(
        lease.attempt,
        base_s=parts.settings.retry_backoff_base_s,
        cap_s=parts.settings.retry_backoff_max_s,
    )
    if keeper.lost.is_set():
        return "lease-lost"
    # Preempted (core/preemption.py): back to the queue without using an attempt, held
    # off for a while so that the slot goes to the job it made room for.
    preempted = keeper.preempt_requested.is_set() and not keeper.cancel_requested.is_set()
    hold_s = parts.settings.preempt_after_s
    try:
        state = retry_transient(
            lambda: _end_attempt(parts, job, lease, keeper, cause, recorder, backoff_s),
            within_s=parts.settings.transient_retry_s,
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
            parts.publisher.publish(
                parts.database,
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
    parts: WorkerParts,
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
    canceled = not preempted and keeper.cancel_requested.is_set() and not keeper.timed_out.is_set()
    with parts.database.transaction() as session:
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
            state = requeue_preempted(session, lease, hold_s=parts.settings.preempt_after_s)
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
        elif isinstance(cause, StalledError | WorkerStoppingError) or parts.stopping.is_set():
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
