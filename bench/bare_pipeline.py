"""The bare pipeline of issue #19's first target: the hops a genq `echo` job takes, written
without genq. An HTTP endpoint inserts a row and publishes a Celery task; the task calls a warm
Ray actor that echoes the payload and marks the row done. Same Flask, gunicorn configuration,
SQLAlchemy, Redis, Celery settings and Ray as genq, so the ratio between the two is what genq's
own code costs.

    BARE_DATABASE_URL=sqlite:////tmp/bare.db BARE_BROKER_URL=redis://127.0.0.1:6379/13 \\
        gunicorn --workers 2 --worker-class gthread --threads 16 'bench.bare_pipeline:create_app()'
    BARE_DATABASE_URL=... BARE_BROKER_URL=... \\
        celery -A bench.bare_pipeline:worker_app worker --pool=threads --concurrency=8 -Q bare

Several worker processes share one Ray head, as genq's do: start it with `ray start --head`
and give each worker its address as BARE_RAY_ADDRESS (bench/job_path.py does so); each
worker makes its own actor.

`POST /jobs` with a JSON body answers 202 and `{"id", "state"}`; `GET /jobs/<id>` answers the
row. The table, `bare_job`, is created on first use in the same database genq would use (a
SQLite file or PostgreSQL). bench/job_path.py drives it beside genq in one run.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from celery.signals import worker_init
from flask import Flask, jsonify, request
from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError

TASK = "bare.run"
QUEUE = "bare"

metadata = MetaData()
bare_job = Table(
    "bare_job",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("state", String(16), nullable=False),
    Column("payload", Text, nullable=False),
    Column("result", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
)


def database_url() -> str:
    return os.environ.get("BARE_DATABASE_URL", "sqlite:////tmp/bare-pipeline.db")


def broker_url() -> str:
    return os.environ.get("BARE_BROKER_URL", "redis://127.0.0.1:6379/13")


def make_engine(url: str) -> Engine:
    """The ordinary settings for each database: WAL and a busy timeout for SQLite (several
    processes write), a connection pool as large as genq's for PostgreSQL."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def create_table(engine: Engine) -> None:
    """Create `bare_job` if it is missing. gunicorn's workers start together: on PostgreSQL
    two may create it at once, and the one that loses the race finds it made."""
    try:
        metadata.create_all(engine)
    except DBAPIError:
        metadata.create_all(engine)


def make_celery(broker: str) -> Celery:
    """Celery configured as genq's (scheduler/broker.py): JSON, late acks, prefetch 1, a thread
    pool, priority queues on Redis."""
    app = Celery("bare", broker=broker, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        worker_pool="threads",
        worker_redirect_stdouts=False,
        worker_hijack_root_logger=False,
        task_default_queue=QUEUE,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": 3600,
            "priority_steps": list(range(10)),
            "sep": ":",
            "queue_order_strategy": "priority",
        },
    )
    return app


def create_app() -> Flask:
    """The HTTP side: one insert transaction, then the publish (ids only, after the commit)."""
    engine = make_engine(database_url())
    create_table(engine)
    celery = make_celery(broker_url())
    app = Flask("bare_pipeline")

    @app.post("/jobs")
    def submit():  # type: ignore[no-untyped-def]
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return jsonify({"title": "a JSON object is required"}), 422
        job_id = uuid.uuid4().hex
        with engine.begin() as conn:
            conn.execute(
                bare_job.insert().values(
                    id=job_id,
                    state="queued",
                    payload=json.dumps(body),
                    created_at=datetime.now(UTC),
                )
            )
        celery.send_task(TASK, args=[job_id], queue=QUEUE)
        return jsonify({"id": job_id, "state": "queued"}), 202

    @app.get("/jobs/<job_id>")
    def show(job_id: str):  # type: ignore[no-untyped-def]
        with engine.connect() as conn:
            row = conn.execute(select(bare_job).where(bare_job.c.id == job_id)).mappings().first()
        if row is None:
            return jsonify({"title": "not found"}), 404
        return jsonify(
            {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}
        )

    return app


# The worker side. The engine and the actor are made once per worker process, when Celery
# starts it (worker_init), so every task finds the actor warm.
worker_app = make_celery(broker_url())
_worker: dict[str, Any] = {}
_worker_lock = threading.Lock()


def _start_worker() -> dict[str, Any]:
    import ray

    with _worker_lock:
        if not _worker:
            if not ray.is_initialized():
                address = os.environ.get("BARE_RAY_ADDRESS")
                if address:  # a head that several worker processes share, as genq's do
                    ray.init(address=address, log_to_driver=False)
                else:  # "local": a Ray of its own, never a cluster found on the machine
                    ray.init(address="local", include_dashboard=False, log_to_driver=False)

            @ray.remote(num_cpus=0)
            class Echo:
                def echo(self, payload: str) -> str:
                    return payload

            actor = Echo.remote()  # type: ignore[attr-defined]
            ray.get(actor.echo.remote("warm"))
            _worker.update(engine=make_engine(database_url()), actor=actor, ray=ray)
    return _worker


@worker_init.connect
def _on_worker_init(**_: object) -> None:
    _start_worker()


@worker_app.task(name=TASK, acks_late=True, ignore_result=True)
def run(job_id: str) -> None:
    """Read the payload, have the actor echo it, mark the row done."""
    worker = _start_worker()
    engine: Engine = worker["engine"]
    with engine.connect() as conn:
        payload = conn.execute(select(bare_job.c.payload).where(bare_job.c.id == job_id)).scalar()
    if payload is None:
        return
    result = worker["ray"].get(worker["actor"].echo.remote(payload))
    with engine.begin() as conn:
        conn.execute(
            update(bare_job)
            .where(bare_job.c.id == job_id)
            .values(state="done", result=result, finished_at=datetime.now(UTC))
        )
