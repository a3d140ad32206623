"""The OpenAPI entries of deletion (api/deletions.py) and of what the tenants API says about
retention and disk use. `api.openapi.document` merges the DELETE operations into the paths
that already hold the same objects' GET and PATCH.
"""

from __future__ import annotations

from typing import Any

from api.openapi import INT, NOT_FOUND, UNAUTHORIZED, _nullable, _object, _path_id, _problem
from core.numbers import INT32_MAX

DAYS = _nullable({"type": "integer", "minimum": 1})
OWN_DAYS = _nullable({"type": "integer", "minimum": 0})

RESPONSE_SCHEMAS: dict[str, Any] = {
    "TenantRetention": {
        **_object(
            {
                "outputs_days": DAYS,
                "events_days": DAYS,
                "jobs_days": DAYS,
                "own": _object(
                    {"outputs_days": OWN_DAYS, "events_days": OWN_DAYS, "jobs_days": OWN_DAYS}
                ),
            }
        ),
        "description": "Days each is kept after a job finishes (null: forever), and the"
        " tenant's own setting (null: the default; 0: forever).",
    },
    "DiskUse": _object({"outputs_bytes": INT, "datasets_bytes": INT, "models_bytes": INT}),
}

DELETED = {"description": "Deleted."}
FORBIDDEN = _problem("A built-in every tenant shares: only an admin key may delete it.")


def add_schemas(schemas: dict[str, Any]) -> None:
    schemas.update(RESPONSE_SCHEMAS)


def _delete(
    summary: str,
    operation_id: str,
    parameters: list[dict[str, Any]],
    conflict: str,
    description: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "summary": summary,
        "description": description,
        "operationId": operation_id,
        "parameters": parameters,
        "responses": {
            "204": DELETED,
            "401": UNAUTHORIZED,
            "404": NOT_FOUND,
            "409": _problem(conflict),
            **(extra or {}),
        },
    }


def add_paths(paths: dict[str, Any]) -> dict[str, Any]:
    """Add the DELETE operations to `paths` (in place) and return it."""
    version = {
        "name": "version",
        "in": "path",
        "required": True,
        "schema": {"type": "integer", "minimum": 1, "maximum": INT32_MAX},
    }
    force = {
        "name": "force",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "enum": ["true", "false", "1", "0", "yes", "no"]},
        "description": "Delete a version other versions were fine-tuned from: they are kept,"
        " without their parent link.",
    }
    operations = {
        "/v1/jobs/{job_id}": _delete(
            "Delete a finished job with its events and outputs",
            "deleteJob",
            [_path_id("job_id")],
            "The job has not finished: cancel it first.",
            "The row, its events, webhook messages, outputs, checkpoints and a model folder"
            " no registered version loads from. Audited.",
        ),
        "/v1/artifacts/{artifact_id}": _delete(
            "Delete one output of a finished job",
            "deleteArtifact",
            [_path_id("artifact_id")],
            "Its job has not finished.",
            "The file and its row. Audited.",
        ),
        "/v1/models/{name}/{version}": _delete(
            "Delete a model version",
            "deleteModelVersion",
            [_path_id("name"), version, force],
            "A waiting or running job uses it (`job_ids`), other versions were fine-tuned from"
            " it (`children`; send force=true), or it is built in.",
            "Its row, then its weights when they are in the artifact store and no other"
            " version loads them (a folder registered from elsewhere is left alone). Finished"
            " jobs that used or trained it keep their rows without the link. Audited.",
            {"403": FORBIDDEN},
        ),
        "/v1/datasets/{dataset_id}": _delete(
            "Delete a data set",
            "deleteDataset",
            [_path_id("dataset_id")],
            "A waiting or running job trains on it (`job_ids`), or it is built in.",
            "Its row, then its files. Finished jobs and versions trained on it keep their"
            " rows without the link. Audited.",
            {"403": FORBIDDEN},
        ),
    }
    for path, operation in operations.items():
        paths.setdefault(path, {})["delete"] = operation
    return paths
