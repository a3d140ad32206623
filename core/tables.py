"""The SQL tables: tenants and their keys, jobs with their events and artifacts, the model
registry and data sets. The job row is the truth about a job (DESIGN.md).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    true,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from core.ids import new_id

SYSTEM_TENANT_ID = "system"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out; SQLite stores naive values, so tag them on the way out."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JsonType = JSON().with_variant(JSONB(), "postgresql")
# SQLite autoincrements only an INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenant"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Scheduling (core/fairness.py, core/quotas.py). Weight: this tenant's share of slots
    # relative to the others' (1-100). A None limit is no limit.
    weight: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    max_running: Mapped[int | None] = mapped_column(Integer)
    max_queued: Mapped[int | None] = mapped_column(Integer)
    # GPU-seconds (run seconds x GPUs) allowed per budget_period_s, counted over the jobs that
    # finished or are running in the current period.
    gpu_seconds_budget: Mapped[float | None] = mapped_column(Float)
    budget_period_s: Mapped[int] = mapped_column(Integer, default=86400, server_default="86400")
    # What a submission over a limit gets: `reject` (429) or `hold` (accepted, waits queued).
    over_quota: Mapped[str] = mapped_column(String(8), default="reject", server_default="reject")
    # API requests per second (sustained) and burst for each of this tenant's keys and for the
    # tenant as a whole (api/ratelimits.py). None: the defaults in settings.
    rate_limit_per_s: Mapped[float | None] = mapped_column(Float)
    rate_limit_burst: Mapped[int | None] = mapped_column(Integer)
    # Preemption (core/preemption.py), both set by admins: False exempts every job of the
    # tenant; `may_opt_out` lets its jobs be submitted with `preemptible: false`.
    preemptible: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    may_opt_out: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Retention (core/retention.py): days the outputs, the events and the rows of this
    # tenant's finished jobs are kept. None: the default in settings; 0: kept forever.
    retain_outputs_days: Mapped[int | None] = mapped_column(Integer)
    retain_events_days: Mapped[int | None] = mapped_column(Integer)
    retain_jobs_days: Mapped[int | None] = mapped_column(Integer)


class ApiKey(Base):
    """Only the key's SHA-256 and its first characters are kept; the key is shown once."""

    __tablename__ = "api_key"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.id"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str] = mapped_column(String(128), default="")
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    # What the key may do (core/keys.py KeyScope): read, submit or admin (is_admin agrees).
    scope: Mapped[str] = mapped_column(String(16), default="submit", server_default="submit")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # After this the key answers 401 as if revoked. None: it does not expire.
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class DashboardSession(Base):
    """A dashboard login, kept server-side so that it can end: the cookie carries a random id
    whose SHA-256 is the row's id; logout, an admin "log out everywhere" and the key's
    revocation or expiry end it at once."""

    __tablename__ = "dashboard_session"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_key.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Dataset(Base):
    __tablename__ = "dataset"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.id"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))  # images | text
    # Its key (folder) in the artifact store; None for built-in data sets shipped in a package.
    path: Mapped[str | None] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    num_items: Mapped[int] = mapped_column(Integer, default=0)
    meta: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Model(Base):
    """A registered model version. Built-in models belong to the system tenant and are seen by
    every tenant."""

    __tablename__ = "model"
    __table_args__ = (UniqueConstraint("tenant_id", "name", "version"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.id"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    family: Mapped[str] = mapped_column(String(64))
    # Folder of weights: a key in the artifact store, an s3:// URL or an absolute local path
    # (None for weightless built-ins).
    path: Mapped[str | None] = mapped_column(String(1024))
    config: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    # Lineage. job_id has no foreign key: job.model_id already points here, and a cycle of
    # foreign keys would make both tables awkward to create and to delete from.
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("dataset.id"))
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("model.id"))
    job_id: Mapped[str | None] = mapped_column(String(36), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # A pretrained folder registered with POST /v1/models is `checking` until a worker has
    # loaded it, then `ready` or `failed` (status_detail says why); jobs need `ready`.
    status: Mapped[str] = mapped_column(String(16), default="ready", server_default="ready")
    status_detail: Mapped[str | None] = mapped_column(Text)
    # This version's replica policy over its family's defaults (core/scaling.py); None: none.
    serving: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    # Bytes of its weights folder, measured by the periodic retention pass (core/retention.py)
    # for the tenants' disk use; None until measured.
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


class JobBatch(Base):
    """Jobs submitted together: one transaction, one idempotency key. An OpenAI batch
    (`/openai/v1/batches`) also keeps the endpoint its lines call and its input file."""

    __tablename__ = "job_batch"
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.id"), index=True)
    # `jobs` (genq's own) or `openai` (an OpenAI batch file).
    kind: Mapped[str] = mapped_column(String(16), default="jobs")
    size: Mapped[int] = mapped_column(Integer)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    endpoint: Mapped[str | None] = mapped_column(String(64))
    input_file_id: Mapped[str | None] = mapped_column(String(64))
    meta: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    canceled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class UploadedFile(Base):
    """A file uploaded through `/openai/v1/files` (an OpenAI batch's input lines), kept in
    the artifact store at `path`."""

    __tablename__ = "uploaded_file"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.id"), index=True)
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Job(Base):
    __tablename__ = "job"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        # The scheduler's and the API's hot paths.
        Index("ix_job_state_queue", "state", "queue", "priority", "id"),
        Index("ix_job_tenant_id", "tenant_id", "id"),
        Index("ix_job_lease", "state", "lease_expires_at"),
        # The dashboard: a state filter read newest first, and the last hour's finished jobs.
        Index("ix_job_state_id", "state", "id"),
        Index("ix_job_finished_at", "finished_at"),
        # The claim order (core/fairness.py): each tenant's queued jobs by priority and age.
        Index("ix_job_claim", "state", "queue", "tenant_id", "priority", "created_at", "id"),
        # The usage-based fair share (core/usage.py): what the running jobs cost, read from
        # the index alone.
        Index("ix_job_running_usage", "state", "tenant_id", "started_at", "num_gpus"),
        # The ETA: a model's recent run times.
        Index("ix_job_model_finished", "model_id", "state", "finished_at"),
        # A schedule fires each slot once, whatever the number of scheduler processes.
        UniqueConstraint("schedule_id", "slot_at", name="uq_job_schedule_slot"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.id"))
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    queue: Mapped[str] = mapped_column(String(32))
    family: Mapped[str] = mapped_column(String(64))
    model_id: Mapped[str | None] = mapped_column(ForeignKey("model.id"), index=True)
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("dataset.id"))
    # For train and finetune: the name the resulting model is registered under.
    target_name: Mapped[str | None] = mapped_column(String(128))
    params: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    priority: Mapped[int] = mapped_column(Integer, default=5)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))

    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_token: Mapped[str | None] = mapped_column(String(36))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    progress_step: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    progress_message: Mapped[str] = mapped_column(Text, default="")
    error_type: Mapped[str | None] = mapped_column(String(64))
    error_detail: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    result_model_id: Mapped[str | None] = mapped_column(ForeignKey("model.id"))
    # Where the last attempt ran: {node_id, node_ip, hostname, gpu_ids, replica}; None before.
    placement: Mapped[dict[str, Any] | None] = mapped_column(JsonType)

    webhook: Mapped[str | None] = mapped_column(String(2048))
    webhook_events: Mapped[list[str] | None] = mapped_column(JsonType)
    deadline: Mapped[datetime | None] = mapped_column(UTCDateTime)
    run_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Longest running time of one attempt, in seconds; None: no limit.
    timeout_s: Mapped[float | None] = mapped_column(Float)
    # A queued job is not claimed before this (the backoff of a retried attempt).
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # GPUs the job holds while it runs (the GPU-seconds quota counts run time x this).
    num_gpus: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    # GPU memory a training job asked for (Ray custom resource `gpu_memory_gb`); None: any.
    gpu_memory_gb: Mapped[float | None] = mapped_column(Float)
    # Set on jobs a schedule created: which schedule, and for which of its slots.
    schedule_id: Mapped[str | None] = mapped_column(String(36))
    slot_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Preemption (core/preemption.py): whether a training job may be stopped at a checkpoint
    # for a job of a higher priority class; how often it was; the job it last made room for,
    # and when that stop was asked (None once the attempt has ended).
    preemptible: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    preempt_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    preempted_by: Mapped[str | None] = mapped_column(String(36))
    preempt_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Until this attempt's actor is placed by Ray: since when (the claim), and the resource
    # Ray lacks to place it (`GPU`, `gpu_memory_gb`, `CPU`) once the runner sees it wait; both
    # None once placed. Preemption reads them (core/preemption.py: a claimed job can wait for
    # a GPU that training holds, and a training not placed yet holds none).
    waiting_for: Mapped[str | None] = mapped_column(String(32))
    waiting_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Set on jobs submitted together (POST /v1/batches, or an OpenAI batch file): which batch,
    # and the item's name in it (its index, or the line's custom_id).
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("job_batch.id"), index=True)
    batch_item: Mapped[str | None] = mapped_column(String(64))
    # The X-Request-ID of the request that submitted the job (api/problems.py); every log
    # line about the job carries it (core/logs.py). None: not submitted over HTTP.
    request_id: Mapped[str | None] = mapped_column(String(128))

    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # When the job's id was last handed to the broker; the reconciler reads it.
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    # When retention removed the job's outputs, checkpoints and unregistered model folder
    # (core/retention.py); None while they are kept.
    outputs_purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class JobEvent(Base):
    """A job's history: state changes, progress, logs, metrics and outputs, in order. The id
    is the Server-Sent Events id, so a client resumes with Last-Event-ID."""

    __tablename__ = "job_event"
    __table_args__ = (Index("ix_job_event_job", "job_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Artifact(Base):
    """One output file of a job. Unique per job and name, so a retried attempt that produces
    the same output never records it twice."""

    __tablename__ = "artifact"
    __table_args__ = (UniqueConstraint("job_id", "name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), index=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.id"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(16))  # image | text | grid | file
    path: Mapped[str] = mapped_column(String(1024))  # its key in the artifact store
    content_type: Mapped[str] = mapped_column(String(128))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    meta: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AuditEntry(Base):
    """One admin action (cancel, retry, priority, key created or revoked, login): who did it
    (the key's id and prefix and its tenant), what, to which object, and when."""

    __tablename__ = "audit_entry"
    __table_args__ = (Index("ix_audit_entry_target", "target_type", "target_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    key_id: Mapped[str | None] = mapped_column(String(36))
    key_prefix: Mapped[str] = mapped_column(String(16))
    tenant_id: Mapped[str | None] = mapped_column(String(36))
    action: Mapped[str] = mapped_column(String(32))
    target_type: Mapped[str] = mapped_column(String(16))
    target_id: Mapped[str] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WebhookDelivery(Base):
    """One webhook message about a job, written in the same transaction as the event it tells
    of (an outbox): its id is the `webhook-id` header, stable across retries. `log` holds one
    entry per attempt to send it."""

    __tablename__ = "webhook_delivery"
    __table_args__ = (
        Index("ix_webhook_delivery_job", "job_id", "created_at"),
        Index("ix_webhook_delivery_due", "state", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(String(36))
    event: Mapped[str] = mapped_column(String(16))  # start | progress | output | completed
    url: Mapped[str] = mapped_column(String(2048))
    payload: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    state: Mapped[str] = mapped_column(String(16), default="pending")  # | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    log: Mapped[list[dict[str, Any]]] = mapped_column(JsonType, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class FairShare(Base):
    """Start-time fair queuing state (core/fairness.py). Per queue, the row with tenant_id ""
    holds the queue's virtual clock; each other row holds a tenant's pass: the virtual start
    time of its next job in that queue."""

    __tablename__ = "fair_share"

    queue: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    pass_value: Mapped[int] = mapped_column(BigInteger, default=0)


class TenantUsage(Base):
    """What a tenant's jobs have cost, for the usage-based fair share (core/usage.py):
    GPU-seconds and attempts charged, both decayed to `as_of`, and the attempts running now
    (added when read, from their start)."""

    __tablename__ = "tenant_usage"

    tenant_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    gpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    attempts: Mapped[float] = mapped_column(Float, default=0.0)
    as_of: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The attempts running now, kept as they start and end so that reading their cost does
    # not read them: how many, the sum of their rates (GPU-seconds per second), and the sum
    # of rate x start (Unix seconds). They have cost `running_rate * now - running_rate_start`.
    running_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    running_rate: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    running_rate_start: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")


class Schedule(Base):
    """A recurring job: a cron expression in a time zone and the job template it submits
    (the body of POST /v1/jobs). `next_run_at` is the next slot to fire; the periodic loop
    advances it with a conditional UPDATE in the transaction that creates the job."""

    __tablename__ = "schedule"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name"),
        Index("ix_schedule_due", "paused", "next_run_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.id"))
    name: Mapped[str] = mapped_column(String(128))
    cron: Mapped[str] = mapped_column(String(128))
    timezone: Mapped[str] = mapped_column(String(64))
    template: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    next_run_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_run_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_job_id: Mapped[str | None] = mapped_column(String(36))
    fired_count: Mapped[int] = mapped_column(Integer, default=0)
    # Why the last slot did not submit its job (a quota refused it), or None.
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class RetentionCounter(Base):
    """What deletion has freed since the database was made, by source (`retention`: the
    periodic purge; `api`: DELETE requests and dashboard buttons) and item (`files`, `bytes`,
    `events`, `jobs`, `artifacts`, `models`, `datasets`, `runs`): monotonic counters that
    /metrics exposes."""

    __tablename__ = "retention_counter"

    source: Mapped[str] = mapped_column(String(16), primary_key=True)
    item: Mapped[str] = mapped_column(String(16), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
