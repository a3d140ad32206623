"""`GET /v1/openapi.json`: the OpenAPI 3.1 document of the `/v1` API.

The request body of `POST /v1/jobs` is generated from `JobSubmission`, and each family's
parameter classes are listed under `components.schemas` as `<Family><Kind>Params`, so the
document stays in step with the code. Response shapes are written out here, next to the
serializers they describe (`api.payloads`).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from flask import Blueprint, Response, jsonify
from pydantic import BaseModel

from api.auth import public
from api.catalog import ModelRegistration
from api.datasets import DATASET_NAME_MAX, KINDS
from api.state import genq
from api.submissions import JobSubmission
from core.artifacts import NAME_PATTERN
from core.numbers import INT32_MAX
from core.states import JobKind, JobState
from workers.registry import FAMILIES

log = logging.getLogger(__name__)

bp = Blueprint("openapi", __name__, url_prefix="/v1")

REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


STRING = {"type": "string"}
INT = {"type": "integer"}
TIME = {"type": "string", "format": "date-time"}
OBJECT = {"type": "object", "additionalProperties": True}


def _object(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": required if required is not None else list(properties),
    }


def _page(item: str, cursor: bool = False) -> dict[str, Any]:
    properties: dict[str, Any] = {"items": {"type": "array", "items": _ref(item)}}
    if cursor:
        properties["next_cursor"] = _nullable(STRING)
    return _object(properties)


RESPONSE_SCHEMAS: dict[str, dict[str, Any]] = {
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details.",
        "properties": {
            "type": STRING,
            "title": STRING,
            "status": INT,
            "detail": STRING,
            "errors": {
                "type": "array",
                "items": _object({"field": STRING, "message": STRING}),
            },
        },
        "required": ["type", "title", "status", "detail"],
    },
    "Output": _object(
        {
            "id": STRING,
            "name": STRING,
            "kind": {"type": "string", "enum": ["image", "text", "grid", "file"]},
            "url": STRING,
            "content_type": STRING,
            "bytes": INT,
            "meta": OBJECT,
        }
    ),
    "Job": _object(
        {
            "id": STRING,
            "kind": {"type": "string", "enum": [str(k) for k in JobKind]},
            "state": {"type": "string", "enum": [str(s) for s in JobState]},
            "model": _nullable(STRING),
            "family": STRING,
            "dataset": _nullable(STRING),
            "name": _nullable(STRING),
            "params": OBJECT,
            "priority": {"type": "integer", "minimum": 0, "maximum": 9},
            "priority_class": {"type": "string", "enum": ["interactive", "normal", "batch"]},
            "progress": _object({"step": INT, "total": INT, "message": STRING}),
            "queue_position": _nullable(INT),
            "eta_s": _nullable({"type": "number"}),
            "attempt": INT,
            "max_attempts": INT,
            "outputs": {"type": "array", "items": _ref("Output")},
            "error": _nullable(_object({"type": STRING, "detail": STRING})),
            "created_at": TIME,
            "started_at": _nullable(TIME),
            "finished_at": _nullable(TIME),
            "metrics": {
                **OBJECT,
                "description": "The job's last metrics; `load_s`: seconds it waited for its "
                "model server to load (a cold start), absent when the server was warm.",
            },
            "result_model": _nullable(STRING),
            "webhook": _nullable(STRING),
            "webhook_events": _nullable({"type": "array", "items": STRING}),
            "deadline": _nullable(TIME),
            "run_at": _nullable(TIME),
            "timeout_s": _nullable({"type": "number"}),
            "resources": _object(
                {"num_gpus": {"type": "number"}, "gpu_memory_gb": _nullable({"type": "number"})}
            ),
            "preemptible": {"type": "boolean"},
            "preemption": _object(
                {"count": INT, "by": _nullable(STRING), "requested_at": _nullable(TIME)}
            ),
            "placement": _nullable(
                _object(
                    {
                        "node_id": STRING,
                        "node_ip": STRING,
                        "hostname": STRING,
                        "gpu_ids": {"type": "array", "items": STRING},
                        "replica": STRING,
                    }
                )
            ),
            "batch": _nullable(_object({"id": STRING, "item": STRING})),
        }
    ),
    "JobPage": _page("Job", cursor=True),
    "Delivery": _object(
        {
            "id": STRING,
            "event": {
                "type": "string",
                "enum": ["start", "progress", "output", "completed", "preempted"],
            },
            "type": STRING,
            "url": STRING,
            "state": {"type": "string", "enum": ["pending", "delivered", "failed"]},
            "attempts": INT,
            "next_attempt_at": _nullable(TIME),
            "created_at": TIME,
            "delivered_at": _nullable(TIME),
            "log": {
                "type": "array",
                "items": _object(
                    {
                        "attempt": INT,
                        "at": TIME,
                        "status": _nullable(INT),
                        "error": _nullable(STRING),
                        "duration_ms": INT,
                    }
                ),
            },
        }
    ),
    "DeliveryList": _page("Delivery"),
    "WebhookSecret": _object({"tenant_id": STRING, "secret": STRING}),
    "Event": {
        "type": "object",
        "description": "One history entry; the event's own fields follow id, type, created_at.",
        "properties": {"id": INT, "type": STRING, "created_at": TIME},
        "required": ["id", "type", "created_at"],
        "additionalProperties": True,
    },
    "EventList": _page("Event"),
    "Model": _object(
        {
            "name": STRING,
            "version": INT,
            "ref": STRING,
            "family": STRING,
            "created_at": TIME,
            "status": {
                "type": "string",
                "enum": ["checking", "ready", "failed"],
                "description": "A registered pretrained folder is `checking` until a worker"
                " has loaded it; jobs need `ready`.",
            },
            "status_detail": _nullable(STRING),
            "description": _nullable(STRING),
            "metrics": OBJECT,
            "lineage": _object(
                {
                    "dataset": _nullable(STRING),
                    "parent": _nullable(STRING),
                    "job": _nullable(STRING),
                }
            ),
            "scaling": {
                **_object(
                    {
                        "min_replicas": INT,
                        "max_replicas": INT,
                        "target_jobs_per_replica": {"type": "number"},
                        "idle_unload_s": _nullable({"type": "number"}),
                        "last_idle_unload_s": _nullable({"type": "number"}),
                        "overrides": OBJECT,
                    }
                ),
                "description": "The replica policy in force; `overrides`: the fields this"
                " version sets itself (the rest are its family's defaults).",
            },
        }
    ),
    "ModelList": _page("Model"),
    "Dataset": _object(
        {
            "id": STRING,
            "name": STRING,
            "kind": STRING,
            "num_items": INT,
            "size_bytes": INT,
            "meta": OBJECT,
            "created_at": TIME,
        }
    ),
    "DatasetList": _page("Dataset"),
    "Family": {
        **_object(
            {
                "name": STRING,
                "status": {"type": "string", "enum": ["ok", "broken"]},
                "source": STRING,
                "error": STRING,
                "api_version": INT,
                "description": STRING,
                "kinds": {"type": "array", "items": STRING},
                "dataset_kinds": {"type": "array", "items": STRING},
                "resources": OBJECT,
                "registers_folders": {"type": "boolean"},
                "params": {
                    "type": "object",
                    "description": "JSON schema of the params of each kind the family supports.",
                    "additionalProperties": OBJECT,
                },
            },
            required=["name", "status", "source"],
        ),
        "description": "A loaded family (`status` ok) has every field but `error`; one found"
        " but not loaded (`status` broken: its import failed, it declares another interface"
        " version or fails the checks) has `name`, `source` and `error`.",
    },
    "FamilyList": _page("Family"),
    "Health": _object({"status": STRING, "checks": {"type": "object"}}),
    "Liveness": _object({"status": {"type": "string", "enum": ["alive"]}}),
    "HealthPart": _object(
        {
            "status": {"type": "string", "description": "`ok`, or what is wrong."},
            "age_s": {
                "type": ["number", "null"],
                "description": "Seconds since the part was last seen healthy (null: never).",
            },
        }
    ),
    "Readiness": _object(
        {
            "status": {"type": "string", "enum": ["ready"]},
            "parts": {
                "type": "object",
                "description": "database, broker, workers (with `queues`: each queue's status, "
                "worker count and age), ray, scheduler.",
                "additionalProperties": _ref("HealthPart"),
            },
        }
    ),
}


def _add_model(schemas: dict[str, Any], model: type[BaseModel], name: str) -> None:
    """Add `model`'s JSON schema as `name`, lifting its nested definitions next to it."""
    schema = model.model_json_schema(ref_template=REF)
    for def_name, definition in schema.pop("$defs", {}).items():
        if schemas.setdefault(def_name, definition) != definition:
            raise ValueError(f"two different schemas are named {def_name}")
    schemas[name] = schema


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/problem+json": {"schema": _ref("Problem")}},
    }


