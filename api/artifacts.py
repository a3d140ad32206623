"""`GET /v1/artifacts/{id}`: download one output file, addressed by its id (never by a path).

The file comes from the artifact store with its content type, length, an ETag (its SHA-256,
so conditional requests work), `Accept-Ranges: bytes` and `Content-Disposition: inline` with
its name. A local store's file is sent by Flask; an object in S3-compatible storage is streamed
through in chunks (never held whole), one byte range when asked, or, with
GENQ_ARTIFACT_REDIRECT=true, answered with a 307 to a presigned URL valid for
GENQ_ARTIFACT_REDIRECT_TTL_S, so that the bytes do not pass through the API at all. The
dashboard's image views use the same `send_artifact`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from flask import Blueprint, Response, request, send_file
from sqlalchemy import select

from api.auth import tenant_scope
from api.state import genq
from core.errors import NotFoundError
from core.objectstore import CHUNK_BYTES
from core.tables import Artifact

bp = Blueprint("artifacts", __name__, url_prefix="/v1/artifacts")

# Outputs never change once written, but they are a tenant's own: keep them private.
CACHE_CONTROL = "private, max-age=3600"


@bp.get("/<artifact_id>")
def download(artifact_id: str) -> Response:
    state = genq()
    stmt = select(Artifact).where(Artifact.id == artifact_id)
    scope = tenant_scope()
    if scope is not None:
        stmt = stmt.where(Artifact.tenant_id == scope)
    with state.database.read() as session:
        artifact = session.scalar(stmt)
    if artifact is None:
        raise NotFoundError(f"no artifact {artifact_id}")
    return send_artifact(artifact, allow_redirect=True)


def send_artifact(artifact: Artifact, *, allow_redirect: bool) -> Response:
    """The response carrying an artifact's bytes (see the module docstring); 404 when its
    file is gone (removed by retention, or never stored here)."""
    state = genq()
    store = state.artifacts
    gone = NotFoundError(f"the file of artifact {artifact.id} is gone")
    local = store.local_path(artifact.path)
    if local is not None:
        if not local.is_file():
            raise gone
        response = send_file(
            local,
            mimetype=artifact.content_type,
            as_attachment=False,
            download_name=artifact.name,
            etag=artifact.sha256,
            conditional=True,
            max_age=3600,
        )
        response.headers["Cache-Control"] = CACHE_CONTROL
        return with_stored_type(response, artifact.content_type)
    if allow_redirect and state.settings.artifact_redirect:
        url = store.presigned_url(
            artifact.path,
            state.settings.artifact_redirect_ttl_s,
            filename=artifact.name,
            content_type=artifact.content_type,
        )
        assert url is not None  # object storage presigns
        moved = Response(status=307, headers={"Location": url})
        moved.headers["Cache-Control"] = "private, no-store"  # the URL expires
        return moved
    return _stream(artifact, gone)


def _stream(artifact: Artifact, gone: NotFoundError) -> Response:
    etag = f'"{artifact.sha256}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Cache-Control": CACHE_CONTROL,
        "Content-Disposition": f'inline; filename="{artifact.name}"',
    }
    if request.if_none_match.contains(artifact.sha256):
        return Response(status=304, headers=headers)
    size = artifact.size_bytes
    start, stop, status = 0, size, 200
    wanted = request.range
    if wanted is not None and (not request.if_range.etag or request.if_range.etag == etag):
        span = wanted.range_for_length(size) if wanted.units == "bytes" else None
        if span is None:
            headers["Content-Range"] = f"bytes */{size}"
            return Response(status=416, headers=headers)
        start, stop, status = span[0], span[1], 206
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    try:
        if status == 206:
            body = genq().artifacts.open_range(artifact.path, start, stop - 1)
        else:
            body = genq().artifacts.open(artifact.path)
    except FileNotFoundError:
        raise gone from None
    headers["Content-Length"] = str(stop - start)
    response = Response(
        _chunks(body, stop - start),
        status=status,
        mimetype=artifact.content_type,
        headers=headers,
        direct_passthrough=True,
    )
    return with_stored_type(response, artifact.content_type)


def with_stored_type(response: Response, content_type: str) -> Response:
    """The artifact's own content type, as stored: werkzeug would append a second
    `charset` to a `text/...; charset=utf-8` one. A browser must not guess another type."""
    response.headers["Content-Type"] = content_type
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def _chunks(body: BinaryIO, length: int) -> Iterator[bytes]:
    """At most `length` bytes of `body`, a chunk at a time; closes it however it ends."""
    try:
        left = length
        while left > 0:
            chunk = body.read(min(CHUNK_BYTES, left))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk
    finally:
        body.close()
