"""The shapes of the `/v1` API's answers, as typed dicts.

They serve twice: pydantic turns each into the JSON schema `/v1/openapi.json` publishes under
`components.schemas` (api/openapi.py), and the builders that make the answers (api/payloads.py
and the views' `*_payload` functions) are typed to return them, so mypy refuses a builder
whose fields differ from the document's. Typed dicts, not pydantic models: a builder keeps
making a plain dict, and a page of 1,000 jobs costs nothing more to render
(bench/openapi_render.py measures that, and what validating every answer would cost).

A class's name is its name in the document; a field's `Annotated` metadata carries what the
type alone cannot say (formats, enums, bounds, descriptions). A leaf module: it imports only
`core`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired

from pydantic import ConfigDict, Field, WithJsonSchema

# pydantic reads a typed dict's fields from typing_extensions' TypedDict on Python 3.11.
from typing_extensions import TypedDict

from core.states import JobKind, JobState


def one_of(*values: str) -> WithJsonSchema:
    """A string the document limits to `values` (the builder's type stays `str`: the value
    comes from a database column)."""
    return WithJsonSchema({"type": "string", "enum": list(values)})


# ISO-8601 in UTC with a `Z` (api.payloads.iso).
Time = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]
# A JSON object whose fields the document does not fix (params, meta, metrics).
Object = dict[str, Any]


class ProblemField(TypedDict):
    field: str
    message: str


class Problem(TypedDict):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    errors: NotRequired[list[ProblemField]]


class QuotaExceeded(TypedDict):
    type: Literal["quota-exceeded"]
    title: str
    status: Literal[429]
    detail: str
    limit: Literal["max_queued", "gpu_seconds_budget"]
    current: float
    allowed: float


class RateLimited(TypedDict):
    type: Literal["rate-limited"]
    title: str
    status: Literal[429]
    detail: str
    policy: Literal["key", "tenant", "auth", "streams"]


# -- jobs -----------------------------------------------------------------------------------------


class Output(TypedDict):
    id: str
    name: str
    kind: Annotated[str, one_of("image", "text", "grid", "file")]
    url: str
    content_type: str
    bytes: int
    meta: Object


class JobProgress(TypedDict):
    step: int
    total: int
    message: str


class JobError(TypedDict):
    type: str
    detail: str


class Resources(TypedDict):
    num_gpus: float
    gpu_memory_gb: float | None


class JobPreemption(TypedDict):
    count: int
    by: str | None
    requested_at: Time | None


class Placement(TypedDict):
    node_id: str
    node_ip: str
    hostname: str
    gpu_ids: list[str]
    replica: str


class JobBatch(TypedDict):
    id: str
    item: str


class Job(TypedDict):
    id: str
    kind: Annotated[str, one_of(*JobKind)]
    state: Annotated[str, one_of(*JobState)]
    model: str | None
    family: str
    dataset: str | None
    name: str | None
    params: Object
    priority: Annotated[int, Field(ge=0, le=9)]
    priority_class: Annotated[str, one_of("interactive", "normal", "batch")]
    progress: JobProgress
    queue_position: int | None
    eta_s: float | None
    attempt: int
    max_attempts: int
    outputs: list[Output]
    error: JobError | None
    created_at: Time
    started_at: Time | None
    finished_at: Time | None
    metrics: Annotated[
        Object,
        Field(
            description="The job's last metrics; `load_s`: seconds it waited for its model"
            " server to load (a cold start), absent when the server was warm."
        ),
    ]
    result_model: str | None
    webhook: str | None
    webhook_events: list[str] | None
    deadline: Time | None
    run_at: Time | None
    timeout_s: float | None
    resources: Resources
    preemptible: bool
    preemption: JobPreemption
    placement: Placement | None
    batch: JobBatch | None


class JobPage(TypedDict):
    items: list[Job]
    next_cursor: str | None


class Event(TypedDict):
    """One history entry; the event's own fields follow id, type, created_at."""

    __pydantic_config__ = ConfigDict(extra="allow")  # type: ignore[misc]

    id: int
    type: str
    created_at: Time


class EventList(TypedDict):
    items: list[Event]


class DeliveryAttempt(TypedDict):
    attempt: int
    at: Time
    status: int | None
    error: str | None
    duration_ms: int


