"""How `/v1/openapi.json` turns its per-route declarations into `paths`.

An operation is declared once, as an `Op` (method, path, id, summary, what it answers) in
api/openapi_jobs.py or api/openapi_admin.py. What every operation of a kind answers is added
here by rule rather than written out: 401 for a key-checked operation, 404 where the path
names an object, 422 where there is input to refuse, 400/413/415 before a body is read, 429
and the read-only 403 (api/ratelimits.py, api/auth.py), and the links from an answer's ids to
the operations they lead to. Schemas are named, not written: api/openapi.py generates them.
tests/test_api_app.py checks that the declarations and Flask's url_map name the same routes
and methods.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from core.numbers import INT32_MAX

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
DELETED = {"description": "Deleted."}
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
# The size of a page; its bound is the deployment's GENQ_PAGE_SIZE_MAX, filled in by `paths`.
LIMIT = "limit"


@dataclass(frozen=True)
class Op:
    """One operation. `answers`: status → response (`paths` adds the ones every operation
    of its kind gives); `body`: the request body's schema name (JSON) or a whole
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


def deletion(
    path: str, operation_id: str, summary: str, description: str, conflict: str, **more: Any
) -> Op:
    """A DELETE: 204 when done, 409 (`conflict` says when) when something still needs it."""
    answers = {204: DELETED, 409: problem(conflict), **more.pop("answers", {})}
    return Op("delete", path, operation_id, summary, answers, description, **more)


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
    """The document's Operation Object of `op`."""
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


def paths(ops: Iterable[Op], limit_max: int) -> dict[str, Any]:
    """The document's `paths`; `limit_max`: GENQ_PAGE_SIZE_MAX, the largest page a list
    operation answers."""
    built: dict[str, dict[str, Any]] = {}
    ids: set[str] = set()
    for op in ops:
        if op.method in built.get(op.path, {}) or op.id in ids:
            raise ValueError(f"{op.method} {op.path} ({op.id}) is declared twice")
        ids.add(op.id)
        built.setdefault(op.path, {})[op.method] = operation(op, limit_max)
    # A link to an operation that is not there would be a broken document, not a missing link.
    for (source, _), targets in LINKS.items():
        if not {source, *targets} <= ids:
            raise ValueError(f"LINKS names operations not declared: { ({source, *targets} - ids) }")
    return built
