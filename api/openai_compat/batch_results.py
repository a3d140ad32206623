"""What an OpenAI batch looks like from its jobs: its status and request counts (the Batch
object), and its output and error files, written as JSONL by `custom_id` when they are read.

A batch is `in_progress` while any of its jobs waits or runs, then `completed`; once canceled
it is `cancelling` until its jobs have stopped, then `cancelled`. The output file holds each
succeeded line's answer (the body the synchronous call would have returned), the error file
each failed or canceled line's error.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.auth import tenant_scope
from api.openai_compat import calls
from api.openai_compat.images import images_body
from api.openai_compat.text_answers import completion_body
from api.state import genq
from core.states import JobState, is_terminal
from core.tables import Artifact, Job, JobBatch, Model

OUTPUT_PREFIX = "file-batch_"
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/images/generations")


def output_file_id(batch_id: str, which: str) -> str:
    return f"{OUTPUT_PREFIX}{batch_id}-{which}"


def _ts(value: Any) -> int | None:
    return int(value.timestamp()) if value is not None else None


def batch_object(session: Session, batch: JobBatch) -> dict[str, Any]:
    rows = session.execute(select(Job.state, Job.finished_at).where(Job.batch_id == batch.id)).all()
    done = [r for r in rows if is_terminal(r.state)]
    succeeded = sum(1 for r in done if r.state == JobState.SUCCEEDED)
    failed = len(done) - succeeded
    finished = len(done) == len(rows)
    last = max((r.finished_at for r in done if r.finished_at), default=None)
    if batch.canceled_at is not None:
        status = "cancelled" if finished else "cancelling"
    else:
        status = "completed" if finished else "in_progress"
    meta = batch.meta or {}
    created = _ts(batch.created_at) or 0
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": None,
        "input_file_id": batch.input_file_id,
        "completion_window": meta.get("completion_window", "24h"),
        "status": status,
        "output_file_id": output_file_id(batch.id, "output") if finished and succeeded else None,
        "error_file_id": output_file_id(batch.id, "errors") if finished and failed else None,
        "created_at": created,
        "in_progress_at": created,
        "expires_at": None,
        "finalizing_at": None,
        "completed_at": _ts(last) if status == "completed" else None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": _ts(batch.canceled_at),
        "cancelled_at": _ts(last or batch.canceled_at) if status == "cancelled" else None,
        "request_counts": {"total": len(rows), "completed": succeeded, "failed": failed},
        "metadata": meta.get("metadata"),
    }


def find_openai_batch(session: Session, batch_id: str) -> JobBatch | None:
    batch = session.get(JobBatch, batch_id)
    scope = tenant_scope()
    if batch is None or batch.kind != "openai":
        return None
    if scope is not None and batch.tenant_id != scope:
        return None
    return batch


def _line(job: Job, result: calls.Result | None, batch: JobBatch, ref: str) -> dict[str, Any]:
    if result is None:
        return {
            "id": f"batch_req_{job.id}",
            "custom_id": job.batch_item,
            "response": None,
            "error": {
                "code": job.error_type or f"job_{job.state}",
                "message": f"job {job.id} {job.state}: {job.error_detail or ''}",
            },
        }
    created = _ts(job.finished_at) or 0
    if batch.endpoint == "/v1/images/generations":
        b64 = job.batch_item in set((batch.meta or {}).get("b64_json") or [])
        body = images_body(result, "b64_json" if b64 else "url", created)
    else:
        chat = batch.endpoint == "/v1/chat/completions"
        body = completion_body([result], ref, created, chat, [""], 1)
    return {
        "id": f"batch_req_{job.id}",
        "custom_id": job.batch_item,
        "response": {"status_code": 200, "request_id": job.id, "body": body},
        "error": None,
    }


def batch_file(file_id: str) -> tuple[str, int] | None:
    """(JSONL text, created) of a batch's output or error file; None if `file_id` is not one
    (or names a batch the caller may not see)."""
    if not file_id.startswith(OUTPUT_PREFIX):
        return None
    batch_id, _, which = file_id.removeprefix(OUTPUT_PREFIX).rpartition("-")
    if which not in ("output", "errors"):
        return None
    with genq().database.read() as session:
        batch = find_openai_batch(session, batch_id)
        if batch is None:
            return None
        jobs = list(session.scalars(select(Job).where(Job.batch_id == batch.id).order_by(Job.id)))
        models = {
            m.id: m.ref
            for m in session.scalars(select(Model).where(Model.id.in_({j.model_id for j in jobs})))
        }
        wanted = [
            j
            for j in jobs
            if is_terminal(j.state) and (j.state == JobState.SUCCEEDED) == (which == "output")
        ]
        outputs: dict[str, list[Artifact]] = {}
        if which == "output" and wanted:
            for artifact in session.scalars(
                select(Artifact)
                .where(Artifact.job_id.in_([j.id for j in wanted]))
                .order_by(Artifact.created_at)
            ):
                outputs.setdefault(artifact.job_id, []).append(artifact)
        session.expunge_all()
    lines = []
    for job in wanted:
        result = calls.Result(job, outputs.get(job.id, [])) if which == "output" else None
        line = _line(job, result, batch, models.get(job.model_id or "", ""))
        lines.append(json.dumps(line, separators=(",", ":")))
    return "".join(f"{line}\n" for line in lines), _ts(batch.created_at) or 0