def _json(description: str, schema: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ref(schema)}},
    }
    if headers:
        response["headers"] = headers
    return response


UNAUTHORIZED = _problem("Missing, unknown or revoked API key.")
NOT_FOUND = _problem("No such object, or it belongs to another tenant.")
INVALID = _problem("Invalid input; `errors` names each bad field.")
CONFLICT = _problem("The job's state does not allow this.")
LOCATION = {"Location": {"schema": STRING, "description": "The job's URL."}}


def _path_id(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": STRING}


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


def _limit(limit_max: int) -> dict[str, Any]:
    return _query(
        "limit",
        f"Page size (default {min(50, limit_max)}; at most GENQ_PAGE_SIZE_MAX).",
        {"type": "integer", "minimum": 1, "maximum": limit_max},
    )


def _query(name: str, description: str, schema: dict[str, Any] = STRING) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _job_action(summary: str, operation_id: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "operationId": operation_id,
            "parameters": [_path_id("job_id")],
            "responses": {
                "202": _json("The job after the change.", "Job"),
                "401": UNAUTHORIZED,
                "404": NOT_FOUND,
                "409": CONFLICT,
            },
        }
    }


def _list(summary: str, operation_id: str, schema: str) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "operationId": operation_id,
            "responses": {"200": _json(summary, schema), "401": UNAUTHORIZED},
        }
    }


