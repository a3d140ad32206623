"""The OpenAPI entries of `/v1/files` (input pictures for image-to-image and inpainting jobs).
`api.openapi.document` merges them into the document."""

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
)

RESPONSE_SCHEMAS: dict[str, Any] = {
    "InputFile": {
        **_object(
            {
                "id": STRING,
                "filename": STRING,
                "bytes": INT,
                "purpose": STRING,
                "created_at": TIME,
                "content_type": {
                    "type": "string",
                    "enum": ["image/png", "image/jpeg", "image/webp"],
                },
                "width": INT,
                "height": INT,
            },
            ["id", "filename", "bytes", "purpose", "created_at"],
        ),
        "description": "An uploaded input picture; a job names it by `id` (e.g. params.image).",
    }
}


def add_schemas(schemas: dict[str, Any]) -> None:
    schemas.update(RESPONSE_SCHEMAS)


def paths() -> dict[str, Any]:
    return {
        "/v1/files": {
            "post": {
                "summary": "Upload an input picture (PNG, JPEG or WebP)",
                "operationId": "uploadInputFile",
                "description": "For a generate job's `image` or `mask`. The type is what the "
                "bytes decode as; at most GENQ_INPUT_MAX_BYTES and GENQ_DATASET_MAX_PIXELS.",
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": _object(
                                {"file": {"type": "string", "format": "binary"}}, ["file"]
                            )
                        }
                    },
                },
                "responses": {
                    "201": _json("The stored file.", "InputFile"),
                    "401": UNAUTHORIZED,
                    "413": _problem("Over GENQ_INPUT_MAX_BYTES."),
                    "422": _problem("Not a PNG, JPEG or WebP that decodes, or too many pixels."),
                },
            }
        },
        "/v1/files/{file_id}": {
            "get": {
                "summary": "An uploaded input picture's record",
                "operationId": "getInputFile",
                "parameters": [_path_id("file_id")],
                "responses": {
                    "200": _json("The file.", "InputFile"),
                    "401": UNAUTHORIZED,
                    "404": NOT_FOUND,
                },
            }
        },
    }
