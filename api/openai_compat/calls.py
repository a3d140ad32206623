"""What every OpenAI-compatible call does: turn itself into genq jobs (one transaction, the
tenant's quotas and fair share applying as to any job), wait for them holding one of the
process's stream slots, and read their results back.

A call's jobs are ordinary jobs: listed, on the dashboard, batched with other jobs of their
model. Their ids go back in the `X-Genq-Job-Id` header.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flask import request
from pydantic import BaseModel, ValidationError
from sqlalchemy import select

from api.auth import principal
from api.intake import build_jobs, check_outside, publications, publish_jobs
from api.openai_compat.errors import JobWaitError
from api.state import genq
from api.submissions import JobSubmission, errors_from, parse_submission, request_hash
from api.waits import wait_for_jobs
from core.catalog import resolve_model
from core.errors import BusyError, InvalidInputError
from core.states import JobState
from core.tables import Artifact, Job, Model

# Seconds a caller turned away for want of a slot is asked to wait (Retry-After).
SLOT_RETRY_AFTER_S = 5


def parse(model: type[BaseModel], body: Any) -> Any:
    """The OpenAI request parsed (unknown fields ignored); 400 naming the bad parameter."""
    if not isinstance(body, dict):
        raise InvalidInputError.one("body", "must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise InvalidInputError(errors_from(exc)) from None


def find_model(ref: str) -> Model:
    """The model the call names (404 `model_not_found` if the key may not use it)."""
    with genq().database.read() as session:
        model = resolve_model(session, principal().tenant_id, ref)
        session.expunge(model)
    return model


def family_fields(spec: type[BaseModel] | None, body: dict[str, Any], taken: set[str]) -> dict:
    """The family's own parameters the body carries beyond the OpenAI ones (`extra_body`):
    any field of the family's parameter class not in `taken`."""
    if spec is None:
        return {}
    return {k: v for k, v in body.items() if k in spec.model_fields and k not in taken}


def submissions_for(model: Model, params_list: Sequence[dict[str, Any]], body: dict) -> list:
    """One generate job body per entry of `params_list`, checked as `POST /v1/jobs` checks
    them (the priority from the call's `priority`, if any)."""
    priority = body.get("priority", 5)
    out: list[JobSubmission] = []
    for params in params_list:
        job_body = {"kind": "generate", "model": model.ref, "params": params}
        job_body["priority"] = priority
        submission = parse_submission(job_body)
        check_outside(submission)
        out.append(submission)
    return out


def create_jobs(submissions: Sequence[JobSubmission]) -> list[str]:
    """The call's jobs, created in one transaction and published; their ids."""
    state = genq()
    tenant_id = principal().tenant_id
    with state.database.transaction() as session:
        jobs = build_jobs(
            session,
            submissions,
            tenant_id=tenant_id,
            digests=[request_hash(s.model_dump(mode="json")) for s in submissions],
        )
        ids, pubs = [j.id for j in jobs], publications(jobs)
    publish_jobs(pubs)
    return ids


def take_slot() -> threading.BoundedSemaphore:
    """One of the process's stream slots for a waiting call (503 with Retry-After when all
    are taken: nothing has been created yet, so the client may simply retry)."""
    state = genq()
    if not state.streams.acquire(blocking=False):
        raise BusyError(
            f"this API process has its {state.stream_limit} waiting calls and event streams "
            "open (GENQ_API_MAX_STREAMS); retry later",
            retry_after_s=SLOT_RETRY_AFTER_S,
        )
    return state.streams


def wait_s(body: dict[str, Any]) -> int:
    """How long the call waits for its jobs: settings.openai_wait_s, or less when the call
    says `wait_s` (through `extra_body`)."""
    cap = genq().settings.openai_wait_s
    asked = body.get("wait_s")
    if asked is None:
        return cap
    if isinstance(asked, bool) or not isinstance(asked, int) or not 1 <= asked <= cap:
        raise InvalidInputError.one("wait_s", f"must be a whole number of seconds, 1 to {cap}")
    return asked


def wait_done(job_ids: list[str], timeout_s: int) -> None:
    """Wait for the call's jobs; 504 naming them when `timeout_s` passes."""
    state = genq()
    done = wait_for_jobs(state.database, job_ids, timeout_s=timeout_s, poll_s=state.stream_poll_s)
    if not done:
        raise timed_out(job_ids, timeout_s)


def timed_out(job_ids: list[str], timeout_s: int) -> JobWaitError:
    names = ", ".join(job_ids)
    return JobWaitError(
        f"the job did not finish within {timeout_s} s; it goes on: poll "
        f"GET /v1/jobs/{job_ids[0]} for its result (jobs: {names})",
        status=504,
        code="job_still_running",
        job_ids=job_ids,
    )


def failed(job: Job) -> JobWaitError:
    return JobWaitError(
        f"job {job.id} {job.state}: {job.error_type or 'canceled'}: {job.error_detail or ''}",
        status=500,
        code=f"job_{job.state}",
        job_ids=[job.id],
    )


@dataclass
class Result:
    """A finished job and its outputs, in the order they were written."""

    job: Job
    outputs: list[Artifact] = field(default_factory=list)


def results(job_ids: list[str]) -> list[Result]:
    """The call's finished jobs in `job_ids` order; a failed or canceled one is a 500."""
    with genq().database.read() as session:
        jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(job_ids)))}
        artifacts = list(
            session.scalars(
                select(Artifact).where(Artifact.job_id.in_(job_ids)).order_by(Artifact.created_at)
            )
        )
        session.expunge_all()
    found = [Result(jobs[i]) for i in job_ids]
    by_id = {r.job.id: r for r in found}
    for artifact in artifacts:
        by_id[artifact.job_id].outputs.append(artifact)
    for result in found:
        if result.job.state != JobState.SUCCEEDED:
            raise failed(result.job)
    return found


def read_output(artifact: Artifact) -> bytes:
    with genq().artifacts.open(artifact.path) as f:
        return f.read()


def absolute_url(path: str) -> str:
    return request.host_url.rstrip("/") + path
