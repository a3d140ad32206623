"""Turning a valid `POST /v1/jobs` body (api/submissions.py) into the row to create: the model,
family and data set it names are looked up (404 for an unknown model or data set, 422 for a
family that is missing, broken or does not do the job's kind), the params are validated
strictly against the family's own pydantic class and stored with their defaults filled in, and
what the job asks of the cluster and of its webhook's host is checked against what can be.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from flask import has_request_context
from pydantic import ValidationError
from sqlalchemy.orm import Session

from api.problems import request_id
from api.submissions import JobResources, JobSubmission, errors_from
from core.catalog import resolve_dataset, resolve_model
from core.errors import InvalidInputError
from core.inputfiles import resolve_input
from core.jobs import NewJob, parse_priority
from core.states import JobKind
from core.tables import Dataset, Model, Tenant
from core.webhooks import UnresolvedTargetError, UnsafeTargetError, check_target
from scheduler.enqueue import queue_for_kind
from workers.families.base import GPU_MEMORY_RESOURCE, Family
from workers.registry import BROKEN, FAMILIES


def check_webhook_target(sub: JobSubmission, *, allow_private: bool) -> None:
    """422 on `webhook` when its host resolves to an internal address. A host that does not
    resolve now is accepted: every send checks again, and a failed lookup is retried."""
    if sub.webhook is None:
        return
    try:
        check_target(sub.webhook, allow_private=allow_private)
    except UnsafeTargetError as exc:
        raise InvalidInputError.one("webhook", str(exc)) from None
    except UnresolvedTargetError:
        pass


def _family_for_model(model: Model, kind: JobKind) -> Family:
    family = FAMILIES.get(model.family)
    if family is None:
        why = f"is broken: {BROKEN[model.family].error}" if model.family in BROKEN else ""
        raise InvalidInputError.one(
            "model",
            f"model {model.ref} needs family {model.family!r}, which {why or 'is not installed'}",
        )
    if family.params_for(kind) is None:
        raise InvalidInputError.one(
            "model", f"model {model.ref} (family {family.name}) does not support {kind} jobs"
        )
    return family


def _family_by_name(name: str, kind: JobKind) -> Family:
    family = FAMILIES.get(name)
    if family is None:
        if name in BROKEN:
            raise InvalidInputError.one(
                "family", f"family {name!r} is broken: {BROKEN[name].error}"
            )
        known = ", ".join(sorted(FAMILIES))
        raise InvalidInputError.one("family", f"unknown family {name!r} (known: {known})")
    if family.params_for(kind) is None:
        raise InvalidInputError.one("family", f"family {name} does not support {kind} jobs")
    return family


def _check_dataset(dataset: Dataset, family: Family) -> None:
    if dataset.kind not in family.dataset_kinds:
        accepted = ", ".join(family.dataset_kinds) or "none"
        raise InvalidInputError.one(
            "dataset",
            f"data set {dataset.name} holds {dataset.kind}; family {family.name} trains on "
            f"{accepted}",
        )


def validate_params(family: Family, kind: JobKind, params: dict[str, Any]) -> dict[str, Any]:
    """The params checked (strictly, as JSON) against the family's class for `kind`, with
    defaults filled in."""
    spec = family.params_for(kind)
    assert spec is not None  # the family was checked to support the kind
    try:
        validated = spec.model_validate_json(json.dumps(params), strict=True)
    except ValidationError as exc:
        raise InvalidInputError(errors_from(exc, "params")) from None
    return validated.model_dump(mode="json")


@dataclass(frozen=True)
class Resolved:
    """A submission turned into the row to create, with the model and data set it names
    (loaded, for rendering the answer without reading them again)."""

    new: NewJob
    model: Model | None
    dataset: Dataset | None


def resolve_submission(
    session: Session,
    sub: JobSubmission,
    *,
    tenant_id: str,
    max_attempts: int,
    idempotency_key: str | None,
    request_digest: str,
) -> Resolved:
    """Resolve what the submission names (404 for an unknown model or data set) and check it
    fits together; returns the row to create (`.new`) with the model and data set it
    resolved."""
    model: Model | None = None
    if sub.model is not None:
        model = resolve_model(session, tenant_id, sub.model)
        family = _family_for_model(model, sub.kind)
    else:
        assert sub.family is not None  # required for train
        family = _family_by_name(sub.family, sub.kind)
    dataset: Dataset | None = None
    if sub.dataset is not None:
        dataset = resolve_dataset(session, tenant_id, sub.dataset)
        _check_dataset(dataset, family)
    params = validate_params(family, sub.kind, sub.params)
    if not sub.preemptible:
        tenant = session.get(Tenant, tenant_id)
        if tenant is None or not tenant.may_opt_out:
            raise InvalidInputError.one(
                "preemptible",
                "this tenant may not opt out of preemption (an admin allows it: may_opt_out)",
            )
    if model is not None and family.check_model_params is not None:
        family.check_model_params(sub.kind, params, dict(model.config or {}))
    for name in family.input_fields if sub.kind == JobKind.GENERATE else ():
        if isinstance(ref := params.get(name), str):
            resolve_input(session, tenant_id, ref, f"params.{name}")
    new = NewJob(
        tenant_id=tenant_id,
        kind=sub.kind,
        family=family.name,
        queue=queue_for_kind(sub.kind),
        params=params,
        model_id=model.id if model else None,
        dataset_id=dataset.id if dataset else None,
        target_name=sub.name,
        priority=parse_priority(sub.priority),
        idempotency_key=idempotency_key,
        request_hash=request_digest,
        webhook=sub.webhook,
        webhook_events=list(sub.webhook_events) if sub.webhook_events is not None else None,
        deadline=_utc(sub.deadline),
        run_at=_utc(sub.run_at),
        max_attempts=max_attempts,
        timeout_s=sub.timeout_s,
        num_gpus=_wanted_gpus(sub, family),
        gpu_memory_gb=sub.resources.gpu_memory_gb if sub.resources else None,
        preemptible=sub.preemptible,
        request_id=request_id() if has_request_context() else None,
    )
    return Resolved(new, model, dataset)


def _wanted_gpus(sub: JobSubmission, family: Family) -> float:
    if sub.resources is not None and sub.resources.num_gpus is not None:
        return sub.resources.num_gpus
    return family.resources.num_gpus


def check_fits_cluster(resources: JobResources | None, nodes: list[dict[str, float]]) -> None:
    """Refuse (422) a request that no node of the cluster could ever hold: `nodes` are the
    alive nodes' declared resources from the workers' cluster snapshots. With no snapshot (no
    worker has reported yet) nothing is known and nothing is refused here; the trainer then
    fails with the same reasons when it is placed."""
    if resources is None or not nodes:
        return
    errors = []
    if resources.num_gpus:
        most = max(node.get("GPU", 0.0) for node in nodes)
        if most < resources.num_gpus:
            errors.append(
                {
                    "field": "resources.num_gpus",
                    "message": f"no node of the cluster has {resources.num_gpus:g} GPUs "
                    f"(the most on one node: {most:g})",
                }
            )
    if resources.gpu_memory_gb:
        most = max(node.get(GPU_MEMORY_RESOURCE, 0.0) for node in nodes)
        if most < resources.gpu_memory_gb:
            errors.append(
                {
                    "field": "resources.gpu_memory_gb",
                    "message": f"no node of the cluster declares {resources.gpu_memory_gb:g} GB "
                    f"of GPU memory (the most on one node: {most:g} GB; nodes declare it with "
                    f"`ray start --resources='{{\"{GPU_MEMORY_RESOURCE}\": <GB>}}'`)",
                }
            )
    if errors:
        raise InvalidInputError(errors)


def _utc(value: datetime | None) -> datetime | None:
    return value.astimezone(UTC) if value is not None else None
