"""The OpenAPI entries of `/v1/batches` (many jobs in one call). `api.openapi.document` merges
them into the document; the jobs' bodies are `JobSubmission`s, as `POST /v1/jobs` takes them.
"""

from __future__ import annotations

from typing import Any

from api.openapi import (
    INT,
    NOT_FOUND,
    STRING,
    TIME,
    UNAUTHORIZED,
    _json,
    _object,
    _path_id,
    _problem,
    _ref,
)
from core.states import JobState

_BATCH = {
    "id": STRING,
    "size": INT,
    "created_at": TIME,
    "counts": _object({str(state): INT for state in JobState}),
    "jobs_url": STRING,
}

RESPONSE_SCHEMAS: dict[str, Any] = {
    "Batch": _object(_BATCH),
    "BatchWithJobs": _object({**_BATCH, "jobs": {"type": "array", "items": _ref("Job")}}),
}


def add_schemas(schemas: dict[str, Any], max_jobs: int) -> None:
    schemas.update(RESPONSE_SCHEMAS)
    schemas["BatchSubmission"] = {
        "type": "object",
        "title": "BatchSubmission",
        "description": "Job bodies, each as POST /v1/jobs takes it; all are created or none.",
        "properties": {
            "jobs": {
                "type": "array",
                "minItems": 1,
                "maxItems": max_jobs,
                "items": _ref("JobSubmission"),
            }
        },
        "required": ["jobs"],
        "additionalProperties": False,
    }


def paths() -> dict[str, Any]:
    location = {"Location": {"schema": STRING, "description": "The batch's URL."}}
    return {
        "/v1/batches": {
            "post": {
                "summary": "Submit many jobs at once",
                "operationId": "submitBatch",
                "description": "Every job is checked first (a 422 names each bad field by "
                "index, `jobs.3.params.steps`); then all are created in one transaction and "
                "published. `GET /v1/jobs?batch=<id>` lists them.",
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                        "description": "A repeat with the same key and body returns the batch "
                        "the first request created (200); a different body is a 409.",
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("BatchSubmission")}},
                },
                "responses": {
                    "202": _json("The batch was accepted.", "BatchWithJobs", location),
                    "200": _json(
                        "A repeat of an earlier request (Idempotency-Key).",
                        "BatchWithJobs",
                        location,
                    ),
                    "401": UNAUTHORIZED,
                    "409": _problem("The Idempotency-Key was used with another body."),
                    "429": {"$ref": "#/components/responses/QuotaExceeded"},
                },
            }
        },
        "/v1/batches/{batch_id}": {
            "get": {
                "summary": "A batch, its jobs counted by state",
                "operationId": "getBatch",
                "parameters": [_path_id("batch_id")],
                "responses": {
                    "200": _json("The batch.", "Batch"),
                    "401": UNAUTHORIZED,
                    "404": NOT_FOUND,
                },
            }
        },
    }