def _paths(limit_max: int) -> dict[str, Any]:
    return {
        "/v1/jobs": {
            "post": {
                "summary": "Submit a job",
                "operationId": "submitJob",
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                        "description": "A repeat with the same key and body returns the job "
                        "the first request created (200); a different body is a 409.",
                    },
                    {
                        "name": "Prefer",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "pattern": "^wait(=[1-9][0-9]{0,4})?$"},
                        "description": "`wait` (60 s) or `wait=N` seconds (at most "
                        "GENQ_SYNC_WAIT_MAX_S): hold the call until the job ends.",
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("JobSubmission")}},
                },
                "responses": {
                    "202": _json("The job was accepted.", "Job", LOCATION),
                    "200": _json(
                        "A repeat of an earlier request (Idempotency-Key), or a job that ended "
                        "within `Prefer: wait` (header `Preference-Applied: wait=N`).",
                        "Job",
                        LOCATION,
                    ),
                    "400": _problem("The body is not valid JSON."),
                    "401": UNAUTHORIZED,
                    "404": _problem("The model or data set named does not exist."),
                    "409": _problem("The Idempotency-Key was used with another body."),
                    "413": _problem("The body is too large."),
                    "429": {"$ref": "#/components/responses/QuotaExceeded"},
                    "415": _problem("The body is not sent as application/json."),
                    "422": INVALID,
                },
            },
            "get": {
                "summary": "List jobs, newest first",
                "operationId": "listJobs",
                "parameters": [
                    _query(
                        "state",
                        "One state or a comma-separated list.",
                        {"type": "string", "pattern": f"^({STATES})( *, *({STATES}))*$"},
                    ),
                    _query("kind", "generate, train or finetune.", {"enum": list(JobKind)}),
                    _query("model", "A model name.", FILTER),
                    _query("batch", "A batch id (POST /v1/batches).", FILTER),
                    _limit(limit_max),
                    _query("cursor", "`next_cursor` of the previous page.", FILTER),
                ],
                "responses": {
                    "200": _json("A page of jobs.", "JobPage"),
                    "401": UNAUTHORIZED,
                    "422": INVALID,
                },
            },
        },
        "/v1/jobs/{job_id}": {
            "get": {
                "summary": "Get a job",
                "operationId": "getJob",
                "parameters": [_path_id("job_id")],
                "responses": {
                    "200": _json("The job.", "Job"),
                    "401": UNAUTHORIZED,
                    "404": NOT_FOUND,
                },
            },
            "patch": {
                "summary": "Change a queued or scheduled job's priority",
                "operationId": "changeJobPriority",
                "parameters": [_path_id("job_id")],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
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
                        }
                    },
                },
                "responses": {
                    "200": _json("The job with its new priority.", "Job"),
                    "401": UNAUTHORIZED,
                    "404": NOT_FOUND,
                    "409": CONFLICT,
                    "422": INVALID,
                },
            },
        },
        "/v1/jobs/{job_id}/cancel": _job_action("Cancel a job", "cancelJob"),
        "/v1/jobs/{job_id}/retry": _job_action("Retry a failed or canceled job", "retryJob"),
        "/v1/jobs/{job_id}/events": {
            "get": {
                "summary": "Stream a job's events (Server-Sent Events)",
                "operationId": "streamJobEvents",
                "parameters": [
                    _path_id("job_id"),
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "schema": EVENT_ID,
                        "description": "Resume after this event id.",
                    },
                    _query(
                        "last_event_id",
                        "Resume after this event id (for clients that cannot set headers).",
                        EVENT_ID,
                    ),
                ],
                "responses": {
                    "200": {
                        "description": "`id: <event id>`, `event: <type>`, `data: <Event>` "
                        "until the job is finished.",
                        "content": {"text/event-stream": {"schema": SSE_EVENT}},
                    },
                    "401": UNAUTHORIZED,
                    "404": NOT_FOUND,
                    "422": INVALID,
                    "503": {
                        **_problem(
                            "This API process has GENQ_API_MAX_STREAMS streams open: come back "
                            "after Retry-After seconds, or poll the job."
                        ),
                        "headers": {"Retry-After": {"schema": INT}},
                    },
                },
            }
        },
        "/v1/jobs/{job_id}/logs": {
            "get": {
                "summary": "A job's log lines",
                "operationId": "getJobLogs",
                "parameters": [_path_id("job_id")],
                "responses": {
                    "200": _json("Log events, oldest first.", "EventList"),
                    "401": UNAUTHORIZED,
                    "404": NOT_FOUND,
                },
            }
        },
        "/v1/jobs/{job_id}/deliveries": {
            "get": {
                "summary": "A job's webhook messages and every attempt to send them",
                "operationId": "getJobDeliveries",
                "parameters": [_path_id("job_id")],
                "responses": {
                    "200": _json("Messages, oldest first.", "DeliveryList"),
                    "401": UNAUTHORIZED,
                    "404": NOT_FOUND,
                },
            }
        },
        "/v1/dead-letter": {
            "get": {
                "summary": "Failed jobs that used up their attempts",
                "operationId": "listDeadLetter",
                "parameters": [
                    _limit(limit_max),
                    _query("cursor", "The next_cursor of the previous page.", FILTER),
                ],
                "responses": {
                    "200": _json("Newest first.", "JobPage"),
                    "401": UNAUTHORIZED,
                    "422": INVALID,
                },
            }
        },
        "/v1/webhook-secret": {
            "get": {
                "summary": "The tenant's webhook signing secret",
                "operationId": "getWebhookSecret",
                "responses": {
                    "200": _json("The whsec_ secret.", "WebhookSecret"),
                    "401": UNAUTHORIZED,
                },
            }
        },
        "/v1/artifacts/{artifact_id}": {
            "get": {
                "summary": "Download an output file",
                "operationId": "getArtifact",
                "parameters": [_path_id("artifact_id")],
                "responses": {
                    "200": {
                        "description": "The file, with its content type and an ETag.",
                        "content": {
                            "*/*": {"schema": {"type": "string", "contentEncoding": "binary"}}
                        },
                    },
                    "304": {"description": "Not modified (If-None-Match)."},
                    "401": UNAUTHORIZED,
                    "404": NOT_FOUND,
                },
            }
        },
        "/v1/models": {
            **_list("Visible models", "listModels", "ModelList"),
            "post": {
                "summary": "Register a pretrained diffusers or transformers folder (admin)",
                "description": "The folder is on the server: an absolute path (inside"
                " GENQ_PRETRAINED_ROOTS when set) or a path under the artifact root. Its layout"
                " is checked at once (safetensors weights only); a worker then loads it and"
                " marks the new version `ready` or `failed`. Jobs on a model that is not ready"
                " answer 409.",
                "operationId": "registerModel",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("ModelRegistration")}},
                },
                "responses": {
                    "202": _json(
                        "The new version, `checking`.",
                        "Model",
                        {"Location": {"schema": STRING, "description": "The model's URL."}},
                    ),
                    "401": UNAUTHORIZED,
                    "403": _problem("Not an admin key."),
                    "409": _problem("The name belongs to a model of another family."),
                    "422": INVALID,
                    "503": _problem("The broker did not take the check; register it again."),
                },
            },
        },
        "/v1/models/{name}": {
            "get": {
                "summary": "Every version of a model",
                "operationId": "getModelVersions",
                "parameters": [_path_id("name")],
                "responses": {
                    "200": _json("Versions, oldest first.", "ModelList"),
                    "401": UNAUTHORIZED,
                    "404": NOT_FOUND,
                },
            },
            "patch": {
                "summary": "Set the replica policy of every version of a model (admin)",
                "description": "Only the fields sent change; null goes back to the family's"
                " default. Audited; the scaler applies it at its next look.",
                "operationId": "changeModelScaling",
                "parameters": [_path_id("name")],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("ScalingChange")}},
                },
                "responses": {
                    "200": _json("The versions changed.", "ModelList"),
                    "401": UNAUTHORIZED,
                    "403": _problem("Not an admin key."),
                    "404": NOT_FOUND,
                    "422": INVALID,
                },
            },
        },
        "/v1/models/{name}/{version}": {
            "patch": {
                "summary": "Set the replica policy of one version of a model (admin)",
                "operationId": "changeModelVersionScaling",
                "parameters": [
                    _path_id("name"),
                    {
                        "name": "version",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "integer", "minimum": 1, "maximum": INT32_MAX},
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("ScalingChange")}},
                },
                "responses": {
                    "200": _json("The version.", "ModelList"),
                    "401": UNAUTHORIZED,
                    "403": _problem("Not an admin key."),
                    "404": NOT_FOUND,
                    "422": INVALID,
                },
            }
        },
        "/v1/models/{name}/{version}/check": {
            "post": {
                "summary": "Check a registered pretrained folder again (admin)",
                "description": "For a version that is `failed` (its folder since fixed) or"
                " still `checking` (its check never came back): the layout is checked again,"
                " the version goes back to `checking` and a worker loads it.",
                "operationId": "checkModelAgain",
                "parameters": [
                    _path_id("name"),
                    {
                        "name": "version",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "integer", "minimum": 1, "maximum": INT32_MAX},
                    },
                ],
                "responses": {
                    "202": _json("The version, `checking`.", "Model"),
                    "401": UNAUTHORIZED,
                    "403": _problem("Not an admin key."),
                    "404": NOT_FOUND,
                    "409": _problem("The version is ready, or was trained here."),
                    "422": INVALID,
                    "503": _problem("The broker did not take the check."),
                },
            }
        },
        "/v1/datasets": {
            **_list("Visible data sets", "listDatasets", "DatasetList"),
            "post": {
                "summary": "Upload a data set: a zip of class folders of images, a zip of"
                " captioned images (captions.jsonl or .txt files), or a text file",
                "operationId": "uploadDataset",
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": _object(
                                {
                                    "name": {
                                        "type": "string",
                                        "pattern": NAME_PATTERN,
                                        "maxLength": DATASET_NAME_MAX,
                                    },
                                    "kind": {"type": "string", "enum": list(KINDS)},
                                    "file": {"type": "string", "format": "binary"},
                                },
                                ["name", "kind", "file"],
                            )
                        }
                    },
                },
                "responses": {
                    "201": _json("The stored data set.", "Dataset"),
                    "401": UNAUTHORIZED,
                    "409": _problem("The tenant has a data set of this name."),
                    "413": _problem("Over a GENQ_DATASET_MAX_* size, entry or unpacked limit."),
                    "422": INVALID,
                },
            },
        },
        "/v1/families": _list("Model families and their parameters", "listFamilies", "FamilyList"),
        "/v1/health": {
            "get": {
                "summary": "Database and broker reachability",
                "operationId": "health",
                "security": [],
                "responses": {
                    "200": _json("Everything answers.", "Health"),
                    "503": _problem("Something does not answer; `checks` says what."),
                },
            }
        },
        "/v1/health/live": {
            "get": {
                "summary": "Liveness: this API process answers (nothing else is checked)",
                "operationId": "healthLive",
                "security": [],
                "responses": {"200": _json("The process answers.", "Liveness")},
            }
        },
        "/v1/health/ready": {
            "get": {
                "summary": "Readiness: database, broker, Ray, a worker on each queue, the "
                "periodic scheduler",
                "operationId": "healthReady",
                "security": [],
                "responses": {
                    "200": _json("Every part is ok.", "Readiness"),
                    "503": _problem(
                        "A part is not ok; `parts` gives each part's status and age_s, "
                        "`detail` names the failing ones."
                    ),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics of the whole stack",
                "description": 'The Prometheus text format (README, "Metrics"). Bearer: '
                "the metrics token (GENQ_METRICS_TOKEN) or an admin key.",
                "operationId": "metrics",
                "responses": {
                    "200": {
                        "description": "Every metric, one scrape.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "401": _problem("No metrics token or key, or a wrong one."),
                    "403": _problem("A key that is not an admin key."),
                },
            }
        },
        "/v1/openapi.json": {
            "get": {
                "summary": "This document",
                "operationId": "openapi",
                "security": [],
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    }


# What every operation with a body may answer before reading it (api.jobs.read_json_body and
# the request size limit), whether or not its own table lists them.
BODY_PROBLEMS = {
    "400": _problem("The body is not valid JSON."),
    "413": _problem("The body is over the request size limit."),
    "415": _problem("The body is not sent with the content type this operation takes."),
}


def _with_input_problems(paths: dict[str, Any]) -> dict[str, Any]:
    """Add what input checks shared by every view answer: the body problems, and a 422 for
    any parameter or body (a NUL character is refused everywhere, api.inputs)."""
    for operations in paths.values():
        for operation in operations.values():
            if "requestBody" in operation:
                for status, response in BODY_PROBLEMS.items():
                    operation["responses"].setdefault(status, response)
            if "requestBody" in operation or operation.get("parameters"):
                operation["responses"].setdefault("422", INVALID)
    return paths


JOB_ID = {"job_id": "$response.body#/id"}
SCHEDULE_ID = {"schedule_id": "$response.body#/id"}
# OpenAPI links: where an answer's ids lead (client generators and Schemathesis's stateful
# tests follow them). Not to the event stream, which stays open until the job ends.
LINKS: dict[tuple[str, str], dict[str, dict[str, str]]] = {
    ("submitJob", status): {
        "getJob": JOB_ID,
        "changeJobPriority": JOB_ID,
        "cancelJob": JOB_ID,
        "retryJob": JOB_ID,
        "getJobLogs": JOB_ID,
        "getJobDeliveries": JOB_ID,
    }
    for status in ("200", "202")
} | {
    ("cancelJob", "202"): {"retryJob": JOB_ID, "getJob": JOB_ID},
    ("retryJob", "202"): {"cancelJob": JOB_ID, "getJob": JOB_ID},
    ("createSchedule", "201"): {
        operation: SCHEDULE_ID
        for operation in (
            "getSchedule",
            "changeSchedule",
            "pauseSchedule",
            "resumeSchedule",
            "deleteSchedule",
        )
    },
    ("registerModel", "202"): {
        "getModelVersions": {"name": "$response.body#/name"},
        "checkModelAgain": {"name": "$response.body#/name", "version": "$response.body#/version"},
    },
}


def _with_links(paths: dict[str, Any]) -> dict[str, Any]:
    operations = {
        operation["operationId"]: operation
        for methods in paths.values()
        for operation in methods.values()
    }
    for (source, status), targets in LINKS.items():
        response = operations[source]["responses"][status]
        response["links"] = {
            target: {"operationId": target, "parameters": parameters}
            for target, parameters in targets.items()
        }
    return paths


@functools.cache
def document(limit_max: int, max_jobs: int = 1000) -> dict[str, Any]:
    """`limit_max`: GENQ_PAGE_SIZE_MAX, the largest page a list operation answers; `max_jobs`:
    GENQ_BATCH_MAX_JOBS, the most jobs in one batch."""
    schemas: dict[str, Any] = dict(RESPONSE_SCHEMAS)
    _add_model(schemas, JobSubmission, "JobSubmission")
    _add_model(schemas, ModelRegistration, "ModelRegistration")
    # They build on the helpers above.
    from api import (
        openapi_batches,
        openapi_inputs,
        openapi_retention,
        openapi_scheduling,
        openapi_security,
    )

    openapi_scheduling.add_schemas(schemas)
    openapi_batches.add_schemas(schemas, max_jobs)
    openapi_security.add_schemas(schemas)
    openapi_retention.add_schemas(schemas)
    openapi_inputs.add_schemas(schemas)
    for family in FAMILIES.values():
        # A plug-in's nested schema may clash with another family's name for a different one:
        # its params are then left out of the document, not the whole document.
        family_schemas = dict(schemas)
        try:
            for kind in JobKind:
                spec = family.params_for(kind)
                if spec is not None:
                    name = f"{family.name.title()}{str(kind).title()}Params"
                    _add_model(family_schemas, spec, name)
        except ValueError as exc:
            log.warning("the OpenAPI document leaves out family %r's params: %s", family.name, exc)
            continue
        schemas = family_schemas
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "genq",
            "version": "1",
            "description": "A self-hosted job queue for generative AI.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": _with_links(
            openapi_security.with_abuse_limits(
                _with_input_problems(
                    openapi_retention.add_paths(
                        {
                            **_paths(limit_max),
                            **openapi_scheduling.paths(),
                            **openapi_batches.paths(),
                            **openapi_security.paths(),
                            **openapi_inputs.paths(),
                        }
                    )
                )
            )
        ),
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {"QuotaExceeded": openapi_scheduling.QUOTA_EXCEEDED},
        },
    }


@bp.get("/openapi.json")
@public
def openapi() -> Response:
    settings = genq().settings
    return jsonify(document(settings.page_size_max, settings.batch_max_jobs))
