"""What `POST /v1/jobs` accepts: the request body (a pydantic model, also the OpenAPI request
schema), the checks that depend on the job kind, the Idempotency-Key and the request's digest,
and the 422 field list every view makes of a pydantic error (`errors_from`). Turning a valid
body into a `core.jobs.NewJob` is api/resolution.py's.

Input is never fixed up: a wrong type, an unknown field, a naive timestamp or a missing field
is a 422 that names the field (`priority`, `model`, `params.steps`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
)

from core.errors import InvalidInputError
from core.jobs import PRIORITY_CLASSES
from core.states import JobKind
from core.tables import utcnow
from workers.registry import FAMILIES

WebhookEvent = Literal["start", "progress", "output", "completed", "preempted"]
IDEMPOTENCY_KEY_MAX = 255


class JobResources(BaseModel):
    """What a training job needs of the node it runs on (default: its family's needs)."""

    model_config = ConfigDict(extra="forbid", title="JobResources")

    num_gpus: float | None = Field(
        None,
        ge=0,
        le=64,
        allow_inf_nan=False,
        description="GPUs for the trainer: a fraction below 1 (it shares a GPU) or a whole number.",
    )
    gpu_memory_gb: float | None = Field(
        None,
        gt=0,
        le=4096,
        allow_inf_nan=False,
        description="GPU memory to reserve, in GB (nodes declare it as the Ray resource "
        "`gpu_memory_gb`).",
    )

    @field_validator("num_gpus")
    @classmethod
    def _whole_above_one(cls, value: float | None) -> float | None:
        # Ray places fractions of one GPU, or whole GPUs, never 1.5 of them.
        if value is not None and value > 1 and value != int(value):
            raise ValueError("must be a fraction below 1 or a whole number of GPUs")
        return value


class JobSubmission(BaseModel):
    """The body of `POST /v1/jobs`."""

    model_config = ConfigDict(
        extra="forbid",
        title="JobSubmission",
        json_schema_extra=lambda schema, _: _document_kind_fields(schema),
    )

    kind: JobKind = Field(description="generate, train or finetune.")
    model: str | None = Field(
        None,
        min_length=1,
        max_length=140,
        description="A registered model, `name` or `name:version` (generate, finetune).",
    )
    family: str | None = Field(
        None, min_length=1, max_length=64, description="The model family to train (train)."
    )
    dataset: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="A data set by name or id (train, finetune).",
    )
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._-]{1,128}$",
        description="The model name the result is registered under (train, finetune).",
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Checked against the family's schema for this kind (GET /v1/families).",
    )
    priority: StrictInt = Field(
        5,
        ge=0,
        le=9,
        description="0-9 (higher runs sooner) or a class: interactive (8), normal (5), batch (2).",
        json_schema_extra={"anyOf": [{"type": "integer"}, {"enum": list(PRIORITY_CLASSES)}]},
    )
    webhook: str | None = Field(
        None, max_length=2048, description="An http(s) URL told about the job's progress."
    )
    webhook_events: list[WebhookEvent] | None = Field(
        None,
        max_length=5,
        description="Which events the webhook receives (default: all).",
        json_schema_extra={"uniqueItems": True},
    )
    deadline: AwareDatetime | None = Field(
        None, description="Fail the job if it has not started by then (ISO-8601 with zone)."
    )
    run_at: AwareDatetime | None = Field(
        None, description="Do not start before then (ISO-8601 with zone)."
    )
    timeout_s: float | None = Field(
        None,
        gt=0,
        le=30 * 24 * 3600,
        allow_inf_nan=False,
        strict=True,
        description="Fail an attempt that runs longer than this many seconds (error `timeout`).",
    )
    resources: JobResources | None = Field(
        None,
        description="What a train or finetune job needs of its node: it runs only where "
        "they fit. Generate jobs run on their model's warm server, placed by the family.",
    )
    preemptible: StrictBool = Field(
        True,
        description="false: a train or finetune job is never stopped for a job of a higher "
        "priority class (only for tenants an admin allows to opt out: may_opt_out).",
    )

    @field_validator("priority", mode="before")
    @classmethod
    def _priority_class(cls, value: Any) -> Any:
        # A class name stands for its integer; anything else is checked as an integer 0-9.
        return PRIORITY_CLASSES.get(value, value) if isinstance(value, str) else value

    @field_validator("deadline", "run_at")
    @classmethod
    def _in_utc(cls, value: datetime | None) -> datetime | None:
        # "0001-01-01T00:00+14:00" parses, but falls before year 1 in UTC, where it is stored.
        if value is None:
            return value
        try:
            return value.astimezone(UTC)
        except OverflowError:
            raise ValueError("must fall within the years 1 to 9999 in UTC") from None

    @field_validator("webhook")
    @classmethod
    def _check_webhook(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http or https URL")
        return value

    @field_validator("webhook_events")
    @classmethod
    def _check_events(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("lists an event twice")
        return value


def _field(loc: tuple[int | str, ...], prefix: str = "") -> str:
    path = ".".join(str(part) for part in loc)
    if prefix:
        return f"{prefix}.{path}" if path else prefix
    return path or "body"


def errors_from(exc: ValidationError, prefix: str = "") -> list[dict[str, str]]:
    """One {field, message} per pydantic error; `prefix` puts nested ones under e.g. params."""
    return [{"field": _field(e["loc"], prefix), "message": e["msg"]} for e in exc.errors()]


def patch_schema(*not_null: str) -> Callable[[dict[str, Any], type], None]:
    """`json_schema_extra` for the body of a PATCH: at least one field, and the `not_null`
    ones, which may be left out, never null (the handler answers 422 to both)."""

    def adjust(schema: dict[str, Any], _: type) -> None:
        schema["minProperties"] = 1
        for name in not_null:
            prop = schema["properties"][name]
            options = [o for o in prop.pop("anyOf") if o != {"type": "null"}]
            if len(options) == 1:
                prop.update(options[0])
            else:
                prop["anyOf"] = options
            prop.pop("default", None)

    return adjust


def parse_submission(body: Any) -> JobSubmission:
    try:
        submission = JobSubmission.model_validate(body)
    except ValidationError as exc:
        raise InvalidInputError(errors_from(exc)) from None
    _check_kind_fields(submission)
    return submission


# Which of model, family, dataset and name each kind needs; the others must be absent.
_NEEDS: dict[JobKind, frozenset[str]] = {
    JobKind.GENERATE: frozenset({"model"}),
    JobKind.TRAIN: frozenset({"family", "dataset", "name"}),
    JobKind.FINETUNE: frozenset({"model", "dataset", "name"}),
}


def _document_kind_fields(schema: dict[str, Any]) -> None:
    """The same rules in the OpenAPI document, one if/then per kind: the fields it needs are
    strings, the others null or left out."""
    rules = []
    for kind, needs in _NEEDS.items():
        fields: dict[str, Any] = {
            field: {"type": "string"} if field in needs else {"type": "null"}
            for field in ("model", "family", "dataset", "name")
        }
        if kind == JobKind.GENERATE:
            fields["resources"] = {"type": "null"}
        if kind == JobKind.TRAIN:
            trainable = [n for n, f in FAMILIES.items() if f.params_for(kind) is not None]
            fields["family"] = {"enum": sorted(trainable)}
        rules.append(
            {
                "if": {"properties": {"kind": {"const": str(kind)}}},
                "then": {"required": sorted(needs), "properties": fields},
            }
        )
    schema["allOf"] = rules


def _check_kind_fields(sub: JobSubmission) -> None:
    errors = []
    for field in ("model", "family", "dataset", "name"):
        given = getattr(sub, field) is not None
        needed = field in _NEEDS[sub.kind]
        if needed and not given:
            errors.append({"field": field, "message": f"is required for a {sub.kind} job"})
        elif given and not needed:
            errors.append({"field": field, "message": f"is not allowed for a {sub.kind} job"})
    now = utcnow()
    if sub.resources is not None and sub.kind == JobKind.GENERATE:
        errors.append(
            {
                "field": "resources",
                "message": "is not allowed for a generate job: it runs on its model's warm "
                "server, which the model's family places",
            }
        )
    if sub.deadline is not None and sub.deadline <= now:
        errors.append({"field": "deadline", "message": "must be in the future"})
    elif sub.deadline is not None and sub.run_at is not None and sub.deadline <= sub.run_at:
        errors.append({"field": "deadline", "message": "must be later than run_at"})
    if errors:
        raise InvalidInputError(errors)


def request_hash(body: Any) -> str:
    """SHA-256 of the request body as canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not key or len(key) > IDEMPOTENCY_KEY_MAX:
        raise InvalidInputError.one(
            "Idempotency-Key", f"must be 1-{IDEMPOTENCY_KEY_MAX} characters"
        )
    return key
