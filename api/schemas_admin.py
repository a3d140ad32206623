"""The shapes of the answers about tenants, schedules, keys, sessions and dropped broker
messages: the operator's side of the `/v1` API. As in api/schemas.py, pydantic makes each the
document's schema of that name and the views' builders are typed to return it.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

# pydantic reads a typed dict's fields from typing_extensions' TypedDict on Python 3.11.
from typing_extensions import TypedDict

from api.schemas import Object, Time, one_of


class TenantQuotas(TypedDict):
    max_running: int | None
    max_queued: int | None
    gpu_seconds_budget: float | None
    budget_period_s: int
    over_quota: Annotated[str, one_of("reject", "hold")]


class TenantRateLimit(TypedDict):
    per_s: float
    burst: int
    is_default: bool


class TenantUsage(TypedDict):
    running: int
    waiting: int
    gpu_seconds: float


class FairShare(TypedDict):
    gpu_seconds: float
    running_gpu_seconds: float
    share: float
    usage_share: float
    ratio: float


class TenantPreemption(TypedDict):
    preemptible: bool
    may_opt_out: bool


Days = Annotated[int, Field(ge=1)] | None
OwnDays = Annotated[int, Field(ge=0)] | None


class OwnRetention(TypedDict):
    outputs_days: OwnDays
    events_days: OwnDays
    jobs_days: OwnDays


class TenantRetention(TypedDict):
    """Days each is kept after a job finishes (null: forever), and the tenant's own setting
    (null: the default; 0: forever)."""

    outputs_days: Days
    events_days: Days
    jobs_days: Days
    own: OwnRetention


class DiskUse(TypedDict):
    outputs_bytes: int
    datasets_bytes: int
    models_bytes: int


class Tenant(TypedDict):
    id: str
    name: str
    weight: int
    quotas: TenantQuotas
    rate_limit: TenantRateLimit
    usage: TenantUsage
    fair_share: FairShare
    preemption: TenantPreemption
    retention: TenantRetention
    disk: DiskUse


class TenantList(TypedDict):
    items: list[Tenant]


class PurgeResult(TypedDict):
    purged: int
    job_ids: list[str]


class ScheduleOut(TypedDict):
    id: str
    name: str
    cron: str
    timezone: str
    job: Object
    paused: bool
    next_run_at: Time | None
    last_run_at: Time | None
    last_job_id: str | None
    last_error: str | None
    fired_count: int
    created_at: Time
    updated_at: Time


class ScheduleList(TypedDict):
    items: list[ScheduleOut]


class ApiKey(TypedDict):
    id: str
    prefix: str
    tenant_id: str
    tenant: str
    scope: Annotated[str, one_of("read", "submit", "admin")]
    label: str
    created_at: Time
    expires_at: Time | None
    revoked_at: Time | None
    last_used_at: Time | None


class ApiKeyCreated(ApiKey):
    key: str


class ApiKeyList(TypedDict):
    items: list[ApiKey]


class SessionsEnded(TypedDict):
    ended: int


class DroppedMessage(TypedDict):
    at: float
    reason: str
    detail: str
    queue: str | None
    excerpt: str


class DroppedMessages(TypedDict):
    total: int
    by_reason: dict[str, int]
    recent: list[DroppedMessage]


# Every shape the document lists by name; the nested ones above come in through these.


RESPONSES: tuple[type, ...] = (
    Tenant,
    TenantList,
    PurgeResult,
    ScheduleOut,
    ScheduleList,
    ApiKey,
    ApiKeyCreated,
    ApiKeyList,
    SessionsEnded,
    DroppedMessages,
    TenantRateLimit,
    TenantRetention,
    DiskUse,
)
