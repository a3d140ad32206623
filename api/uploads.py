"""`POST /v1/files`: upload one input picture (PNG, JPEG or WebP) for a job to name by id,
e.g. the `image` or `mask` of an image-to-image or inpainting job; `GET /v1/files/{id}`.

The request is `multipart/form-data` with `file`. The upload may be at most
GENQ_INPUT_MAX_BYTES (413 above it); its type is what its bytes decode as, not its name or
Content-Type (422 naming `file` for anything else), it must fit GENQ_DATASET_MAX_PIXELS and
decode whole. It is kept in the artifact store as an `uploaded_file` row (purpose `input`, the
table OpenAI batch files use) that only its tenant sees.
"""

from __future__ import annotations

import io
import secrets
from typing import Any

from flask import Blueprint, Response, jsonify, request

from api.auth import principal, tenant_scope
from api.payloads import iso
from api.state import genq
from core.errors import InvalidInputError, NotFoundError, PayloadTooLargeError
from core.inputfiles import INPUT_PURPOSE
from core.tables import UploadedFile

bp = Blueprint("uploads", __name__, url_prefix="/v1")

# Pillow's format name -> (content type, file suffix).
FORMATS = {
    "PNG": ("image/png", "png"),
    "JPEG": ("image/jpeg", "jpg"),
    "WEBP": ("image/webp", "webp"),
}


def file_payload(row: UploadedFile, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "id": row.id,
        "filename": row.filename,
        "bytes": row.size_bytes,
        "purpose": row.purpose,
        "created_at": iso(row.created_at),
        **(meta or {}),
    }


def check_picture(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """(content type, width, height) of a PNG, JPEG or WebP that decodes whole; else 422."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in FORMATS:
                raise InvalidInputError.one(
                    "file", f"must be PNG, JPEG or WebP, not {image.format or 'unknown'}"
                )
            width, height = image.size  # from the header: nothing decoded yet
            if width * height > max_pixels:
                raise InvalidInputError.one(
                    "file", f"{width}x{height} is more than {max_pixels} pixels"
                )
            image.load()
            return FORMATS[image.format][0], width, height
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInputError.one("file", f"not a readable picture: {exc}") from None


@bp.post("/files")
def upload_file() -> tuple[Response, int]:
    state = genq()
    limit = state.settings.input_max_bytes
    # Flask answers 413 past this; the form's own fields take a little room.
    request.max_content_length = limit + 64 * 1024
    upload = request.files.get("file")
    if upload is None:
        raise InvalidInputError.one("file", "required (multipart/form-data)")
    data = upload.stream.read(limit + 1)
    if not data:
        raise InvalidInputError.one("file", "is empty")
    if len(data) > limit:
        raise PayloadTooLargeError(f"the file is over {limit} bytes (GENQ_INPUT_MAX_BYTES)")
    content_type, width, height = check_picture(data, state.settings.dataset_max_pixels)
    tenant_id = principal().tenant_id
    file_id = f"file-{secrets.token_hex(12)}"
    suffix = content_type.rsplit("/", 1)[1].replace("jpeg", "jpg")
    path = f"files/{tenant_id}/{file_id}.{suffix}"
    state.artifacts.put_bytes(path, data)
    row = UploadedFile(
        id=file_id,
        tenant_id=tenant_id,
        purpose=INPUT_PURPOSE,
        filename=(upload.filename or f"input.{suffix}")[:255],
        size_bytes=len(data),
        path=path,
    )
    meta = {"content_type": content_type, "width": width, "height": height}
    with state.database.transaction() as session:
        session.add(row)
        session.flush()
        body = file_payload(row, meta)
    return jsonify(body), 201


@bp.get("/files/<file_id>")
def get_file(file_id: str) -> Response:
    with genq().database.read() as session:
        row = session.get(UploadedFile, file_id)
        scope = tenant_scope()
        if (
            row is None
            or row.purpose != INPUT_PURPOSE
            or (scope is not None and row.tenant_id != scope)
        ):
            raise NotFoundError(f"no input file {file_id}")
        return jsonify(file_payload(row))
