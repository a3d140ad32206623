"""The one reader of the environment: every genq setting, with its default and its bounds.

Entry points build a `Settings` (from `GENQ_*` variables and an optional `.env` file) and pass
it down; nothing in genq reads configuration at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GENQ_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # Where local state lives: the SQLite file, the embedded Redis, generated secrets, logs.
    var_dir: Path = Path("var")
    # SQLAlchemy URL. Unset: a SQLite file under var_dir.
    database_url: str | None = None
    # Redis URL for the Celery broker. Unset: `genq up` starts an embedded redis-server.
    redis_url: str | None = None
    # Ray cluster address. Unset: `genq up` starts a local Ray head.
    ray_address: str | None = None
    # Root folder of job outputs, checkpoints, trained models and uploaded data sets.
    artifact_root: Path | None = None
    # Artifacts in S3-compatible object storage instead: s3://bucket/prefix. Endpoint, region
    # and credentials come from the standard AWS_* variables of each machine. Unset: the
    # folder above (one machine, or a disk every machine mounts).
    artifact_url: str | None = Field(None, pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$")
    # GET /v1/artifacts/{id} on object storage: answer 307 to a presigned URL of the object
    # (valid this long) instead of streaming it through the API.
    artifact_redirect: bool = False
    artifact_redirect_ttl_s: int = Field(300, ge=1, le=7 * 24 * 3600)
    # This machine's copies of stored models and data sets (trainers and model servers
    # download them here). Unset: var_dir/cache.
    cache_dir: Path | None = None

    # Where the API listens (`genq api`, `genq up`).
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # Signs dashboard sessions. Unset: generated once and kept in var_dir/secret_key.
    secret_key: str | None = None
    # When set, this admin key is created at first start (for automation).
    admin_key: str | None = None
    # Bearer token that may read GET /metrics (Prometheus' scrape), besides any admin key.
    # Unset: only admin keys may read it.
    metrics_token: str | None = Field(None, min_length=16)
    # The job figures of GET /metrics come from SQL queries over the job table; their text is
    # shared through Redis this long, so the API processes, hosts and Prometheus replicas
    # that scrape within it cost one set of queries. 0: every scrape queries.
    metrics_cache_s: float = Field(5.0, ge=0, le=300)

    # Leases: a running job's claim expires unless renewed by heartbeats.
    lease_ttl_s: float = Field(60.0, gt=0, le=3600)
    heartbeat_interval_s: float = Field(10.0, gt=0, le=600)
    # Attempts per job: crashed workers, lost actors and out-of-memory errors use them up; a
    # job out of attempts fails (`lost`, or its last error) and is in GET /v1/dead-letter.
    max_attempts: int = Field(3, ge=1, le=100)
    # The broker re-delivers an unacknowledged message after this long (the worker checks it
    # against the lease at start: it must be more than twice lease_ttl_s; short values are
    # for tests).
    visibility_timeout_s: int = Field(3600, ge=5)
    # How often the periodic scheduler looks for lost broker messages to re-publish
    # (reconcile) and for expired leases to requeue (reap).
    reconcile_interval_s: float = Field(15.0, gt=0)
    reap_interval_s: float = Field(10.0, gt=0)
    # A queued job is re-published when its message is missing for this long.
    republish_after_s: float = Field(30.0, ge=0)
    # A queued job that a token could not start (its tenant is at a quota) is looked at again
    # after this long, unless the end of one of the tenant's jobs sends a token sooner.
    held_recheck_s: float = Field(60.0, gt=0)
    # At most one progress write per job per this many seconds.
    progress_interval_s: float = Field(0.5, ge=0)
    # A streaming job's text (its tokens) is written at most once per this many milliseconds,
    # the tokens made meanwhile in one event (scheduler/recorder.py). 0: one write per token.
    token_flush_ms: int = Field(100, ge=0, le=10_000)
    # Stalls: a running job's actor (model server or trainer) that sends no event and answers
    # no liveness ping for this long is stalled: it is killed (the pool starts a replacement),
    # the attempt goes back to the queue, and the lease is no longer renewed for it.
    stall_timeout_s: float = Field(30.0, gt=0, le=3600)
    # `genq up` restarts a child that exits after base * 2^(n-1) seconds (n: its restarts in a
    # row, reset once it has run for a minute), at most the cap.
    restart_backoff_s: float = Field(1.0, ge=0, le=600)
    restart_backoff_max_s: float = Field(30.0, ge=0, le=3600)
    # A worker whose Ray cluster stays unreachable this long stops (releasing its running
    # attempts), so that its supervisor starts it again against the cluster when it is back.
    ray_lost_after_s: float = Field(10.0, gt=0, le=3600)
    # A trainer asked to cancel is killed if it has not stopped after this long.
    cancel_grace_s: float = Field(10.0, gt=0)
    # Transient failures (a lost actor, out of memory, a broker hiccup, a crashed worker) wait
    # base * 2^(attempt-1) seconds, capped, with jitter, before the next attempt.
    retry_backoff_base_s: float = Field(2.0, ge=0)
    retry_backoff_max_s: float = Field(300.0, ge=0)
    # A database error that says nothing about the work (a lost connection) is retried inside
    # the attempt for up to this long; then the attempt is released to the queue, and that
    # release does not use up one of the job's attempts.
    transient_retry_s: float = Field(10.0, ge=0, le=600)

    # Fair share between tenants (core/fairness.py): `usage` starts the tenant furthest below
    # its weighted share of GPU-seconds (decayed, running jobs included); `starts` counts job
    # starts instead (every job costs the same).
    fair_share: Literal["usage", "starts"] = "usage"
    # Usage halves every this many seconds, so old usage fades (Slurm's default is 7 days;
    # ours is 1 day: a team's heavy day is forgiven by the next one).
    fair_share_half_life_s: float = Field(86400.0, ge=60, le=366 * 86400)
    # Preemption (core/preemption.py): a queued job of a higher priority class that has waited
    # this long asks a running training job of a lower class to stop at its next checkpoint.
    # `preemption=false` turns it off.
    preemption: bool = True
    preempt_after_s: float = Field(60.0, gt=0, le=86400)
    # How long a preempted job may take to reach its checkpoint before it is stopped (it then
    # resumes from its last checkpoint); as Slurm's KillWait and Kubernetes' grace period.
    preemption_grace_s: float = Field(30.0, gt=0, le=3600)
    # A job is preempted at most this many times; after that it runs to its end.
    max_preemptions: int = Field(3, ge=0, le=100)

    # Webhooks: allow loopback/private/link-local targets (local development only).
    webhook_allow_private: bool = False
    # Each send: connect+read timeout; attempts per message; backoff between attempts.
    webhook_timeout_s: float = Field(10.0, gt=0, le=120)
    webhook_max_attempts: int = Field(8, ge=1, le=50)
    webhook_backoff_base_s: float = Field(5.0, ge=0)
    webhook_backoff_max_s: float = Field(3600.0, ge=0)
    # How often the periodic scheduler looks for webhook messages to send.
    webhook_poll_s: float = Field(1.0, gt=0)

    # Retention (core/retention.py): days the outputs (files, checkpoints, unregistered model
    # folders), the events and the rows of finished jobs are kept, counted from when each job
    # finished. 0 or unset: kept forever (the default). A tenant may have its own
    # (PATCH /v1/tenants/{id}). Registered models and data sets are never expired.
    retain_outputs_days: int | None = Field(None, ge=0, le=36500)
    retain_events_days: int | None = Field(None, ge=0, le=36500)
    retain_jobs_days: int | None = Field(None, ge=0, le=36500)
    # How often the periodic scheduler runs the retention pass, and the most jobs, events or
    # models one of its transactions touches (each batch commits on its own, so no lock is
    # held for long).
    retention_interval_s: float = Field(3600.0, gt=0, le=7 * 86400)
    retention_batch_size: int = Field(500, ge=1, le=100_000)

    # Celery worker: thread-pool size (tasks only wait on Ray).
    worker_concurrency: int = Field(8, ge=1, le=512)
    # Celery worker processes `genq up` runs, each with `worker_concurrency` threads (unset:
    # one per 4 CPU cores of this machine, at least 1 and at most 4). A worker spends about
    # 7 ms of Python per short job (the claim, the Ray call, the finish) under its one
    # interpreter lock, so one process caps such jobs near 140 a second however many cores
    # the machine has; each process more is another Ray driver, and takes cores the API,
    # the model servers and a local database also need (bench/README.md). `genq worker` is
    # one process: a cluster runs more of them.
    worker_processes: int | None = Field(None, ge=1, le=64)
    # How often each worker writes its cluster snapshot (workers, Ray nodes, warm models) to
    # Redis for the dashboard; the snapshot expires after three of these.
    cluster_snapshot_interval_s: float = Field(5.0, gt=0, le=300)
    # The API server (gunicorn): processes and threads per process (each open event stream
    # holds a thread).
    api_workers: int = Field(2, ge=1, le=64)
    api_threads: int = Field(16, ge=1, le=1024)
    # Event streams one API process keeps open at once (default: half its threads, so that
    # the other half always answer); one more is a 503 with Retry-After.
    api_max_streams: int | None = Field(None, ge=1, le=1024)
    # What the Ray node started here declares: the local head of `genq up`, or `genq node`
    # (unset: `genq up` lets Ray count; `genq node` counts this machine's GPUs, and a head
    # declares no CPU so that no model runs beside the GCS).
    ray_num_cpus: int | None = Field(None, ge=0, le=4096)
    ray_num_gpus: int | None = Field(None, ge=0, le=1024)
    # GPU memory (GB) that node declares as the custom resource `gpu_memory_gb`, which training
    # jobs that ask for `resources.gpu_memory_gb` reserve. Unset: `genq up` declares none,
    # `genq node` the total memory of the GPUs it declares.
    ray_gpu_memory_gb: float | None = Field(None, gt=0, le=1_000_000)
    # Start Ray's dashboard with the local head of `genq up` or `genq node --head`.
    ray_dashboard: bool = False
    # This machine's address on the cluster network: the Ray node that `genq node` or
    # `genq worker` starts binds to it, and drivers connect from it. Unset: Ray picks one.
    node_ip: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9.:-]{0,252}$")
    # Whether `genq worker` starts a Ray node of its own (no CPU, no GPU) that joins
    # GENQ_RAY_ADDRESS: a driver reaches Ray only through a raylet on its own machine.
    # auto: start one unless a Ray node already runs on this machine; start: always;
    # local: never (a node of this machine is used, as under `genq up`).
    worker_ray_node: Literal["auto", "start", "local"] = "auto"
    # Port of the head that `genq node --head` starts (its GCS; other nodes join <ip>:port).
    ray_head_port: int = Field(6379, ge=1, le=65535)
    # Model servers (workers/server.py, workers/pool.py). Generate jobs with the same batch
    # key share a batch, which starts once no more have arrived for this long (at most ten
    # such waits after its first job).
    batch_max_wait_ms: float = Field(50.0, ge=0, le=10_000)
    # Model calls are padded to at least this many rows so that a job's outputs are the same
    # bits alone and in any batch (the kernels change algorithm below a batch size; 16 is
    # measured on CPU). 1: no padding, faster alone, identity not guaranteed.
    batch_min_rows: int = Field(16, ge=1, le=4096)
    # The most rows one batch of a model server holds (images; for language models, jobs
    # decoded together): lower than a family's own limit to bound a server's memory. 0: each
    # family's limit (transformers 64, ddpm 64, gan and vae 256, diffusers 16).
    batch_max_rows: int = Field(0, ge=0, le=4096)
    # A model server with no job for this long unloads (frees its GPU). Unset: never.
    model_idle_unload_s: float | None = Field(900.0, gt=0)
    # The last replica of a model (1 -> 0) unloads after this long without a job (never longer
    # than model_idle_unload_s); a model's policy may set both (PATCH /v1/models/{name}).
    model_last_idle_unload_s: float | None = Field(300.0, gt=0)
    # The replica scaler (scheduler/scaling.py) reads each model's queued and running jobs this
    # often, and lowers a model's replica count only after this long of lower need (never less
    # than one interval: the window is never shorter than what it looks back on).
    scale_interval_s: float = Field(5.0, ge=0.5, le=30)
    scale_cooldown_s: float = Field(60.0, ge=0, le=3600)
    # GPU memory each node may give to warm model servers (their families' gpu_memory_gb);
    # starting one more evicts the least recently used idle servers there. Unset: no budget.
    gpu_memory_budget_gb: float | None = Field(None, gt=0)

    # Rate limits (api/ratelimits.py), counted in the broker's Redis so that every API process
    # shares them. Each non-admin key, and each tenant as a whole, may make `burst` requests in
    # any window of burst/per_s seconds (at least 1 s): `per_s` sustained. An admin sets a
    # tenant's own with PATCH /v1/tenants/{id}. Admin keys are not limited.
    rate_limits: bool = True
    rate_limit_per_s: float = Field(20.0, gt=0, le=100_000)
    rate_limit_burst: int = Field(40, ge=1, le=1_000_000)
    tenant_rate_limit_per_s: float = Field(50.0, gt=0, le=100_000)
    tenant_rate_limit_burst: int = Field(100, ge=1, le=1_000_000)
    # Requests with a wrong, expired or revoked key (and failed dashboard logins) from one
    # client address per minute; past it every request from there is a 429 until it falls.
    auth_failures_per_min: int = Field(30, ge=1, le=100_000)
    # How old an answer to a poll (GET /v1/jobs/{id}) may be: the rendered job is kept in
    # Redis, and the queue figures behind its queue_position and eta_s in the API process, for
    # at most this long all told (api/polling.py). A change made through the API itself shows
    # at once. 0: every poll reads SQL.
    status_staleness_s: float = Field(1.0, ge=0, le=1)
    # How long an API process trusts an API key it has checked (api/auth.py): a key revoked
    # elsewhere stops working within this long, one revoked through this process at once.
    # 0: every request reads the key.
    auth_cache_s: float = Field(1.0, ge=0, le=1)
    # Event streams one tenant may hold in one API process (default: half of the process's
    # streams, at least 1), so that one tenant cannot take them all.
    api_max_streams_per_tenant: int | None = Field(None, ge=1, le=1024)

    # Limits on what clients may send: the largest request body (bytes; 413 above it).
    max_request_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    # Data set uploads (POST /v1/datasets): the upload itself, the entries of an image zip,
    # their total size once unpacked, and the pixels of any one image.
    dataset_max_bytes: int = Field(200 * 1024 * 1024, ge=1024)
    dataset_max_entries: int = Field(50_000, ge=1)
    dataset_max_unpacked_bytes: int = Field(1024 * 1024 * 1024, ge=1024)
    # One entry of a zip once unpacked, and the longest entry path (characters) it may have.
    dataset_max_entry_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    dataset_max_path_chars: int = Field(1024, ge=16, le=3072)
    dataset_max_pixels: int = Field(16 * 1024 * 1024, ge=1)
    # Input pictures (`POST /v1/files`, for image-to-image and inpainting): bytes per file.
    input_max_bytes: int = Field(
        20 * 1024 * 1024,
        ge=1024,
        le=512 * 1024 * 1024,
        description="Largest input picture POST /v1/files takes (PNG, JPEG or WebP), in bytes.",
    )
    # The largest `limit` of a list.
    page_size_max: int = Field(200, ge=1, le=10_000)
    # Synchronous calls. `POST /v1/jobs` with `Prefer: wait=N` waits at most this many
    # seconds (`Prefer: wait` alone: 60, or this if lower); an OpenAI-compatible call waits
    # for its job this long, then answers 504 naming the job. Each waiting call holds one of
    # the process's stream slots (api_max_streams).
    sync_wait_max_s: int = Field(300, ge=1, le=3600)
    openai_wait_s: int = Field(600, ge=1, le=24 * 3600)
    # POST /v1/batches: jobs per batch. OpenAI batch files: lines per file, bytes per file.
    batch_max_jobs: int = Field(1000, ge=1, le=10_000)
    openai_batch_max_lines: int = Field(50_000, ge=1, le=1_000_000)
    openai_file_max_bytes: int = Field(200 * 1024 * 1024, ge=1024)
    # POST /v1/models (admin): folders, separated by ':', under which a pretrained model may be
    # registered by its absolute path. Unset: any folder this machine can read. A relative path
    # is always taken under the artifact root.
    pretrained_roots: str = ""
    # Log level of every genq process.
    log_level: str = "INFO"
    # Log lines of every genq process (API, Celery worker, periodic scheduler, Ray model
    # servers and trainers): `text`, or `json`: one object per line with time, level, logger,
    # message, process, node and, on lines about a job, job_id, tenant, attempt, request_id.
    log_format: Literal["text", "json"] = "text"
    # Health (GET /v1/health/ready): each Celery worker and the periodic scheduler write a
    # heartbeat to Redis this often; one missing for three of these counts as down.
    health_heartbeat_interval_s: float = Field(5.0, gt=0, le=300)

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        if self.database_url is None:
            self.database_url = f"sqlite:///{(self.var_dir / 'genq.db').resolve()}"
        if self.artifact_root is None:
            self.artifact_root = self.var_dir / "artifacts"
        self.artifact_root = self.artifact_root.resolve()
        for per_s, burst, name in (
            (self.rate_limit_per_s, self.rate_limit_burst, "rate_limit"),
            (self.tenant_rate_limit_per_s, self.tenant_rate_limit_burst, "tenant_rate_limit"),
        ):
            if burst / per_s > 3600:
                raise ValueError(f"{name}_burst / {name}_per_s must be at most 3600 seconds")
        if self.cache_dir is None:
            self.cache_dir = self.var_dir / "cache"
        self.cache_dir = self.cache_dir.resolve()
        if self.heartbeat_interval_s >= self.lease_ttl_s:
            raise ValueError("heartbeat_interval_s must be shorter than lease_ttl_s")
        return self

    @property
    def db_url(self) -> str:
        assert self.database_url is not None
        return self.database_url

    @property
    def artifacts(self) -> Path:
        assert self.artifact_root is not None
        return self.artifact_root

    @property
    def cache_path(self) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir

    @property
    def pretrained_root_paths(self) -> list[Path]:
        return [Path(p).resolve() for p in self.pretrained_roots.split(os.pathsep) if p]

    @property
    def worker_process_count(self) -> int:
        """The Celery worker processes `genq up` runs: the setting, else one per 4 CPUs this
        process may run on, from 1 to 4."""
        if self.worker_processes is not None:
            return self.worker_processes
        return max(1, min(4, len(os.sched_getaffinity(0)) // 4))

    @property
    def embedded_redis_socket(self) -> Path:
        return (self.var_dir / "redis.sock").resolve()

    @property
    def broker_url(self) -> str:
        """The URL Celery and the enqueue path use: the configured Redis or the embedded one."""
        if self.redis_url:
            return self.redis_url
        return f"redis+socket://{self.embedded_redis_socket}"

    def read_secret_key(self) -> str:
        """The configured secret key, or one generated once and kept under var_dir."""
        if self.secret_key:
            return self.secret_key
        import secrets

        path = self.var_dir / "secret_key"
        if path.exists():
            return path.read_text().strip()
        self.var_dir.mkdir(parents=True, exist_ok=True)
        # Several processes (gunicorn workers, the Celery worker) may get here at once on a
        # first start: write the key whole to a file of our own, then link it into place,
        # which only one of them can do; the others read the winner's key.
        own = path.with_name(f"secret_key.{os.getpid()}.{secrets.token_hex(4)}")
        own.write_text(secrets.token_urlsafe(48))
        own.chmod(0o600)
        try:
            os.link(own, path)
        except FileExistsError:
            pass
        finally:
            own.unlink()
        return path.read_text().strip()
