"""`/openai/v1/files`: the files of the OpenAI Batch API. An uploaded file (`purpose` `batch`:
JSONL request lines) is kept in the artifact store; a batch's output and error files are not
stored but written from its jobs when read (`file-batch_<id>-output`, `-errors`), so they
always show the jobs as they are.
"""

from __future__ import annotations

import secrets
from typing import Any

from flask import Blueprint, Response, jsonify, request
from sqlalchemy import select

from api.auth import principal, tenant_scope
from api.openai_compat.batch_results import batch_file
from api.state import genq
from core.errors import InvalidInputError, NotFoundError
from core.tables import UploadedFile

bp = Blueprint("files", __name__)

PURPOSES = ("batch",)


def file_object(row: UploadedFile) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.size_bytes,
        "created_at": int(row.created_at.timestamp()),
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


def find_file(file_id: str) -> UploadedFile:
    with genq().database.read() as session:
        row = session.get(UploadedFile, file_id)
        scope = tenant_scope()
        if row is None or (scope is not None and row.tenant_id != scope):
            raise NotFoundError(f"no file {file_id}")
        session.expunge(row)
    return row


def read_file(row: UploadedFile) -> bytes:
    with genq().artifacts.open(row.path) as f:  # at most openai_file_max_bytes
        return f.read()


@bp.post("/files")
def upload() -> tuple[Response, int]:
    state = genq()
    request.max_content_length = state.settings.openai_file_max_bytes
    purpose = request.form.get("purpose", "")
    if purpose not in PURPOSES:
        raise InvalidInputError.one("purpose", "must be batch (the only purpose genq keeps)")
    upload = request.files.get("file")
    if upload is None:
        raise InvalidInputError.one("file", "required (multipart/form-data)")
    data = upload.read()
    if not data:
        raise InvalidInputError.one("file", "is empty")
    tenant_id = principal().tenant_id
    file_id = f"file-{secrets.token_hex(12)}"
    path = f"files/{tenant_id}/{file_id}.jsonl"
    state.artifacts.put_bytes(path, data)
    row = UploadedFile(
        id=file_id,
        tenant_id=tenant_id,
        purpose=purpose,
        filename=(upload.filename or "input.jsonl")[:255],
        size_bytes=len(data),
        path=path,
    )
    with state.database.transaction() as session:
        session.add(row)
        session.flush()
        body = file_object(row)
    return jsonify(body), 200


@bp.get("/files")
def list_files() -> Response:
    stmt = select(UploadedFile).order_by(UploadedFile.created_at.desc())
    scope = tenant_scope()
    if scope is not None:
        stmt = stmt.where(UploadedFile.tenant_id == scope)
    with genq().database.read() as session:
        rows = [file_object(r) for r in session.scalars(stmt.limit(10_000))]
    return jsonify({"object": "list", "data": rows, "has_more": False})


@bp.get("/files/<file_id>")
def retrieve(file_id: str) -> Response:
    made = batch_file(file_id)
    if made is not None:
        text, created = made
        return jsonify(
            {
                "id": file_id,
                "object": "file",
                "bytes": len(text.encode()),
                "created_at": created,
                "filename": f"{file_id}.jsonl",
                "purpose": "batch_output",
                "status": "processed",
                "expires_at": None,
                "status_details": None,
            }
        )
    return jsonify(file_object(find_file(file_id)))


@bp.get("/files/<file_id>/content")
def content(file_id: str) -> Response:
    made = batch_file(file_id)
    if made is not None:
        return Response(made[0], mimetype="application/jsonl")
    return Response(read_file(find_file(file_id)), mimetype="application/jsonl")


@bp.delete("/files/<file_id>")
def delete(file_id: str) -> Response:
    row = find_file(file_id)
    with genq().database.transaction() as session:
        found = session.get(UploadedFile, row.id)
        if found is not None:
            session.delete(found)
    genq().artifacts.delete(row.path)
    return jsonify({"id": file_id, "object": "file", "deleted": True})
