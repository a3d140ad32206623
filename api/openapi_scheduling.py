"""The OpenAPI entries of the scheduling endpoints: `/v1/tenants` (weights, quotas, usage),
`/v1/admin/purge` and `/v1/schedules`. `api.openapi.document` merges them into the document;
request bodies are generated from the pydantic classes the views validate with.
"""

from __future__ import annotations

from typing import Any

from api.openapi import (
    INT,
    INVALID,
    NOT_FOUND,
    OBJECT,
    STRING,
    TIME,
    UNAUTHORIZED,
    _add_model,
    _json,
    _nullable,
    _object,
    _path_id,
    _problem,
    _ref,
)
from api.schedules import ScheduleBody, ScheduleChange
from api.tenants import PurgeRequest, QuotaChange
from core.scaling import PolicyChange

FORBIDDEN = _problem("This needs an admin key.")
NUMBER = {"type": "number"}
BOOL = {"type": "boolean"}


def _body(schema: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(schema)}}}


RESPONSE_SCHEMAS: dict[str, Any] = {
    "Tenant": _object(
        {
            "id": STRING,
            "name": STRING,
            "weight": INT,
            "quotas": _object(
                {
                    "max_running": _nullable(INT),
                    "max_queued": _nullable(INT),
                    "gpu_seconds_budget": _nullable(NUMBER),
                    "budget_period_s": INT,
                    "over_quota": {"type": "string", "enum": ["reject", "hold"]},
                }
            ),
            "rate_limit": _ref("TenantRateLimit"),  # api/openapi_security.py
            "usage": _object({"running": INT, "waiting": INT, "gpu_seconds": NUMBER}),
            "fair_share": _object(
                {
                    "gpu_seconds": NUMBER,
                    "running_gpu_seconds": NUMBER,
                    "share": NUMBER,
                    "usage_share": NUMBER,
                    "ratio": NUMBER,
                }
            ),
            "preemption": _object({"preemptible": BOOL, "may_opt_out": BOOL}),
            "retention": _ref("TenantRetention"),  # api/openapi_retention.py
            "disk": _ref("DiskUse"),
        }
    ),
    "TenantList": _object({"items": {"type": "array", "items": _ref("Tenant")}}),
    "PurgeResult": _object({"purged": INT, "job_ids": {"type": "array", "items": STRING}}),
    "ScheduleOut": _object(
        {
            "id": STRING,
            "name": STRING,
            "cron": STRING,
            "timezone": STRING,
            "job": OBJECT,
            "paused": {"type": "boolean"},
            "next_run_at": _nullable(TIME),
            "last_run_at": _nullable(TIME),
            "last_job_id": _nullable(STRING),
            "last_error": _nullable(STRING),
            "fired_count": INT,
            "created_at": TIME,
            "updated_at": TIME,
        }
    ),
    "ScheduleList": _object({"items": {"type": "array", "items": _ref("ScheduleOut")}}),
    "QuotaExceeded": _object(
        {
            "type": {"const": "quota-exceeded"},
            "title": STRING,
            "status": {"const": 429},
            "detail": STRING,
            "limit": {"type": "string", "enum": ["max_queued", "gpu_seconds_budget"]},
            "current": NUMBER,
            "allowed": NUMBER,
        }
    ),
}

QUOTA_EXCEEDED = {
    "description": "A quota of the tenant refuses it; the body names the limit.",
    "content": {"application/problem+json": {"schema": _ref("QuotaExceeded")}},
}


def add_schemas(schemas: dict[str, Any]) -> None:
    schemas.update(RESPONSE_SCHEMAS)
    for model, name in (
        (QuotaChange, "QuotaChange"),
        (PurgeRequest, "PurgeRequest"),
        (ScheduleBody, "Schedule"),
        (ScheduleChange, "ScheduleChange"),
        (PolicyChange, "ScalingChange"),
    ):
        _add_model(schemas, model, name)


