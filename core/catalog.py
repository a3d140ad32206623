"""The model registry and data sets: resolving what a job names, registering what a training
job made, and the built-in entries every tenant sees (owned by the system tenant)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, func, or_, select
from sqlalchemy.orm import Session

from core.errors import ConflictError, NotFoundError
from core.ids import new_id
from core.keys import ensure_system_tenant
from core.numbers import INT32_MAX, parse_whole
from core.tables import SYSTEM_TENANT_ID, Dataset, Model

# Model.status values: a pretrained folder registered by an admin is CHECKING until a worker
# has loaded it; jobs may use only READY models.
CHECKING, READY, FAILED = "checking", "ready", "failed"
# name -> (family, kind) of what `ensure_builtins` creates.
BUILTIN_MODELS = {"echo": "echo"}
BUILTIN_DATASETS = {"digits": "images", "pydocs": "text"}


def _visible(tenant_id: str | None, column: Any) -> Any:
    """A tenant sees its own rows and the system tenant's; tenant_id None (admin) sees all."""
    if tenant_id is None:
        return True
    return or_(column == tenant_id, column == SYSTEM_TENANT_ID)


def parse_model_ref(ref: str) -> tuple[str, int | None]:
    """`name` or `name:version` -> (name, version or None for the latest)."""
    name, sep, version = ref.partition(":")
    if not name:
        raise NotFoundError(f"no model {ref!r}")
    if not sep:
        return name, None
    number = parse_whole(version, minimum=1, maximum=INT32_MAX)
    if number is None:
        raise NotFoundError(f"no model {ref!r}: a version is a positive number")
    return name, number


def _model_lookup(*, of_tenant: bool, versioned: bool) -> Any:
    stmt = select(Model).where(Model.name == bindparam("name"))
    if of_tenant:
        # As _visible: the tenant's own models and the system tenant's.
        stmt = stmt.where(
            or_(Model.tenant_id == bindparam("tenant_id"), Model.tenant_id == SYSTEM_TENANT_ID)
        )
    if versioned:
        stmt = stmt.where(Model.version == bindparam("version"))
    own_first = (Model.tenant_id == SYSTEM_TENANT_ID).asc()
    return stmt.order_by(own_first, Model.version.desc()).limit(1)


# Built once (every submission resolves a model): (tenant given, version given) -> statement.
_MODEL_LOOKUPS = {
    (of_tenant, versioned): _model_lookup(of_tenant=of_tenant, versioned=versioned)
    for of_tenant in (False, True)
    for versioned in (False, True)
}


def resolve_model(session: Session, tenant_id: str | None, ref: str) -> Model:
    """The model version `ref` names that the tenant may use; the tenant's own model wins over
    a built-in one of the same name."""
    name, version = parse_model_ref(ref)
    stmt = _MODEL_LOOKUPS[(tenant_id is not None, version is not None)]
    model = session.scalar(stmt, {"name": name, "tenant_id": tenant_id, "version": version})
    if model is None:
        raise NotFoundError(f"no model {ref!r}")
    if model.status != READY:
        detail = f": {model.status_detail}" if model.status_detail else ""
        raise ConflictError(
            f"model {model.ref} is {model.status}, not ready{detail}",
            model=model.ref,
            model_status=model.status,
        )
    return model


def list_models(session: Session, tenant_id: str | None, name: str | None = None) -> list[Model]:
    stmt = select(Model).where(_visible(tenant_id, Model.tenant_id))
    if name is not None:
        stmt = stmt.where(Model.name == name)
    return list(session.scalars(stmt.order_by(Model.name, Model.version)).all())


def register_model(
    session: Session,
    *,
    tenant_id: str,
    name: str,
    family: str,
    path: str | None,
    config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    dataset_id: str | None = None,
    parent_id: str | None = None,
    job_id: str | None = None,
) -> Model:
    """Register the next version of `name` for the tenant."""
    latest = session.scalar(
        select(func.max(Model.version)).where(Model.tenant_id == tenant_id, Model.name == name)
    )
    model = Model(
        id=new_id(),
        tenant_id=tenant_id,
        name=name,
        version=(latest or 0) + 1,
        family=family,
        path=path,
        config=config or {},
        metrics=metrics or {},
        dataset_id=dataset_id,
        parent_id=parent_id,
        job_id=job_id,
    )
    session.add(model)
    session.flush()
    return model


