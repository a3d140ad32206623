"""The Celery worker: the `run_job` task and the `genq worker` entry point.

The task body is `Runner.run` (and `scheduler.webhooks.deliver` on the `webhooks` queue); the
worker runs a thread pool because tasks only wait on Ray.
Before it consumes anything the worker checks that the broker's visibility timeout and the
lease settings agree, joins the Ray cluster with a node of its own when none runs on its
machine (scheduler/raynode.py), and checks that Ray answers (waiting while the head restarts).

SIGTERM (and Ctrl-C) stops it within seconds: Celery's warm shutdown waits for the running
tasks, and each gives its job back to the queue at once (`Runner.stopping`). A worker whose Ray
head stops answering for GENQ_RAY_LOST_AFTER_S stops itself the same way, to be started again
by its supervisor (a Ray driver cannot join a new cluster in the same process).
"""

from __future__ import annotations

import logging
import os
import signal

import ray
from celery import Celery
from celery.signals import worker_ready, worker_shutting_down

from core.db import Database
from core.settings import Settings
from scheduler.broker import QUEUES, RUN_JOB_TASK, make_celery, record_dropped
from scheduler.checks import register as register_checks
from scheduler.enqueue import Publisher
from scheduler.heartbeats import WorkerHeartbeat
from scheduler.raynode import (
    RayWatch,
    start_worker_node,
    wait_for_gcs,
    wait_for_local_raylet,
)
from scheduler.runner import Runner
from scheduler.scaling import Scaler
from scheduler.snapshot import SnapshotWriter
from scheduler.webhooks import register as register_webhooks

log = logging.getLogger(__name__)


# How long a starting worker waits for its Ray head (which may be restarting).
RAY_WAIT_S = 120.0


class InconsistentSettingsError(ValueError):
    pass


def check_settings(settings: Settings) -> None:
    """A message is re-delivered after the visibility timeout; the lease must expire (and the
    reaper act) well before that, or a crashed job would wait for the broker instead."""
    if settings.visibility_timeout_s <= 2 * settings.lease_ttl_s:
        raise InconsistentSettingsError(
            f"GENQ_VISIBILITY_TIMEOUT_S ({settings.visibility_timeout_s}) must be more than twice "
            f"GENQ_LEASE_TTL_S ({settings.lease_ttl_s})"
        )
    if settings.heartbeat_interval_s * 2 > settings.lease_ttl_s:
        raise InconsistentSettingsError(
            "GENQ_HEARTBEAT_INTERVAL_S must be at most half of GENQ_LEASE_TTL_S, so that one "
            "missed heartbeat does not lose the lease"
        )


def create_worker(settings: Settings) -> tuple[Celery, Runner]:
    app = make_celery(settings)
    # Anything on a queue that is not a well-formed genq task is dropped, not fatal.
    app.conf.worker_consumer = "scheduler.intake:GuardedConsumer"
    database = Database(settings)
    runner = Runner(settings, database, Publisher(settings, app))

    @app.task(name=RUN_JOB_TASK, acks_late=True, ignore_result=True)
    def run_job(job_id: str) -> str:
        queue = (run_job.request.delivery_info or {}).get("routing_key")
        outcome = runner.run(job_id, queue)
        if outcome == "skipped:missing":  # a well-formed message for a job that never existed
            record_dropped(runner.publisher.redis, "unknown_job", f"no job {job_id}", queue)
        return outcome

    register_webhooks(app, settings, database)
    register_checks(app, settings, database, runner)

    def on_shutdown(**_: object) -> None:
        runner.stopping.set()

    # weak=False: the receiver is a closure that nothing else holds.
    worker_shutting_down.connect(on_shutdown, weak=False)
    return app, runner


def main(settings: Settings, queues: tuple[str, ...] = QUEUES, hostname: str = "") -> None:
    check_settings(settings)
    if settings.ray_address:
        wait_for_gcs(settings.ray_address, RAY_WAIT_S)
        if settings.worker_ray_node == "local":  # e.g. the head of `genq up`, restarting
            wait_for_local_raylet(settings.ray_address, RAY_WAIT_S)
    node = start_worker_node(settings)  # before any thread starts: it forks
    try:
        app, runner = create_worker(settings)
        runner.connect_ray()
        _run(app, runner, settings, queues, hostname)
    finally:
        if node is not None:
            node.stop()


def _run(
    app: Celery, runner: Runner, settings: Settings, queues: tuple[str, ...], hostname: str
) -> None:
    argv = [
        "worker",
        f"--queues={','.join(queues)}",
        "--pool=threads",
        f"--concurrency={settings.worker_concurrency}",
        f"--loglevel={settings.log_level}",
        "--without-gossip",
        "--without-mingle",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    if settings.log_format == "json":  # no text banner among the JSON lines
        argv.insert(0, "--quiet")
    log.info("starting the Celery worker on queues %s", ",".join(queues))
    # The dashboard's view of this worker and of Ray (scheduler/snapshot.py).
    snapshots = SnapshotWriter(settings, runner.publisher.redis, hostname)
    snapshots.start()

    def on_ray_lost() -> None:
        runner.stopping.set()
        os.kill(os.getpid(), signal.SIGTERM)  # Celery's warm shutdown, as from a supervisor

    watch = RayWatch(ray.get_runtime_context().gcs_address, settings.ray_lost_after_s, on_ray_lost)
    watch.start()
    # Replicas per model from each model's queue (scheduler/scaling.py).
    scaler = Scaler(settings, runner)
    scaler.start()
    # Readiness (scheduler/heartbeats.py): from the moment the consumer takes messages until
    # the worker starts shutting down.
    heartbeat = WorkerHeartbeat(settings, runner.publisher.redis, hostname, queues)
    worker_ready.connect(lambda **_: heartbeat.start(), weak=False)
    worker_shutting_down.connect(lambda **_: heartbeat.stop(), weak=False)
    try:
        app.worker_main(argv)
    finally:
        watch.stop()
        heartbeat.stop()
        scaler.stop()
        snapshots.stop()
