"""`/v1/models`, `/v1/datasets` and `/v1/families`: what a job can name.

Models and data sets are those the caller's tenant owns plus the system tenant's built-ins
(all of them for an admin). Families come from the one registry in `workers.registry` (built-in
and plug-in alike), each with the JSON schema of its parameters for every job kind it supports;
a plug-in that failed to load is listed too, `"status": "broken"` with its error.

`POST /v1/models` (admin) registers a pretrained model folder where it lies on the server's
disk (an absolute path; a relative one is under the artifact root), for a family that has a
layout check (`diffusers` pipelines, `transformers` models, plug-ins that define one), so a
self-hoster points genq at the models already downloaded. The API process has no torch: it
checks the folder's layout (the family's `check_layout`: the files a loader needs) and
registers the next version of the name as `checking`; a worker then loads it
(`scheduler/checks.py`) and marks it `ready` or `failed`. Jobs on a model that is not ready
answer 409.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, jsonify
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from api import schemas
from api.auth import principal, tenant_scope
from api.jobs import read_json_body
from api.payloads import dataset_payload, render_models
from api.state import genq
from api.submissions import errors_from
from core.artifactcache import FolderCache
from core.audit import Actor, record_action
from core.catalog import (
    FAILED,
    find_version,
    list_datasets,
    list_models,
    recheck_model,
    register_pretrained,
    set_model_status,
)
from core.errors import ForbiddenError, InvalidInputError, NotFoundError, TransientError
from core.numbers import INT32_MAX, parse_whole
from core.settings import Settings
from core.states import JobKind
from core.tables import SYSTEM_TENANT_ID, Model, Tenant
from workers.families.base import Family
from workers.registry import BROKEN, FAMILIES, REGISTRY, BrokenFamily

bp = Blueprint("catalog", __name__, url_prefix="/v1")

# Model.path's length.
MODEL_PATH_MAX = 1024


@bp.get("/models")
def models() -> Response:
    with genq().database.read() as session:
        items = render_models(session, list_models(session, tenant_scope()))
    return jsonify({"items": items})


class ModelRegistration(BaseModel):
    """The body of `POST /v1/models`."""

    model_config = ConfigDict(extra="forbid", title="ModelRegistration")

    name: str = Field(
        ...,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="The model name jobs use; registering it again adds the next version.",
    )
    family: str = Field(
        ...,
        max_length=64,
        description="A family whose models are folders: `diffusers` (a text-to-image pipeline),"
        " `transformers` (a causal LM), or a plug-in family with a layout check.",
    )
    path: str = Field(
        ...,
        min_length=1,
        max_length=MODEL_PATH_MAX,
        description="The folder on the server: absolute, or relative to the artifact root.",
    )
    description: str = Field("", max_length=2000)
    tenant: str | None = Field(
        None,
        max_length=128,
        description="The tenant (id or name) that owns it. Unset: every tenant sees it.",
    )


def registrable(name: str) -> Family:
    """The family a folder may be registered for; 422 naming `family` otherwise."""
    family = FAMILIES.get(name)
    if family is None or family.check_layout is None:
        known = ", ".join(sorted(n for n, f in FAMILIES.items() if f.check_layout is not None))
        detail = f"family {name!r} is broken: {BROKEN[name].error}" if name in BROKEN else ""
        raise InvalidInputError.one(
            "family", detail or f"not a family whose models are folders (one of: {known})"
        )
    return family


def pretrained_folder(settings: Settings, given: str) -> tuple[Path, str]:
    """(the folder on this machine, what Model.path stores): an absolute path as it is
    (inside one of GENQ_PRETRAINED_ROOTS when set), an `s3://bucket/folder` URL or a path
    relative to the artifact store (downloaded into this machine's cache to check it); 422
    naming `path` for a folder that is not there or not allowed."""
    if Path(given).is_absolute():
        folder = Path(given).resolve()
        roots = settings.pretrained_root_paths
        if roots and not any(folder.is_relative_to(root) for root in roots):
            raise InvalidInputError.one(
                "path", "not under a folder GENQ_PRETRAINED_ROOTS allows models from"
            )
        stored = str(folder)
    elif given.startswith("s3://") or not genq().artifacts.is_local:
        try:
            folder = FolderCache(settings.cache_path).model_folder(genq().artifacts, given)
        except ValueError as exc:
            raise InvalidInputError.one("path", str(exc)) from None
        except Exception as exc:  # nothing there, no access, no endpoint
            raise InvalidInputError.one(
                "path", f"cannot be read from object storage: {type(exc).__name__}: {exc}"
            ) from None
        stored = given
    else:
        store = genq().artifacts
        try:
            folder = store.resolve(given)
        except ValueError:
            raise InvalidInputError.one("path", "escapes the artifact root") from None
        stored = str(folder.relative_to(store.root))
    try:
        is_folder = folder.is_dir()
    except OSError as exc:  # a name too long for the file system, a folder it may not read
        raise InvalidInputError.one(
            "path", f"cannot be read on the server: {exc.strerror}"
        ) from None
    if not is_folder:
        raise InvalidInputError.one("path", f"{folder} is not a folder on the server")
    if len(stored) > MODEL_PATH_MAX:  # a symlink may resolve to a longer path than was given
        raise InvalidInputError.one("path", f"resolves to more than {MODEL_PATH_MAX} characters")
    return folder, stored


def check_layout(family: str, folder: Path) -> dict[str, Any]:
    """The family's layout check of `folder` (422 naming `path` for what it refuses), with a
    file it cannot read refused the same way."""
    check = registrable(family).check_layout
    assert check is not None
    try:
        return check(folder)
    except OSError as exc:
        raise InvalidInputError.one("path", f"cannot be read on the server: {exc}") from None


def _owner(session: Session, ref: str | None) -> str:
    if ref is None:
        return SYSTEM_TENANT_ID
    tenant = session.scalar(select(Tenant).where(or_(Tenant.id == ref, Tenant.name == ref)))
    if tenant is None:
        raise InvalidInputError.one("tenant", f"no tenant {ref!r}")
    return str(tenant.id)


@bp.post("/models")
def register_model() -> tuple[Response, int, dict[str, str]]:
    """Register a pretrained folder (admin): 202 with the model, `checking` until a worker
    has loaded it."""
    if not principal().is_admin:
        raise ForbiddenError("registering a model needs an admin key")
    try:
        body = ModelRegistration.model_validate(read_json_body())
    except ValidationError as exc:
        raise InvalidInputError(errors_from(exc)) from None
    app = genq()
    registrable(body.family)
    folder, stored = pretrained_folder(app.settings, body.path)
    layout = check_layout(body.family, folder)
    config = {"source": "pretrained", "description": body.description, **layout}
    with app.database.transaction() as session:
        model = register_pretrained(
            session,
            tenant_id=_owner(session, body.tenant),
            name=body.name,
            family=body.family,
            path=stored,
            config=config,
        )
        record_action(
            session,
            Actor.of_key(session, principal().key_id),
            "model.register",
            "model",
            model.id,
            {"ref": model.ref, "family": body.family, "path": stored},
        )
        model_id = model.id
    return _checking(model_id, body.name)


def _checking(model_id: str, name: str) -> tuple[Response, int, dict[str, str]]:
    """Publish the model's check; 202 with the model, or 503 (and the model failed) when the
    broker does not take the message."""
    app = genq()
    if not app.publisher.publish_model_check(model_id):
        with app.database.transaction() as session:
            set_model_status(session, model_id, FAILED, "the broker did not take the check")
        raise TransientError("the broker did not take the model check; check it again")
    with app.database.transaction() as session:
        (payload,) = render_models(session, [session.get_one(Model, model_id)])
    return jsonify(payload), 202, {"Location": f"/v1/models/{name}"}


@bp.post("/models/<name>/<version>/check")
def check_model_again(name: str, version: str) -> tuple[Response, int, dict[str, str]]:
    """Check a registered pretrained folder again (admin): after fixing a folder that failed,
    or when a check never came back. The layout is checked again first."""
    if not principal().is_admin:
        raise ForbiddenError("checking a model needs an admin key")
    number = parse_whole(version, minimum=1, maximum=INT32_MAX)
    if number is None:
        raise NotFoundError(f"no model {name}:{version}")
    app = genq()
    with app.database.transaction() as session:
        model = find_version(session, tenant_scope(), name, number)
        recheck_model(session, model)
        folder = pretrained_folder(app.settings, model.path or "")[0]
        layout = check_layout(model.family, folder)
        model.config = {**(model.config or {}), **layout}
        record_action(
            session,
            Actor.of_key(session, principal().key_id),
            "model.check",
            "model",
            model.id,
            {"ref": model.ref},
        )
        model_id = model.id
    return _checking(model_id, name)


@bp.get("/models/<name>")
def model_versions(name: str) -> Response:
    """Every version of `name` the caller sees, oldest first."""
    with genq().database.read() as session:
        found = list_models(session, tenant_scope(), name)
        if not found:
            raise NotFoundError(f"no model {name!r}")
        items = render_models(session, found)
    return jsonify({"items": items})


@bp.get("/datasets")
def datasets() -> Response:
    with genq().database.read() as session:
        items = [dataset_payload(d) for d in list_datasets(session, tenant_scope())]
    return jsonify({"items": items})


def family_payload(family: Family) -> schemas.Family:
    params: dict[str, Any] = {}
    for kind in JobKind:
        spec = family.params_for(kind)
        if spec is not None:
            params[str(kind)] = spec.model_json_schema()
    return {
        "name": family.name,
        "status": "ok",
        "source": REGISTRY.sources.get(family.name, ""),
        "api_version": family.api_version,
        "description": family.description,
        "kinds": list(params),
        "dataset_kinds": list(family.dataset_kinds),
        "resources": asdict(family.resources),
        "registers_folders": family.check_layout is not None,
        "params": params,
    }


def broken_payload(broken: BrokenFamily) -> schemas.Family:
    return {
        "name": broken.name,
        "status": "broken",
        "source": broken.source,
        "error": broken.error,
    }


@bp.get("/families")
def families() -> Response:
    """Every family genq loaded, then every one it found but could not load."""
    items = [family_payload(f) for f in FAMILIES.values()]
    items += [broken_payload(b) for b in BROKEN.values()]
    return jsonify({"items": items})