class Delivery(TypedDict):
    id: str
    event: Annotated[str, one_of("start", "progress", "output", "completed", "preempted")]
    type: str
    url: str
    state: Annotated[str, one_of("pending", "delivered", "failed")]
    attempts: int
    next_attempt_at: Time | None
    created_at: Time
    delivered_at: Time | None
    log: list[DeliveryAttempt]


class DeliveryList(TypedDict):
    items: list[Delivery]


class WebhookSecret(TypedDict):
    tenant_id: str
    secret: str


class Batch(TypedDict):
    id: str
    size: int
    created_at: Time
    counts: Annotated[
        dict[str, int],
        WithJsonSchema(
            {
                "type": "object",
                "properties": {str(state): {"type": "integer"} for state in JobState},
                "required": [str(state) for state in JobState],
                "description": "The batch's jobs by state.",
            }
        ),
    ]
    jobs_url: str


class BatchWithJobs(Batch):
    jobs: list[Job]


class InputFile(TypedDict):
    """An uploaded input picture; a job names it by `id` (e.g. params.image)."""

    id: str
    filename: str
    bytes: int
    purpose: str
    created_at: Time
    content_type: NotRequired[Literal["image/png", "image/jpeg", "image/webp"]]
    width: NotRequired[int]
    height: NotRequired[int]


# -- models, data sets, families ------------------------------------------------------------------


class ModelLineage(TypedDict):
    dataset: str | None
    parent: str | None
    job: str | None


class ModelScaling(TypedDict):
    """The replica policy in force; `overrides`: the fields this version sets itself (the
    rest are its family's defaults)."""

    min_replicas: int
    max_replicas: int
    target_jobs_per_replica: float
    idle_unload_s: float | None
    last_idle_unload_s: float | None
    overrides: Object


class Model(TypedDict):
    name: str
    version: int
    ref: str
    family: str
    created_at: Time
    status: Annotated[
        str,
        one_of("checking", "ready", "failed"),
        Field(
            description="A registered pretrained folder is `checking` until a worker has"
            " loaded it; jobs need `ready`."
        ),
    ]
    status_detail: str | None
    description: str | None
    metrics: Object
    lineage: ModelLineage
    scaling: ModelScaling


class ModelList(TypedDict):
    items: list[Model]


class Dataset(TypedDict):
    id: str
    name: str
    kind: str
    num_items: int
    size_bytes: int
    meta: Object
    created_at: Time


class DatasetList(TypedDict):
    items: list[Dataset]


class Family(TypedDict):
    """A loaded family (`status` ok) has every field but `error`; one found but not loaded
    (`status` broken: its import failed, it declares another interface version or fails the
    checks) has `name`, `source` and `error`."""

    name: str
    status: Literal["ok", "broken"]
    source: str
    error: NotRequired[str]
    api_version: NotRequired[int]
    description: NotRequired[str]
    kinds: NotRequired[list[str]]
    dataset_kinds: NotRequired[list[str]]
    resources: NotRequired[Object]
    registers_folders: NotRequired[bool]
    params: NotRequired[
        Annotated[
            dict[str, Object],
            Field(description="JSON schema of the params of each kind the family supports."),
        ]
    ]


class FamilyList(TypedDict):
    items: list[Family]


# -- health ---------------------------------------------------------------------------------------


class Health(TypedDict):
    status: str
    checks: Object


class Liveness(TypedDict):
    status: Literal["alive"]


class HealthPart(TypedDict):
    status: Annotated[str, Field(description="`ok`, or what is wrong.")]
    age_s: Annotated[
        float | None,
        Field(description="Seconds since the part was last seen healthy (null: never)."),
    ]


class Readiness(TypedDict):
    status: Literal["ready"]
    parts: Annotated[
        dict[str, HealthPart],
        Field(
            description="database, broker, workers (with `queues`: each queue's status, worker"
            " count and age), ray, scheduler."
        ),
    ]


RESPONSES: tuple[type, ...] = (
    Problem,
    QuotaExceeded,
    RateLimited,
    Job,
    JobPage,
    Event,
    EventList,
    Delivery,
    DeliveryList,
    WebhookSecret,
    Batch,
    BatchWithJobs,
    InputFile,
    Model,
    ModelList,
    Dataset,
    DatasetList,
    Family,
    FamilyList,
    Health,
    Liveness,
    HealthPart,
    Readiness,
)