def _schedule_action(summary: str, operation_id: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "operationId": operation_id,
            "parameters": [_path_id("schedule_id")],
            "responses": {
                "200": _json("The schedule.", "ScheduleOut"),
                "401": UNAUTHORIZED,
                "404": NOT_FOUND,
            },
        }
    }


def paths() -> dict[str, Any]:
    tenant = [_path_id("ref")]
    schedule = [_path_id("schedule_id")]
    return {
        "/v1/tenants": {
            "get": {
                "summary": "Tenants with their weight, quotas and usage (admin: all; else own)",
                "operationId": "listTenants",
                "responses": {"200": _json("Tenants.", "TenantList"), "401": UNAUTHORIZED},
            }
        },
        "/v1/tenants/{ref}": {
            "get": {
                "summary": "A tenant by id or name",
                "operationId": "getTenant",
                "parameters": tenant,
                "responses": {
                    "200": _json("The tenant.", "Tenant"),
                    "401": UNAUTHORIZED,
                    "404": NOT_FOUND,
                },
            },
            "patch": {
                "summary": "Set a tenant's weight and quotas (admin); null removes a limit",
                "operationId": "changeTenantQuotas",
                "parameters": tenant,
                "requestBody": _body("QuotaChange"),
                "responses": {
                    "200": _json("The tenant.", "Tenant"),
                    "401": UNAUTHORIZED,
                    "403": FORBIDDEN,
                    "404": NOT_FOUND,
                    "422": INVALID,
                },
            },
        },
        "/v1/admin/purge": {
            "post": {
                "summary": "Cancel every waiting job of a tenant and/or a queue (admin)",
                "operationId": "purgeJobs",
                "requestBody": _body("PurgeRequest"),
                "responses": {
                    "200": _json("How many jobs were canceled.", "PurgeResult"),
                    "401": UNAUTHORIZED,
                    "403": FORBIDDEN,
                    "404": NOT_FOUND,
                    "422": INVALID,
                },
            }
        },
        "/v1/schedules": {
            "post": {
                "summary": "Create a schedule (cron, time zone, job template)",
                "operationId": "createSchedule",
                "requestBody": _body("Schedule"),
                "responses": {
                    "201": _json("The schedule.", "ScheduleOut"),
                    "401": UNAUTHORIZED,
                    "409": _problem("The tenant has a schedule of that name."),
                    "422": INVALID,
                },
            },
            "get": {
                "summary": "The caller's schedules (admin: all)",
                "operationId": "listSchedules",
                "responses": {"200": _json("Schedules.", "ScheduleList"), "401": UNAUTHORIZED},
            },
        },
        "/v1/schedules/{schedule_id}": {
            "get": {
                "summary": "A schedule",
                "operationId": "getSchedule",
                "parameters": schedule,
                "responses": {
                    "200": _json("The schedule.", "ScheduleOut"),
                    "401": UNAUTHORIZED,
                    "404": NOT_FOUND,
                },
            },
            "patch": {
                "summary": "Change a schedule",
                "operationId": "changeSchedule",
                "parameters": schedule,
                "requestBody": _body("ScheduleChange"),
                "responses": {
                    "200": _json("The schedule.", "ScheduleOut"),
                    "401": UNAUTHORIZED,
                    "404": NOT_FOUND,
                    "409": _problem("The tenant has a schedule of that name."),
                    "422": INVALID,
                },
            },
            "delete": {
                "summary": "Delete a schedule (its jobs stay)",
                "operationId": "deleteSchedule",
                "parameters": schedule,
                "responses": {
                    "204": {"description": "Deleted."},
                    "401": UNAUTHORIZED,
                    "404": NOT_FOUND,
                },
            },
        },
        "/v1/schedules/{schedule_id}/pause": _schedule_action("Pause a schedule", "pauseSchedule"),
        "/v1/schedules/{schedule_id}/resume": _schedule_action(
            "Resume a schedule from the next slot", "resumeSchedule"
        ),
    }
