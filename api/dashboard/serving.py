"""The dashboard's models page: every model version with its replicas (node, GPU, jobs in hand,
batch sizes, load time, as the model pool reports them through the workers' snapshots), its
queue (queued and running generate jobs), its replica policy with a form to change it, and the
pool's recent scale events. The form goes through the same checks as
`PATCH /v1/models/{name}/{version}` (core/scaling.py) and writes its audit row in the same
transaction.
"""

from __future__ import annotations

from typing import Any

from flask import redirect, render_template, request, url_for
from pydantic import ValidationError
from sqlalchemy import func, select
from werkzeug.wrappers import Response as BaseResponse

from api.dashboard import bp
from api.dashboard.pages import cluster, ray_view_of
from api.dashboard.session import admin
from api.payloads import scaling_payload
from api.state import genq
from api.submissions import errors_from
from core.audit import record_action
from core.errors import InvalidInputError, NotFoundError
from core.numbers import parse_whole
from core.scaling import POLICY_FIELDS, PolicyChange, check_policy, model_policy
from core.states import JobKind, JobState
from core.tables import Artifact, Dataset, Job, Model, Tenant
from workers.registry import BROKEN, FAMILIES, REGISTRY, get_family

INT_FIELDS = ("min_replicas", "max_replicas")


def model_queues(db: Any) -> dict[str, dict[str, int]]:
    """Each model's queued and running generate jobs."""
    rows = db.execute(
        select(Job.model_id, Job.state, func.count())
        .where(
            Job.kind == JobKind.GENERATE,
            Job.state.in_([JobState.QUEUED, JobState.RUNNING]),
            Job.model_id.is_not(None),
        )
        .group_by(Job.model_id, Job.state)
    ).all()
    queues: dict[str, dict[str, int]] = {}
    for model_id, state, count in rows:
        queues.setdefault(model_id, {"queued": 0, "running": 0})[str(state)] = int(count)
    return queues


@bp.get("/models")
def models() -> str:
    snapshots, cluster_error = cluster()
    pool = ray_view_of(snapshots)["pool"]
    with genq().database.transaction() as db:
        rows = list(db.scalars(select(Model).order_by(Model.name, Model.version.desc())))
        by_id = {m.id: m for m in rows}
        datasets = {d.id: d.name for d in db.scalars(select(Dataset))}
        tenants = dict(db.execute(select(Tenant.id, Tenant.name)).all())
        queues = model_queues(db)
        policies = {m.id: scaling_payload(m) for m in rows}
        job_ids = [m.job_id for m in rows if m.job_id]
        grids: dict[str, Artifact] = {}
        if job_ids:
            for a in db.scalars(
                select(Artifact)
                .where(Artifact.job_id.in_(job_ids), Artifact.kind == "grid")
                .order_by(Artifact.created_at)
            ):
                grids[a.job_id] = a  # the last grid a training job saved
    replicas: dict[str, list[dict[str, Any]]] = {}
    for server in pool.get("servers", []):
        replicas.setdefault(server["model_id"], []).append(server)
    events = list(reversed(pool.get("events", [])))[:30]
    return render_template(
        "dashboard/models.html",
        families=family_rows(),
        models=rows,
        by_id=by_id,
        datasets=datasets,
        tenants=tenants,
        grids=grids,
        replicas=replicas,
        queues=queues,
        policies=policies,
        events=events,
        cluster_error=cluster_error,
        fields=POLICY_FIELDS,
    )


def family_rows() -> list[dict[str, Any]]:
    """Every family this API process loaded, then those it found broken (a plug-in that fails
    to import, declares another interface version or fails the checks), with the error."""
    rows: list[dict[str, Any]] = [
        {
            "name": f.name,
            "status": "ok",
            "source": REGISTRY.sources.get(f.name, ""),
            "kinds": [str(k) for k in JobKind if f.params_for(k) is not None],
            "description": f.description,
        }
        for f in FAMILIES.values()
    ]
    rows += [
        {"name": b.name, "status": "broken", "source": b.source, "kinds": [], "error": b.error}
        for b in BROKEN.values()
    ]
    return rows


def _policy_form() -> dict[str, Any]:
    """The policy form as a PolicyChange: an empty field goes back to the family's default."""
    raw: dict[str, Any] = {}
    for name in POLICY_FIELDS:
        value = request.form.get(name, "").strip()
        if not value:
            raw[name] = None
        elif name in INT_FIELDS:
            number = parse_whole(value, maximum=10_000)
            if number is None:
                raise InvalidInputError.one(name, "must be a whole number")
            raw[name] = number
        else:
            try:
                raw[name] = float(value)
            except ValueError:
                raise InvalidInputError.one(name, "must be a number") from None
    try:
        return PolicyChange.model_validate(raw).model_dump(exclude_unset=True)
    except ValidationError as exc:
        raise InvalidInputError(errors_from(exc)) from None


@bp.post("/models/<model_id>/scaling")
def model_scaling(model_id: str) -> BaseResponse:
    sent = _policy_form()
    with genq().database.transaction() as db:
        model = db.scalar(select(Model).where(Model.id == model_id).with_for_update())
        if model is None:
            raise NotFoundError(f"no model {model_id}")
        before = dict(model.serving or {})
        after = {k: v for k, v in sent.items() if v is not None}
        policy = model_policy(get_family(model.family).scaling.as_dict(), after, genq().settings)
        errors = check_policy(policy)
        if errors:
            raise InvalidInputError(errors)
        model.serving = after or None
        record_action(
            db,
            admin().actor,
            "model.scaling",
            "model",
            model.id,
            {"ref": model.ref, "from": before, "to": after, "via": "dashboard"},
        )
    return redirect(url_for("dashboard.models") + f"#model-{model_id}")
