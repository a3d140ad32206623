"""`/openai/v1/batches`: the OpenAI Batch API over genq jobs. A batch names an uploaded JSONL
file (`POST /openai/v1/files`, purpose `batch`) of `{custom_id, method, url, body}` lines, up
to settings.openai_batch_max_lines, all calling the batch's `endpoint` (chat completions,
completions or image generations).

Every line is checked when the batch is created, as its synchronous call would be (a bad line
is a 400 naming the line and the parameter); then each line becomes one genq job, all in one
transaction, fair-shared and batched with everyone's jobs, their `batch_item` the line's
`custom_id`. `GET /v1/jobs?batch=<id>` lists them; results come as JSONL by `custom_id`
(api.openai_compat.batch_results). Lines ask one choice each (`n` 1) and do not stream.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, g, jsonify, request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from api import polling
from api.auth import principal, tenant_scope
from api.intake import build_jobs, publications, publish_jobs
from api.jobs import read_json_body
from api.openai_compat import calls
from api.openai_compat.batch_results import ENDPOINTS, batch_object, find_openai_batch
from api.openai_compat.errors import param_name
from api.openai_compat.files import find_file, read_file
from api.openai_compat.images import RENAMES, image_call
from api.openai_compat.text import chat_call, completion_call
from api.resolution import validate_params
from api.state import genq
from api.submissions import JobSubmission, request_hash
from core.errors import ConflictError, InvalidInputError, NotFoundError
from core.jobs import cancel_job
from core.states import JobKind, is_terminal
from core.tables import Job, JobBatch, utcnow
from workers.registry import FAMILIES

bp = Blueprint("batches", __name__)

CUSTOM_ID_MAX = 64
# Bad lines named in one 400 at most.
ERRORS_SHOWN = 20


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: str = Field(..., min_length=1, max_length=64)
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


def _line_submission(endpoint: str, raw: str, seen: set[str]) -> tuple[str, JobSubmission, bool]:
    """(custom_id, the job, whether it wants b64 images) of one input line."""
    try:
        line = json.loads(raw)
    except ValueError as exc:
        raise InvalidInputError.one("line", f"is not JSON: {exc}") from None
    if not isinstance(line, dict):
        raise InvalidInputError.one("line", "must be a JSON object")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= CUSTOM_ID_MAX:
        raise InvalidInputError.one("custom_id", f"must be a string of 1-{CUSTOM_ID_MAX} chars")
    if custom_id in seen:
        raise InvalidInputError.one("custom_id", f"{custom_id!r} is used twice")
    seen.add(custom_id)
    if line.get("method", "POST") != "POST" or line.get("url") != endpoint:
        raise InvalidInputError.one("url", f"every line must POST to the endpoint {endpoint}")
    body = line.get("body")
    if not isinstance(body, dict):
        raise InvalidInputError.one("body", "must be a JSON object")
    if body.get("stream"):
        raise InvalidInputError.one("stream", "batch lines do not stream")
    if endpoint != "/v1/images/generations" and body.get("n", 1) != 1:
        raise InvalidInputError.one("n", "a batch line asks one choice: send a line per choice")
    if endpoint == "/v1/images/generations":
        g.openai_renames = RENAMES
        call = image_call(body)
        model, params_list = call.model, [call.params]
        b64 = call.req.response_format == "b64_json"
    else:
        text = chat_call(body) if endpoint == "/v1/chat/completions" else completion_call(body)
        model, params_list, b64 = text.model, text.choices, False
    if len(params_list) != 1:
        raise InvalidInputError.one("prompt", "a batch line sends one prompt")
    (submission,) = calls.submissions_for(model, params_list, body)
    # The family's own checks now, so that a bad line is named by its number.
    family = FAMILIES[model.family]
    params = validate_params(family, JobKind.GENERATE, submission.params)
    if family.check_model_params is not None:
        family.check_model_params(JobKind.GENERATE, params, dict(model.config or {}))
    return custom_id, submission, b64


def _read_lines(file_id: str, endpoint: str) -> tuple[list[str], list[JobSubmission], list[str]]:
    limit = genq().settings.openai_batch_max_lines
    text = read_file(find_file(file_id)).decode("utf-8", "replace")
    raw_lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not raw_lines:
        raise InvalidInputError.one("input_file_id", "the file has no request lines")
    if len(raw_lines) > limit:
        raise InvalidInputError.one(
            "input_file_id", f"the file has {len(raw_lines)} lines; a batch takes {limit}"
        )
    ids: list[str] = []
    submissions: list[JobSubmission] = []
    b64: list[str] = []
    problems: list[dict[str, str]] = []
    seen: set[str] = set()
    for number, raw in raw_lines:
        try:
            custom_id, submission, wants_b64 = _line_submission(endpoint, raw, seen)
        except (InvalidInputError, NotFoundError, ConflictError) as exc:
            errors = exc.errors if isinstance(exc, InvalidInputError) else None
            field = param_name(errors[0]["field"], g.get("openai_renames")) if errors else "model"
            message = errors[0]["message"] if errors else exc.detail
            problems.append({"field": f"line {number}: {field}", "message": message})
            continue
        ids.append(custom_id)
        submissions.append(submission)
        if wants_b64:
            b64.append(custom_id)
    if problems:
        shown = "; ".join(f"{p['field']}: {p['message']}" for p in problems[:ERRORS_SHOWN])
        more = f" (and {len(problems) - ERRORS_SHOWN} more)" if len(problems) > ERRORS_SHOWN else ""
        raise InvalidInputError(
            [{"field": "input_file_id", "message": shown + more}], detail=shown + more
        )
    return ids, submissions, b64


@bp.post("/batches")
def create() -> Response:
    body = read_json_body()
    g.openai_renames = {}
    req = calls.parse(BatchRequest, body)
    if req.endpoint not in ENDPOINTS:
        raise InvalidInputError.one("endpoint", f"must be one of {', '.join(ENDPOINTS)}")
    if req.completion_window != "24h":
        raise InvalidInputError.one("completion_window", "must be 24h")
    ids, submissions, b64 = _read_lines(req.input_file_id, req.endpoint)
    g.openai_renames = {}
    state = genq()
    tenant_id = principal().tenant_id
    meta: dict[str, Any] = {"completion_window": req.completion_window, "b64_json": b64}
    if req.metadata is not None:
        meta["metadata"] = req.metadata
    with state.database.transaction() as session:
        batch = JobBatch(
            tenant_id=tenant_id,
            kind="openai",
            size=len(submissions),
            endpoint=req.endpoint,
            input_file_id=req.input_file_id,
            meta=meta,
        )
        session.add(batch)
        session.flush()
        jobs = build_jobs(
            session,
            submissions,
            tenant_id=tenant_id,
            digests=[request_hash(s.model_dump(mode="json")) for s in submissions],
            batch_id=batch.id,
            items=ids,
        )
        batch_id, pubs = batch.id, publications(jobs)
    publish_jobs(pubs)
    with state.database.read() as session:
        found = find_openai_batch(session, batch_id)
        assert found is not None
        return jsonify(batch_object(session, found))


@bp.get("/batches/<batch_id>")
def retrieve(batch_id: str) -> Response:
    with genq().database.read() as session:
        batch = find_openai_batch(session, batch_id)
        if batch is None:
            raise NotFoundError(f"no batch {batch_id}")
        return jsonify(batch_object(session, batch))


@bp.get("/batches")
def list_batches() -> Response:
    limit = request.args.get("limit", "20")
    if not limit.isdigit() or not 1 <= int(limit) <= 100:
        raise InvalidInputError.one("limit", "must be 1 to 100")
    stmt = select(JobBatch).where(JobBatch.kind == "openai")
    scope = tenant_scope()
    if scope is not None:
        stmt = stmt.where(JobBatch.tenant_id == scope)
    if after := request.args.get("after"):
        stmt = stmt.where(JobBatch.id < after)
    with genq().database.read() as session:
        rows = list(session.scalars(stmt.order_by(JobBatch.id.desc()).limit(int(limit) + 1)))
        data = [batch_object(session, b) for b in rows[: int(limit)]]
    return jsonify(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(rows) > int(limit),
        }
    )


@bp.post("/batches/<batch_id>/cancel")
def cancel(batch_id: str) -> Response:
    """Cancel the batch's jobs that have not finished (running ones stop at their next
    heartbeat); the finished ones keep their results."""
    canceled: list[tuple[str, int, str]] = []
    with genq().database.transaction() as session:
        batch = find_openai_batch(session, batch_id)
        if batch is None:
            raise NotFoundError(f"no batch {batch_id}")
        if batch.canceled_at is None:
            batch.canceled_at = utcnow()
        for job in session.scalars(
            select(Job).where(Job.batch_id == batch.id).with_for_update().order_by(Job.id)
        ):
            if not is_terminal(job.state):
                cancel_job(session, job)
                canceled.append((job.id, polling.version_of(job.updated_at), job.tenant_id))
        session.flush()
        body = batch_object(session, batch)
    for job_id, version, tenant_id in canceled:  # their next polls show it (api/polling.py)
        polling.changed(job_id, version=version, tenant_id=tenant_id, payload=None)
    return jsonify(body)
