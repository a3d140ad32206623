"""The OpenAPI declarations of jobs and what hangs off them: `/v1/jobs` (submit, list, read,
change, cancel, retry, delete, stream, logs, webhook messages), the dead letter, the webhook
secret, `/v1/batches`, output files, input files, health, metrics and the document itself.
api/openapi_rules.py turns them into the document's paths.
"""

from __future__ import annotations

from api.openapi_rules import (
    INT,
    LIMIT,
    QUOTA,
    STRING,
    Op,
    answer,
    deletion,
    form,
    header,
    problem,
    query,
)
from core.states import JobKind, JobState

CONFLICT = problem("The job's state does not allow this.")
STATES = "|".join(JobState)
# A filter given but empty is a 422 ("must not be empty").
FILTER = {"type": "string", "minLength": 1}
# An event id to resume after; empty (or left out) is from the start. The pattern keeps to
# 64 bits but for the 19-digit ids from 9e18 up, which no database here will reach.
EVENT_ID = {"type": "string", "pattern": "^([0-9]{0,18}|[0-8][0-9]{18})$"}
# One Server-Sent Event as a client's parser hands it over: `data` is an Event as JSON.
SSE_EVENT = {
    "type": "object",
    "properties": {
        "id": STRING,
        "event": STRING,
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
    "required": ["id", "event", "data"],
}
IDEMPOTENCY_KEY = {"type": "string", "minLength": 1, "maxLength": 255}
PRIORITY_CHANGE = {
    "type": "object",
    "properties": {
        "priority": {
            "anyOf": [
                {"type": "integer", "minimum": 0, "maximum": 9},
                {"enum": ["interactive", "normal", "batch"]},
            ]
        }
    },
    "required": ["priority"],
    "additionalProperties": False,
}


def _job_action(path: str, operation_id: str, summary: str) -> Op:
    return Op(
        "post",
        path,
        operation_id,
        summary,
        {202: answer("Job", "The job after the change."), 409: CONFLICT},
    )


OPERATIONS: tuple[Op, ...] = (
    # -- jobs (api/jobs.py, api/events.py, api/deliveries.py) -----------------------------------
    Op(
        "post",
        "/v1/jobs",
        "submitJob",
        "Submit a job",
        {
            202: answer("Job", "The job was accepted.", "The job's URL."),
            200: answer(
                "Job",
                "A repeat of an earlier request (Idempotency-Key), or a job that ended within"
                " `Prefer: wait` (header `Preference-Applied: wait=N`).",
                "The job's URL.",
            ),
            404: problem("The model or data set named does not exist."),
            409: problem("The Idempotency-Key was used with another body."),
            429: QUOTA,
        },
        body="JobSubmission",
        parameters=[
            header(
                "Idempotency-Key",
                "A repeat with the same key and body returns the job the first request"
                " created (200); a different body is a 409.",
                IDEMPOTENCY_KEY,
            ),
            header(
                "Prefer",
                "`wait` (60 s) or `wait=N` seconds (at most GENQ_SYNC_WAIT_MAX_S): hold the"
                " call until the job ends.",
                {"type": "string", "pattern": "^wait(=[1-9][0-9]{0,4})?$"},
            ),
        ],
    ),
    Op(
        "get",
        "/v1/jobs",
        "listJobs",
        "List jobs, newest first",
        {200: answer("JobPage", "A page of jobs.")},
        parameters=[
            query(
                "state",
                "One state or a comma-separated list.",
                {"type": "string", "pattern": f"^({STATES})( *, *({STATES}))*$"},
            ),
            query("kind", "generate, train or finetune.", {"enum": list(JobKind)}),
            query("model", "A model name.", FILTER),
            query("batch", "A batch id (POST /v1/batches).", FILTER),
            query(LIMIT, ""),
            query("cursor", "`next_cursor` of the previous page.", FILTER),
        ],
    ),
    Op("get", "/v1/jobs/{job_id}", "getJob", "Get a job", {200: answer("Job", "The job.")}),
    Op(
        "patch",
        "/v1/jobs/{job_id}",
        "changeJobPriority",
        "Change a queued or scheduled job's priority",
        {200: answer("Job", "The job with its new priority."), 409: CONFLICT},
        body={"required": True, "content": {"application/json": {"schema": PRIORITY_CHANGE}}},
    ),
    deletion(
        "/v1/jobs/{job_id}",
        "deleteJob",
        "Delete a finished job with its events and outputs",
        "The row, its events, webhook messages, outputs, checkpoints and a model folder no"
        " registered version loads from. Audited.",
        "The job has not finished: cancel it first.",
    ),
    _job_action("/v1/jobs/{job_id}/cancel", "cancelJob", "Cancel a job"),
    _job_action("/v1/jobs/{job_id}/retry", "retryJob", "Retry a failed or canceled job"),
    Op(
        "get",
        "/v1/jobs/{job_id}/events",
        "streamJobEvents",
        "Stream a job's events (Server-Sent Events)",
        {
            200: {
                "description": "`id: <event id>`, `event: <type>`, `data: <Event>` until the"
                " job is finished.",
                "content": {"text/event-stream": {"schema": SSE_EVENT}},
            },
            503: {
                **problem(
                    "This API process has GENQ_API_MAX_STREAMS streams open: come back after"
                    " Retry-After seconds, or poll the job."
                ),
                "headers": {"Retry-After": {"schema": INT}},
            },
        },
        parameters=[
            header("Last-Event-ID", "Resume after this event id.", EVENT_ID),
            query(
                "last_event_id",
                "Resume after this event id (for clients that cannot set headers).",
                EVENT_ID,
            ),
        ],
    ),
    Op(
        "get",
        "/v1/jobs/{job_id}/logs",
        "getJobLogs",
        "A job's log lines",
        {200: answer("EventList", "Log events, oldest first.")},
    ),
    Op(
        "get",
        "/v1/jobs/{job_id}/deliveries",
        "getJobDeliveries",
        "A job's webhook messages and every attempt to send them",
        {200: answer("DeliveryList", "Messages, oldest first.")},
    ),
    Op(
        "get",
        "/v1/dead-letter",
        "listDeadLetter",
        "Failed jobs that used up their attempts",
        {200: answer("JobPage", "Newest first.")},
        parameters=[
            query(LIMIT, ""),
            query("cursor", "The next_cursor of the previous page.", FILTER),
        ],
    ),
    Op(
        "get",
        "/v1/webhook-secret",
        "getWebhookSecret",
        "The tenant's webhook signing secret",
        {200: answer("WebhookSecret", "The whsec_ secret.")},
    ),
    # -- batches (api/batches.py) -------------------------------------------------------------
    Op(
        "post",
        "/v1/batches",
        "submitBatch",
        "Submit many jobs at once",
        {
            202: answer("BatchWithJobs", "The batch was accepted.", "The batch's URL."),
            200: answer(
                "BatchWithJobs",
                "A repeat of an earlier request (Idempotency-Key).",
                "The batch's URL.",
            ),
            409: problem("The Idempotency-Key was used with another body."),
            429: QUOTA,
        },
        "Every job is checked first (a 422 names each bad field by index,"
        " `jobs.3.params.steps`); then all are created in one transaction and published."
        " `GET /v1/jobs?batch=<id>` lists them.",
        body="BatchSubmission",
        parameters=[
            header(
                "Idempotency-Key",
                "A repeat with the same key and body returns the batch the first request"
                " created (200); a different body is a 409.",
                IDEMPOTENCY_KEY,
            )
        ],
    ),
    Op(
        "get",
        "/v1/batches/{batch_id}",
        "getBatch",
        "A batch, its jobs counted by state",
        {200: answer("Batch", "The batch.")},
    ),
    # -- outputs and input files (api/artifacts.py, api/uploads.py) ---------------------------
    Op(
        "get",
        "/v1/artifacts/{artifact_id}",
        "getArtifact",
        "Download an output file",
        {
            200: {
                "description": "The file, with its content type and an ETag.",
                "content": {"*/*": {"schema": {"type": "string", "contentEncoding": "binary"}}},
            },
            304: {"description": "Not modified (If-None-Match)."},
        },
    ),
    deletion(
        "/v1/artifacts/{artifact_id}",
        "deleteArtifact",
        "Delete one output of a finished job",
        "The file and its row. Audited.",
        "Its job has not finished.",
    ),
    Op(
        "post",
        "/v1/files",
        "uploadInputFile",
        "Upload an input picture (PNG, JPEG or WebP)",
        {
            201: answer("InputFile", "The stored file."),
            413: problem("Over GENQ_INPUT_MAX_BYTES."),
            422: problem("Not a PNG, JPEG or WebP that decodes, or too many pixels."),
        },
        "For a generate job's `image` or `mask`. The type is what the bytes decode as; at"
        " most GENQ_INPUT_MAX_BYTES and GENQ_DATASET_MAX_PIXELS.",
        body=form({"file": {"type": "string", "format": "binary"}}),
    ),
    Op(
        "get",
        "/v1/files/{file_id}",
        "getInputFile",
        "An uploaded input picture's record",
        {200: answer("InputFile", "The file.")},
    ),
    # -- health, metrics, this document (api/health.py, api/metrics.py, api/openapi.py) -------
    Op(
        "get",
        "/v1/health",
        "health",
        "Database and broker reachability",
        {
            200: answer("Health", "Everything answers."),
            503: problem("Something does not answer; `checks` says what."),
        },
        public=True,
    ),
    Op(
        "get",
        "/v1/health/live",
        "healthLive",
        "Liveness: this API process answers (nothing else is checked)",
        {200: answer("Liveness", "The process answers.")},
        public=True,
    ),
    Op(
        "get",
        "/v1/health/ready",
        "healthReady",
        "Readiness: database, broker, Ray, a worker on each queue, the periodic scheduler",
        {
            200: answer("Readiness", "Every part is ok."),
            503: problem(
                "A part is not ok; `parts` gives each part's status and age_s, `detail` names"
                " the failing ones."
            ),
        },
        public=True,
    ),
    Op(
        "get",
        "/metrics",
        "metrics",
        "Prometheus metrics of the whole stack",
        {
            200: {
                "description": "Every metric, one scrape.",
                "content": {"text/plain": {"schema": STRING}},
            },
            401: problem("No metrics token or key, or a wrong one."),
            403: problem("A key that is not an admin key."),
        },
        'The Prometheus text format (docs/operating.md, "Metrics"). Bearer: the metrics token'
        " (GENQ_METRICS_TOKEN) or an admin key.",
    ),
    Op(
        "get",
        "/v1/openapi.json",
        "openapi",
        "This document",
        {
            200: {
                "description": "OpenAPI 3.1",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        },
        public=True,
    ),
)
