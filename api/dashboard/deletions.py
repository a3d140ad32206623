"""The dashboard's delete buttons: a finished job, a model version, a data set. Each goes
through the same functions as the `/v1` DELETE endpoints (api/deletions.py: the same checks,
the same audit entry, with `via: dashboard`), is a POST the session guard has checked for a
CSRF token, and is confirmed in the browser first (the form's `data-confirm`).
"""

from __future__ import annotations

from flask import redirect, request, url_for
from sqlalchemy.orm import Session
from werkzeug.wrappers import Response as BaseResponse

from api.dashboard import bp
from api.dashboard.session import admin
from api.deletions import delete_dataset, delete_job, delete_model
from core.errors import NotFoundError
from core.tables import Model


@bp.post("/jobs/<job_id>/delete")
def delete_job_page(job_id: str) -> BaseResponse:
    delete_job(job_id, None, admin().actor, "dashboard")
    return redirect(url_for("dashboard.jobs"))


def _model(session: Session, model_id: str) -> Model:
    found = session.get(Model, model_id)
    if found is None:
        raise NotFoundError(f"no model {model_id}")
    return found


@bp.post("/models/<model_id>/delete")
def delete_model_page(model_id: str) -> BaseResponse:
    """`force` (a checkbox shown for a version with children): delete it even so."""
    force = request.form.get("force") == "on"
    delete_model(
        lambda session: _model(session, model_id), None, admin().actor, "dashboard", force=force
    )
    return redirect(url_for("dashboard.models"))


@bp.post("/datasets/<dataset_id>/delete")
def delete_dataset_page(dataset_id: str) -> BaseResponse:
    delete_dataset(dataset_id, None, admin().actor, "dashboard")
    return redirect(url_for("dashboard.datasets"))
