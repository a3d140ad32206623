"""`DELETE /v1/jobs/{id}`, `/v1/artifacts/{id}`, `/v1/models/{name}/{version}` and
`/v1/datasets/{id}`: deleting what a tenant stored (core/deletion.py says what goes, in which
order, and what is never deleted).

A tenant deletes only its own (another tenant's id is a 404, a built-in it sees a 403); an
admin key deletes any. Each deletion is audited (`job.delete`, `artifact.delete`,
`model.delete`, `dataset.delete`, with the files and bytes freed), counted in
`retention_counter` (source `api`) and answered 204. The dashboard's delete buttons call the
same functions with the admin's actor.

Refused with 409: a job that has not finished (cancel it first), an output of such a job, a
model version or data set that a waiting or running job uses, a version that other versions
were fine-tuned from unless `?force=true` (the children are kept, without their parent link),
and built-in models and data sets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flask import Blueprint, request
from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api import polling
from api.auth import principal, tenant_scope
from api.state import genq
from core.audit import Actor, record_action
from core.catalog import find_version
from core.deletion import (
    API,
    FINISHED,
    Freed,
    add_counters,
    check_job_deletable,
    check_owner,
    delete_dataset_rows,
    delete_job_rows,
    delete_model_rows,
    free_job_files,
    free_prefix,
    kept_folders,
)
from core.errors import ConflictError, InvalidInputError, NotFoundError
from core.numbers import INT32_MAX, parse_whole
from core.tables import SYSTEM_TENANT_ID, Artifact, Dataset, Job, Model, utcnow

log = logging.getLogger(__name__)

bp = Blueprint("deletions", __name__, url_prefix="/v1")

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _audit(
    actor: Actor, action: str, kind: str, target: str, freed: Freed, **detail: object
) -> None:
    with genq().database.transaction() as session:
        record_action(session, actor, action, kind, target, {**detail, **freed.as_dict()})
        add_counters(session, API, freed)


def delete_job(job_id: str, scope: str | None, actor: Actor, via: str) -> Freed:
    """A finished job: its files, then its rows (events, outputs, webhook messages)."""
    app = genq()
    with app.database.read() as session:
        job = find_job_in(session, job_id, scope)
        check_job_deletable(job)
        tenant_id = job.tenant_id
        kept = kept_folders(session, app.artifacts, [job_id])
    freed = free_job_files(app.artifacts, [(job_id, tenant_id)], kept)
    with app.database.transaction() as session:
        job = find_job_in(session, job_id, scope, lock=True)
        check_job_deletable(job)  # (retried while its files went: it starts afresh)
        freed.add(delete_job_rows(session, [job_id]))
    # A poll of it answers 404 from now on, not a kept document (api/polling.py).
    polling.changed(job_id, version=polling.version_of(utcnow()), tenant_id=tenant_id, payload=None)
    _audit(actor, "job.delete", "job", job_id, freed, via=via)
    log.info("deleted", extra={"job_id": job_id})
    return freed


def find_job_in(session: Session, job_id: str, scope: str | None, *, lock: bool = False) -> Job:
    """The job if `scope` (a tenant, or None for an admin) may see it; 404 otherwise."""
    stmt = select(Job).where(Job.id == job_id)
    if scope is not None:
        stmt = stmt.where(Job.tenant_id == scope)
    if lock:
        stmt = stmt.with_for_update()
    job = session.scalar(stmt)
    if job is None:
        raise NotFoundError(f"no job {job_id}")
    return job


def delete_artifact(artifact_id: str, scope: str | None, actor: Actor, via: str) -> Freed:
    """One output of a finished job: its file, then its row."""
    app = genq()
    stmt = select(Artifact).where(Artifact.id == artifact_id)
    if scope is not None:
        stmt = stmt.where(Artifact.tenant_id == scope)
    with app.database.read() as session:
        artifact = session.scalar(stmt)
        if artifact is None:
            raise NotFoundError(f"no artifact {artifact_id}")
        job = session.get_one(Job, artifact.job_id)
        if job.state not in FINISHED:
            raise ConflictError(
                f"artifact {artifact_id} belongs to job {job.id}, which is {job.state}:"
                " delete outputs of finished jobs only",
                state=job.state,
            )
        path, size, job_id, job_tenant = artifact.path, artifact.size_bytes, job.id, job.tenant_id
    gone = app.artifacts.size(path) is not None
    app.artifacts.delete(path)
    freed = Freed(files=int(gone), bytes=size if gone else 0)
    with app.database.transaction() as session:
        artifact = session.scalar(stmt)
        if artifact is not None:
            session.delete(artifact)
            freed.artifacts = 1
    # The job's outputs changed, not its row: a marker newer than the row keeps a document
    # read before the delete from being stored (api/polling.py).
    polling.changed(
        job_id, version=polling.version_of(utcnow()), tenant_id=job_tenant, payload=None
    )
    _audit(actor, "artifact.delete", "artifact", artifact_id, freed, job_id=job_id, via=via)
    return freed


def delete_model(
    find: Callable[[Session], Model], scope: str | None, actor: Actor, via: str, *, force: bool
) -> Freed:
    """The version `find` returns: its row (after the in-use checks), then its weights."""
    app = genq()
    try:
        with app.database.transaction() as session:
            model = find(session)
            check_owner("model", model.tenant_id, scope, model.ref)
            model_id, ref = model.id, model.ref
            children = [
                c.ref for c in session.scalars(select(Model).where(Model.parent_id == model_id))
            ]
            folders = delete_model_rows(session, model, force=force)
    except IntegrityError:  # a job or a fine-tune named it while it was being deleted
        raise ConflictError("the model was taken into use meanwhile; try again") from None
    polling.many_changed()  # the jobs that named it name none now
    freed = Freed(models=1)
    for folder in folders:
        freed.add(free_prefix(app.artifacts, folder))
    _audit(actor, "model.delete", "model", model_id, freed, ref=ref, orphaned=children, via=via)
    return freed


def delete_dataset(dataset_id: str, scope: str | None, actor: Actor, via: str) -> Freed:
    """A data set: its row (after the in-use check), then its files."""
    app = genq()
    stmt = select(Dataset).where(Dataset.id == dataset_id)
    if scope is not None:
        stmt = stmt.where(or_(Dataset.tenant_id == scope, Dataset.tenant_id == SYSTEM_TENANT_ID))
    try:
        with app.database.transaction() as session:
            dataset = session.scalar(stmt.with_for_update())
            if dataset is None:
                raise NotFoundError(f"no data set {dataset_id}")
            check_owner("data set", dataset.tenant_id, scope, dataset.name)
            name = dataset.name
            folders = delete_dataset_rows(session, dataset)
    except IntegrityError:  # a training job named it while it was being deleted
        raise ConflictError("the data set was taken into use meanwhile; try again") from None
    polling.many_changed()  # the jobs that named it name none now
    freed = Freed(datasets=1)
    for folder in folders:
        freed.add(free_prefix(app.artifacts, folder))
    _audit(actor, "dataset.delete", "dataset", dataset_id, freed, name=name, via=via)
    return freed


def parse_force() -> bool:
    raw = request.args.get("force")
    if raw is None:
        return False
    if raw.lower() in TRUE:
        return True
    if raw.lower() in FALSE:
        return False
    raise InvalidInputError.one("force", "must be true or false")


def _actor() -> Actor:
    with genq().database.read() as session:
        return Actor.of_key(session, principal().key_id)


@bp.delete("/jobs/<job_id>")
def delete_job_view(job_id: str) -> tuple[str, int]:
    """A finished job with its events and outputs: 204."""
    delete_job(job_id, tenant_scope(), _actor(), "api")
    return "", 204


@bp.delete("/artifacts/<artifact_id>")
def delete_artifact_view(artifact_id: str) -> tuple[str, int]:
    delete_artifact(artifact_id, tenant_scope(), _actor(), "api")
    return "", 204


@bp.delete("/models/<name>/<version>")
def delete_model_view(name: str, version: str) -> tuple[str, int]:
    """A version, when no waiting or running job uses it (`?force=true`: even if other
    versions were fine-tuned from it)."""
    force = parse_force()
    number = parse_whole(version, minimum=1, maximum=INT32_MAX)
    if number is None:
        raise NotFoundError(f"no model {name}:{version}")
    scope = tenant_scope()

    def find(session: Session) -> Model:
        # A tenant's own version of the name wins over a built-in one, as in a submission.
        own = select(Model).where(Model.name == name, Model.version == number)
        found = None if scope is None else session.scalar(own.where(Model.tenant_id == scope))
        return found or find_version(session, scope, name, number)

    delete_model(
        find,
        scope,
        _actor(),
        "api",
        force=force,
    )
    return "", 204


@bp.delete("/datasets/<dataset_id>")
def delete_dataset_view(dataset_id: str) -> tuple[str, int]:
    delete_dataset(dataset_id, tenant_scope(), _actor(), "api")
    return "", 204