def register_pretrained(
    session: Session,
    *,
    tenant_id: str,
    name: str,
    family: str,
    path: str,
    config: dict[str, Any],
) -> Model:
    """The next version of `name`, for a pretrained folder a worker has yet to load (status
    CHECKING). A name already used by another family is refused: `name` would stop meaning
    one kind of model."""
    other = session.scalar(
        select(Model.family).where(
            Model.tenant_id == tenant_id, Model.name == name, Model.family != family
        )
    )
    if other is not None:
        raise ConflictError(f"model {name!r} is a {other} model; pick another name")
    model = register_model(
        session, tenant_id=tenant_id, name=name, family=family, path=path, config=config
    )
    model.status = CHECKING
    session.flush()
    return model


def set_model_status(session: Session, model_id: str, status: str, detail: str | None) -> bool:
    """Record a check's outcome; False if the model is gone or no longer being checked."""
    model = session.get(Model, model_id)
    if model is None or model.status != CHECKING:
        return False
    model.status = status
    model.status_detail = detail
    return True


def find_version(session: Session, tenant_id: str | None, name: str, version: int) -> Model:
    """One version the caller sees, whatever its status. For an admin (tenant_id None) the
    system tenant's wins; two other tenants' versions of the same ref are a 409."""
    stmt = select(Model).where(
        Model.name == name, Model.version == version, _visible(tenant_id, Model.tenant_id)
    )
    found = list(session.scalars(stmt.order_by((Model.tenant_id != SYSTEM_TENANT_ID).asc())))
    if not found:
        raise NotFoundError(f"no model {name}:{version}")
    if len(found) > 1 and found[0].tenant_id != SYSTEM_TENANT_ID:
        raise ConflictError(f"several tenants have a model {name}:{version}")
    return found[0]


def recheck_model(session: Session, model: Model) -> None:
    """Send a registered pretrained model back to CHECKING (after its folder was fixed, or a
    check message was lost). A ready model is refused: its warm servers keep what they loaded."""
    if (model.config or {}).get("source") != "pretrained":
        raise ConflictError(f"model {model.ref} was trained here, not registered from a folder")
    if model.status == READY:
        raise ConflictError(f"model {model.ref} is ready; register the folder again instead")
    model.status = CHECKING
    model.status_detail = None


def resolve_dataset(session: Session, tenant_id: str | None, ref: str) -> Dataset:
    """A data set by id or by name; the tenant's own wins over a built-in of the same name."""
    stmt = select(Dataset).where(
        or_(Dataset.id == ref, Dataset.name == ref), _visible(tenant_id, Dataset.tenant_id)
    )
    dataset = session.scalar(stmt.order_by((Dataset.tenant_id == SYSTEM_TENANT_ID).asc()).limit(1))
    if dataset is None:
        raise NotFoundError(f"no data set {ref!r}")
    return dataset


def list_datasets(session: Session, tenant_id: str | None) -> list[Dataset]:
    stmt = select(Dataset).where(_visible(tenant_id, Dataset.tenant_id))
    return list(session.scalars(stmt.order_by(Dataset.name)).all())


def ensure_builtins(session: Session) -> None:
    """Create the system tenant, the built-in models and the built-in data sets if missing."""
    ensure_system_tenant(session)
    for name, family in BUILTIN_MODELS.items():
        exists = session.scalar(
            select(Model.id).where(Model.tenant_id == SYSTEM_TENANT_ID, Model.name == name)
        )
        if exists is None:
            session.add(
                Model(
                    id=new_id(),
                    tenant_id=SYSTEM_TENANT_ID,
                    name=name,
                    version=1,
                    family=family,
                    path=None,
                )
            )
    for name, kind in BUILTIN_DATASETS.items():
        exists = session.scalar(
            select(Dataset.id).where(Dataset.tenant_id == SYSTEM_TENANT_ID, Dataset.name == name)
        )
        if exists is None:
            session.add(
                Dataset(
                    id=new_id(),
                    tenant_id=SYSTEM_TENANT_ID,
                    name=name,
                    kind=kind,
                    path=None,
                    meta={"builtin": True},
                )
            )
    session.flush()
