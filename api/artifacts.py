"""`GET /v1/artifacts/{id}`: download one output file, addressed by its id (never by a path).

The file is streamed from the artifact store with its content type, length, an ETag (its
SHA-256, so conditional requests work) and `Content-Disposition: inline` with its name.
"""

from __future__ import annotations

from flask import Blueprint, Response, send_file
from sqlalchemy import select

from api.app import genq
from api.auth import tenant_scope
from core.errors import NotFoundError
from core.tables import Artifact

bp = Blueprint("artifacts", __name__, url_prefix="/v1/artifacts")


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
    path = state.artifacts.resolve(artifact.path)
    if not path.is_file():  # removed by retention, or the store is not mounted here
        raise NotFoundError(f"the file of artifact {artifact_id} is gone")
    response = send_file(
        path,
        mimetype=artifact.content_type,
        as_attachment=False,
        download_name=artifact.name,
        etag=artifact.sha256,
        conditional=True,
        max_age=3600,
    )
    # Outputs never change once written, but they are a tenant's own: keep them private.
    response.headers["Cache-Control"] = "private, max-age=3600"
    return with_stored_type(response, artifact.content_type)


def with_stored_type(response: Response, content_type: str) -> Response:
    """The artifact's own content type, as stored: werkzeug would append a second
    `charset` to a `text/...; charset=utf-8` one. A browser must not guess another type."""
    response.headers["Content-Type"] = content_type
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
