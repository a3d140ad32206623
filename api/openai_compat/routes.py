"""The OpenAI-compatible API under `/openai/v1`: models, chat and text completions (streamed
or not), image generations, and the Batch API over uploaded JSONL files. genq keys are the
bearer tokens; every call is one or more genq jobs, subject to quotas, fair share and
priorities, with their ids in the `X-Genq-Job-Id` header.

These routes answer in OpenAI's shapes, errors included (`api.openai_compat.errors`), and
are not in genq's OpenAPI document (`/v1/openapi.json` describes genq's own API; OpenAI
publishes the description of these).
"""

from __future__ import annotations

from flask import Blueprint, Response

from api.openai_compat import batches, errors, files, images, models, text
from core.errors import GenqError, NotFoundError

bp = Blueprint("openai", __name__, url_prefix="/openai/v1")
for child in (models.bp, text.bp, images.bp, files.bp, batches.bp):
    bp.register_blueprint(child)


@bp.route("/<path:rest>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def unknown(rest: str) -> Response:
    raise NotFoundError(f"no OpenAI-compatible route /openai/v1/{rest}")


bp.register_error_handler(GenqError, errors.render)
bp.register_error_handler(Exception, errors.render)
