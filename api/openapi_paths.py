"""The operations of `/v1/openapi.json`: one short declaration per route (method, path, id,
summary, what it answers), from which `operations()` builds the document's `paths`.

What every operation of a kind answers is added by rule rather than written out: 401 for a
key-checked operation, 404 where the path names an object, 422 where there is input to
refuse, 400/413/415 before a body is read, 429 and the read-only 403 (api/ratelimits.py,
api/auth.py). Schemas are named, not written: they come from api/schemas.py (answers) and
from the pydantic classes the views validate with (bodies), see api/openapi.py.
tests/test_api_app.py checks that these declarations and Flask's url_map name the same
routes and methods.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from api.datasets import DATASET_NAME_MAX, KINDS
from core.artifacts import NAME_PATTERN
from core.numbers import INT32_MAX
from core.states import JobKind, JobState

STRING = {"type": "string"}
INT = {"type": "integer"}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/problem+json": {"schema": ref("Problem")}},
    }


def answer(schema: str, description: str, location: str | None = None) -> dict[str, Any]:
    """A JSON answer of the named schema; `location`: what its Location header points to."""
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": ref(schema)}},
    }
    if location:
        response["headers"] = {"Location": {"schema": STRING, "description": location}}
    return response


def query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema or STRING,
        "description": description,
    }


def header(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "schema": schema,
        "description": description,
    }


def form(properties: dict[str, Any]) -> dict[str, Any]:
    """A multipart body whose fields are all required."""
    schema = {"type": "object", "properties": properties, "required": list(properties)}
    return {"required": True, "content": {"multipart/form-data": {"schema": schema}}}


UNAUTHORIZED = problem("Missing, unknown or revoked API key.")
NOT_FOUND = problem("No such object, or it belongs to another tenant.")
INVALID = problem("Invalid input; `errors` names each bad field.")
CONFLICT = problem("The job's state does not allow this.")
ADMIN = problem("This needs an admin key.")
NOT_ADMIN = problem("Not an admin key.")
DELETED = {"description": "Deleted."}
SHARED = problem("A built-in every tenant shares: only an admin key may delete it.")
QUOTA = {"$ref": "#/components/responses/QuotaExceeded"}
# What every operation with a body may answer before reading it (api.jobs.read_json_body and
# the request size limit), whether or not its own declaration lists them.
BODY_PROBLEMS = {
    "400": problem("The body is not valid JSON."),
    "413": problem("The body is over the request size limit."),
    "415": problem("The body is not sent with the content type this operation takes."),
}
RATE_LIMITED = {
    "description": "Too many requests from this key, tenant or (failed keys) address.",
    "headers": {
        "Retry-After": {"schema": INT, "description": "Seconds until the limit lets one more in."},
        "RateLimit": {"schema": STRING, "description": 'IETF httpapi: "key";r=0;t=2'},
        "RateLimit-Policy": {"schema": STRING, "description": 'IETF httpapi: "key";q=40;w=2'},
    },
    "content": {"application/problem+json": {"schema": ref("RateLimited")}},
}
# An operation that answers 429 for a quota answers it for a rate limit as well.
QUOTA_OR_RATE = {
    "description": "A quota of the tenant refuses it, or a rate limit does.",
    "content": {
        "application/problem+json": {
            "schema": {"anyOf": [ref("QuotaExceeded"), ref("RateLimited")]}
        }
    },
}
READ_ONLY = problem("This needs an admin key, or a key that may write (not scope `read`).")

# Path parameters are strings but for these (api.catalog reads a version as an INTEGER row).
PATH_SCHEMAS = {"version": {"type": "integer", "minimum": 1, "maximum": INT32_MAX}}
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
# The size of a page; its bound is the deployment's GENQ_PAGE_SIZE_MAX, filled in by
# `operations`.
LIMIT = "limit"


@dataclass(frozen=True)
class Op:
    """One operation. `answers`: status → response (api/openapi.py adds the ones every
    operation of its kind gives); `body`: the request body's schema name (JSON) or a whole
    requestBody; `public`: no key needed."""

    method: str
    path: str
    id: str
    summary: str
    answers: dict[int, dict[str, Any]]
    description: str | None = None
    body: str | dict[str, Any] | None = None
    parameters: list[dict[str, Any]] = field(default_factory=list)
    public: bool = False


def _job_action(path: str, operation_id: str, summary: str) -> Op:
    return Op(
        "post",
        path,
        operation_id,
        summary,
        {202: answer("Job", "The job after the change."), 409: CONFLICT},
    )


def _schedule_action(path: str, operation_id: str, summary: str) -> Op:
    return Op("post", path, operation_id, summary, {200: answer("ScheduleOut", "The schedule.")})


def _list(path: str, operation_id: str, summary: str, schema: str) -> Op:
    return Op("get", path, operation_id, summary, {200: answer(schema, summary)})


def _delete(
    path: str, operation_id: str, summary: str, description: str, conflict: str, **more: Any
) -> Op:
    answers = {204: DELETED, 409: problem(conflict), **more.pop("answers", {})}
    return Op("delete", path, operation_id, summary, answers, description, **more)


FORCE = query(
    "force",
    "Delete a version other versions were fine-tuned from: they are kept, without their"
    " parent link.",
    {"type": "string", "enum": ["true", "false", "1", "0", "yes", "no"]},
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
    _delete(
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
    _delete(
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
    # -- models, data sets, families (api/catalog.py, api/scaling.py, api/datasets.py) --------
    _list("/v1/models", "listModels", "Visible models", "ModelList"),
    Op(
        "post",
        "/v1/models",
        "registerModel",
        "Register a pretrained diffusers or transformers folder (admin)",
        {
            202: answer("Model", "The new version, `checking`.", "The model's URL."),
            403: NOT_ADMIN,
            409: problem("The name belongs to a model of another family."),
            503: problem("The broker did not take the check; register it again."),
        },
        "The folder is on the server: an absolute path (inside GENQ_PRETRAINED_ROOTS when"
        " set) or a path under the artifact root. Its layout is checked at once (safetensors"
        " weights only); a worker then loads it and marks the new version `ready` or"
        " `failed`. Jobs on a model that is not ready answer 409.",
        body="ModelRegistration",
    ),
    Op(
        "get",
        "/v1/models/{name}",
        "getModelVersions",
        "Every version of a model",
        {200: answer("ModelList", "Versions, oldest first.")},
    ),
    Op(
        "patch",
        "/v1/models/{name}",
        "changeModelScaling",
        "Set the replica policy of every version of a model (admin)",
        {200: answer("ModelList", "The versions changed."), 403: NOT_ADMIN},
        "Only the fields sent change; null goes back to the family's default. Audited; the"
        " scaler applies it at its next look.",
        body="ScalingChange",
    ),
    Op(
        "patch",
        "/v1/models/{name}/{version}",
        "changeModelVersionScaling",
        "Set the replica policy of one version of a model (admin)",
        {200: answer("ModelList", "The version."), 403: NOT_ADMIN},
        body="ScalingChange",
    ),
    _delete(
        "/v1/models/{name}/{version}",
        "deleteModelVersion",
        "Delete a model version",
        "Its row, then its weights when they are in the artifact store and no other version"
        " loads them (a folder registered from elsewhere is left alone). Finished jobs that"
        " used or trained it keep their rows without the link. Audited.",
        "A waiting or running job uses it (`job_ids`), other versions were fine-tuned from it"
        " (`children`; send force=true), or it is built in.",
        answers={403: SHARED},
        parameters=[FORCE],
    ),
    Op(
        "post",
        "/v1/models/{name}/{version}/check",
        "checkModelAgain",
        "Check a registered pretrained folder again (admin)",
        {
            202: answer("Model", "The version, `checking`."),
            403: NOT_ADMIN,
            409: problem("The version is ready, or was trained here."),
            503: problem("The broker did not take the check."),
        },
        "For a version that is `failed` (its folder since fixed) or still `checking` (its"
        " check never came back): the layout is checked again, the version goes back to"
        " `checking` and a worker loads it.",
    ),
    _list("/v1/datasets", "listDatasets", "Visible data sets", "DatasetList"),
    Op(
        "post",
        "/v1/datasets",
        "uploadDataset",
        "Upload a data set: a zip of class folders of images, a zip of captioned images"
        " (captions.jsonl or .txt files), or a text file",
        {
            201: answer("Dataset", "The stored data set."),
            409: problem("The tenant has a data set of this name."),
            413: problem("Over a GENQ_DATASET_MAX_* size, entry or unpacked limit."),
        },
        body=form(
            {
                "name": {"type": "string", "pattern": NAME_PATTERN, "maxLength": DATASET_NAME_MAX},
                "kind": {"type": "string", "enum": list(KINDS)},
                "file": {"type": "string", "format": "binary"},
            }
        ),
    ),
    _delete(
        "/v1/datasets/{dataset_id}",
        "deleteDataset",
        "Delete a data set",
        "Its row, then its files. Finished jobs and versions trained on it keep their rows"
        " without the link. Audited.",
        "A waiting or running job trains on it (`job_ids`), or it is built in.",
        answers={403: SHARED},
    ),
    _list("/v1/families", "listFamilies", "Model families and their parameters", "FamilyList"),
    # -- tenants, purge, schedules (api/tenants.py, api/schedules.py) -------------------------
    Op(
        "get",
        "/v1/tenants",
        "listTenants",
        "Tenants with their weight, quotas and usage (admin: all; else own)",
        {200: answer("TenantList", "Tenants.")},
    ),
    Op(
        "get",
        "/v1/tenants/{ref}",
        "getTenant",
        "A tenant by id or name",
        {200: answer("Tenant", "The tenant.")},
    ),
    Op(
        "patch",
        "/v1/tenants/{ref}",
        "changeTenantQuotas",
        "Set a tenant's weight and quotas (admin); null removes a limit",
        {200: answer("Tenant", "The tenant."), 403: ADMIN},
        body="QuotaChange",
    ),
    Op(
        "post",
        "/v1/admin/purge",
        "purgeJobs",
        "Cancel every waiting job of a tenant and/or a queue (admin)",
        {200: answer("PurgeResult", "How many jobs were canceled."), 403: ADMIN, 404: NOT_FOUND},
        body="PurgeRequest",
    ),
    Op(
        "post",
        "/v1/schedules",
        "createSchedule",
        "Create a schedule (cron, time zone, job template)",
        {
            201: answer("ScheduleOut", "The schedule."),
            409: problem("The tenant has a schedule of that name."),
        },
        body="Schedule",
    ),
    _list("/v1/schedules", "listSchedules", "The caller's schedules (admin: all)", "ScheduleList"),
    Op(
        "get",
        "/v1/schedules/{schedule_id}",
        "getSchedule",
        "A schedule",
        {200: answer("ScheduleOut", "The schedule.")},
    ),
    Op(
        "patch",
        "/v1/schedules/{schedule_id}",
        "changeSchedule",
        "Change a schedule",
        {
            200: answer("ScheduleOut", "The schedule."),
            409: problem("The tenant has a schedule of that name."),
        },
        body="ScheduleChange",
    ),
    Op(
        "delete",
        "/v1/schedules/{schedule_id}",
        "deleteSchedule",
        "Delete a schedule (its jobs stay)",
        {204: DELETED},
    ),
    _schedule_action("/v1/schedules/{schedule_id}/pause", "pauseSchedule", "Pause a schedule"),
    _schedule_action(
        "/v1/schedules/{schedule_id}/resume",
        "resumeSchedule",
        "Resume a schedule from the next slot",
    ),
    # -- keys and sessions (api/keys.py) ------------------------------------------------------
    Op(
        "get",
        "/v1/keys",
        "listKeys",
        "API keys (admin: all, `tenant` filters; else the tenant's own)",
        {200: answer("ApiKeyList", "Keys.")},
        parameters=[query("tenant", "Only this tenant's keys (id or name).")],
    ),
    Op(
        "post",
        "/v1/keys",
        "createKey",
        "Create a key with a scope and an optional expiry (admin)",
        {
            201: answer("ApiKeyCreated", "The key; `key` is shown this once.", "The key's URL."),
            403: ADMIN,
        },
        body="KeyRequest",
    ),
    Op(
        "get",
        "/v1/keys/{key_id}",
        "getKey",
        "A key (admin, or a key of the caller's tenant)",
        {200: answer("ApiKey", "The key.")},
    ),
    Op(
        "delete",
        "/v1/keys/{key_id}",
        "revokeKey",
        "Revoke a key (admin); its dashboard sessions end too",
        {200: answer("ApiKey", "The revoked key."), 403: ADMIN},
    ),
    Op(
        "delete",
        "/v1/admin/sessions",
        "endSessions",
        "Log out everywhere: end every dashboard session (admin)",
        {200: answer("SessionsEnded", "How many sessions ended."), 403: ADMIN},
    ),
    Op(
        "get",
        "/v1/admin/dropped-messages",
        "getDroppedMessages",
        "Malformed broker messages the workers dropped (admin)",
        {200: answer("DroppedMessages", "Counts by reason and the latest ones."), 403: ADMIN},
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

JOB_ID = {"job_id": "$response.body#/id"}
SCHEDULE_ID = {"schedule_id": "$response.body#/id"}
# OpenAPI links: where an answer's ids lead (client generators and Schemathesis's stateful
# tests follow them). Not to the event stream, which stays open until the job ends.
LINKS: dict[tuple[str, int], dict[str, dict[str, str]]] = {
    ("submitJob", status): {
        "getJob": JOB_ID,
        "changeJobPriority": JOB_ID,
        "cancelJob": JOB_ID,
        "retryJob": JOB_ID,
        "getJobLogs": JOB_ID,
        "getJobDeliveries": JOB_ID,
    }
    for status in (200, 202)
} | {
    ("cancelJob", 202): {"retryJob": JOB_ID, "getJob": JOB_ID},
    ("retryJob", 202): {"cancelJob": JOB_ID, "getJob": JOB_ID},
    ("createSchedule", 201): {
        operation: SCHEDULE_ID
        for operation in (
            "getSchedule",
            "changeSchedule",
            "pauseSchedule",
            "resumeSchedule",
            "deleteSchedule",
        )
    },
    ("registerModel", 202): {
        "getModelVersions": {"name": "$response.body#/name"},
        "checkModelAgain": {"name": "$response.body#/name", "version": "$response.body#/version"},
    },
}


def _parameters(op: Op, limit_max: int) -> list[dict[str, Any]]:
    """The path's parameters (from its `{name}`s), then the operation's own, with the page
    size bounded by `limit_max`."""
    path = [
        {"name": name, "in": "path", "required": True, "schema": PATH_SCHEMAS.get(name, STRING)}
        for name in re.findall(r"{(\w+)}", op.path)
    ]
    own = [
        query(
            LIMIT,
            f"Page size (default {min(50, limit_max)}; at most GENQ_PAGE_SIZE_MAX).",
            {"type": "integer", "minimum": 1, "maximum": limit_max},
        )
        if p["name"] == LIMIT and p["in"] == "query"
        else p
        for p in op.parameters
    ]
    return path + own


def _responses(op: Op, parameters: list[dict[str, Any]]) -> dict[str, Any]:
    """The operation's own answers, then the ones every operation of its kind gives."""
    responses = {str(status): response for status, response in op.answers.items()}
    if not op.public:
        responses.setdefault("401", UNAUTHORIZED)
    if any(p["in"] == "path" for p in parameters):
        responses.setdefault("404", NOT_FOUND)
    if op.body is not None:
        for status, response in BODY_PROBLEMS.items():
            responses.setdefault(status, response)
    if op.body is not None or parameters:
        # A NUL character is refused in any parameter or body (api.inputs).
        responses.setdefault("422", INVALID)
    if not op.public:
        responses["429"] = QUOTA_OR_RATE if "429" in responses else RATE_LIMITED
        if op.method not in ("get", "head"):
            responses.setdefault("403", READ_ONLY)
    for (source, code), targets in LINKS.items():
        if source == op.id and str(code) in responses:
            responses[str(code)] = {
                **responses[str(code)],
                "links": {
                    target: {"operationId": target, "parameters": values}
                    for target, values in targets.items()
                },
            }
    return responses


def operation(op: Op, limit_max: int) -> dict[str, Any]:
    parameters = _parameters(op, limit_max)
    built: dict[str, Any] = {"summary": op.summary}
    if op.description:
        built["description"] = op.description
    built["operationId"] = op.id
    if op.public:
        built["security"] = []
    if parameters:
        built["parameters"] = parameters
    if isinstance(op.body, str):
        built["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": ref(op.body)}},
        }
    elif op.body is not None:
        built["requestBody"] = op.body
    built["responses"] = _responses(op, parameters)
    return built


def operations(limit_max: int) -> dict[str, Any]:
    """The document's `paths`; `limit_max`: GENQ_PAGE_SIZE_MAX, the largest page a list
    operation answers."""
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        if op.method in paths.get(op.path, {}):
            raise ValueError(f"{op.method} {op.path} is declared twice")
        paths.setdefault(op.path, {})[op.method] = operation(op, limit_max)
    return paths
