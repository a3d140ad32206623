"""The OpenAPI entries of keys, sessions and abuse limits: `/v1/keys`, `/v1/admin/sessions`,
`/v1/admin/dropped-messages`, and the answers every authenticated operation may give because
of them (429 rate limited, 403 for a read-only key's writes). `api.openapi.document` merges
them into the document.
"""

from __future__ import annotations

from typing import Any

from api.keys import KeyRequest
from api.openapi import (
    INT,
    NOT_FOUND,
    STRING,
    TIME,
    UNAUTHORIZED,
    _add_model,
    _json,
    _nullable,
    _object,
    _path_id,
    _problem,
    _query,
    _ref,
)

FORBIDDEN = _problem("This needs an admin key.")
NUMBER = {"type": "number"}
SCOPE = {"type": "string", "enum": ["read", "submit", "admin"]}

KEY_FIELDS: dict[str, Any] = {
    "id": STRING,
    "prefix": STRING,
    "tenant_id": STRING,
    "tenant": STRING,
    "scope": SCOPE,
    "label": STRING,
    "created_at": TIME,
    "expires_at": _nullable(TIME),
    "revoked_at": _nullable(TIME),
    "last_used_at": _nullable(TIME),
}

RESPONSE_SCHEMAS: dict[str, Any] = {
    "ApiKey": _object(KEY_FIELDS),
    "ApiKeyCreated": _object({**KEY_FIELDS, "key": STRING}),
    "ApiKeyList": _object({"items": {"type": "array", "items": _ref("ApiKey")}}),
    "SessionsEnded": _object({"ended": INT}),
    "DroppedMessages": _object(
        {
            "total": INT,
            "by_reason": {"type": "object", "additionalProperties": INT},
            "recent": {
                "type": "array",
                "items": _object(
                    {
                        "at": NUMBER,
                        "reason": STRING,
                        "detail": STRING,
                        "queue": _nullable(STRING),
                        "excerpt": STRING,
                    }
                ),
            },
        }
    ),
    "RateLimited": _object(
        {
            "type": {"const": "rate-limited"},
            "title": STRING,
            "status": {"const": 429},
            "detail": STRING,
            "policy": {"type": "string", "enum": ["key", "tenant", "auth", "streams"]},
        }
    ),
    "TenantRateLimit": _object({"per_s": NUMBER, "burst": INT, "is_default": {"type": "boolean"}}),
}

RATE_HEADERS = {
    "Retry-After": {"schema": INT, "description": "Seconds until the limit lets one more in."},
    "RateLimit": {"schema": STRING, "description": 'IETF httpapi: "key";r=0;t=2'},
    "RateLimit-Policy": {"schema": STRING, "description": 'IETF httpapi: "key";q=40;w=2'},
}
RATE_LIMITED = {
    "description": "Too many requests from this key, tenant or (failed keys) address.",
    "headers": RATE_HEADERS,
    "content": {"application/problem+json": {"schema": _ref("RateLimited")}},
}
# POST /v1/jobs answers 429 for a quota as well.
QUOTA_OR_RATE = {
    "description": "A quota of the tenant refuses it, or a rate limit does.",
    "content": {
        "application/problem+json": {
            "schema": {"anyOf": [_ref("QuotaExceeded"), _ref("RateLimited")]}
        }
    },
}
READ_ONLY = _problem("This needs an admin key, or a key that may write (not scope `read`).")


def add_schemas(schemas: dict[str, Any]) -> None:
    schemas.update(RESPONSE_SCHEMAS)
    _add_model(schemas, KeyRequest, "KeyRequest")


def with_abuse_limits(paths: dict[str, Any]) -> dict[str, Any]:
    """Every operation that takes a key may be rate limited; every one that writes may be
    refused to a read-only key."""
    for operations in paths.values():
        for method, operation in operations.items():
            if operation.get("security") == []:
                continue
            responses = operation["responses"]
            if "429" in responses:
                responses["429"] = QUOTA_OR_RATE
            else:
                responses["429"] = RATE_LIMITED
            if method not in ("get", "head"):
                responses.setdefault("403", READ_ONLY)
    return paths


def paths() -> dict[str, Any]:
    key = [_path_id("key_id")]
    return {
        "/v1/keys": {
            "get": {
                "summary": "API keys (admin: all, `tenant` filters; else the tenant's own)",
                "operationId": "listKeys",
                "parameters": [_query("tenant", "Only this tenant's keys (id or name).")],
                "responses": {"200": _json("Keys.", "ApiKeyList"), "401": UNAUTHORIZED},
            },
            "post": {
                "summary": "Create a key with a scope and an optional expiry (admin)",
                "operationId": "createKey",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("KeyRequest")}},
                },
                "responses": {
                    "201": _json(
                        "The key; `key` is shown this once.",
                        "ApiKeyCreated",
                        {"Location": {"schema": STRING, "description": "The key's URL."}},
                    ),
                    "401": UNAUTHORIZED,
                    "403": FORBIDDEN,
                },
            },
        },
        "/v1/keys/{key_id}": {
            "get": {
                "summary": "A key (admin, or a key of the caller's tenant)",
                "operationId": "getKey",
                "parameters": key,
                "responses": {
                    "200": _json("The key.", "ApiKey"),
                    "401": UNAUTHORIZED,
                    "404": NOT_FOUND,
                },
            },
            "delete": {
                "summary": "Revoke a key (admin); its dashboard sessions end too",
                "operationId": "revokeKey",
                "parameters": key,
                "responses": {
                    "200": _json("The revoked key.", "ApiKey"),
                    "401": UNAUTHORIZED,
                    "403": FORBIDDEN,
                    "404": NOT_FOUND,
                },
            },
        },
        "/v1/admin/sessions": {
            "delete": {
                "summary": "Log out everywhere: end every dashboard session (admin)",
                "operationId": "endSessions",
                "responses": {
                    "200": _json("How many sessions ended.", "SessionsEnded"),
                    "401": UNAUTHORIZED,
                    "403": FORBIDDEN,
                },
            }
        },
        "/v1/admin/dropped-messages": {
            "get": {
                "summary": "Malformed broker messages the workers dropped (admin)",
                "operationId": "getDroppedMessages",
                "responses": {
                    "200": _json("Counts by reason and the latest ones.", "DroppedMessages"),
                    "401": UNAUTHORIZED,
                    "403": FORBIDDEN,
                },
            }
        },
    }
