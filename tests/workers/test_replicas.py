"""Replicas and autoscaling on a real multi-node Ray started by the test (ray.cluster_utils: a
head and three nodes on this machine, each declaring one GPU and 8 GB of GPU memory), with the
real scaler reading real SQL, the real runner and tiny models: gan ones (their processes start
without diffusers) where the family does not matter, ddpm where a batch must run long enough to
be killed mid-way:

- a burst on one model grows it to max_replicas, one per node (one per GPU), then back to
  min_replicas once idle;
- two models under load share the GPUs by their declared memory (a node's budget holds one
  replica of each);
- killing a replica while it runs a batch loses no job: its jobs run again on a live replica,
  and the pool replaces it.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

ray = pytest.importorskip("ray")
pytest.importorskip("torch")

import migrations  # noqa: E402
from core.catalog import register_model  # noqa: E402
from core.db import Database  # noqa: E402
from core.jobs import NewJob, create_job  # noqa: E402
from core.keys import get_or_create_tenant  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.states import JobKind, JobState  # noqa: E402
from core.tables import Job, JobEvent, Model  # noqa: E402
from scheduler.enqueue import Publisher  # noqa: E402
from scheduler.runner import MOVED_NOTICE, Runner  # noqa: E402
from scheduler.scaling import Scaler  # noqa: E402
from tests.support.ray_cluster import one_thread_workers  # noqa: E402
from workers.pool import get_pool  # noqa: E402

# The module starts a real Ray of its own: real processes, marker `stack`.
pytestmark = pytest.mark.stack

NODES = 3
LOOK_S = 0.1


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    from ray.cluster_utils import Cluster

    with one_thread_workers():
        nodes = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 0, "num_gpus": 0, "include_dashboard": False},
        )
        for _ in range(NODES):  # each its own raylet: a node with one (declared) GPU
            nodes.add_node(num_cpus=4, num_gpus=1, resources={"gpu_memory_gb": 8})
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, namespace="genq", log_to_driver=False)
    yield nodes
    ray.shutdown()
    nodes.shutdown()


@pytest.fixture
def stack(
    cluster: Any,
    tmp_path: Path,
    redis_db_url: str,
    tiny_gan: tuple[str, dict],
    tiny_ddpm: tuple[str, dict],
) -> Iterator[dict[str, Any]]:
    """SQLite, Redis, a runner and a scaler on the module's Ray; two tiny gan models (alpha,
    beta) and a tiny ddpm one (slow)."""
    redis_url = redis_db_url
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        var_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'genq.db'}",
        redis_url=redis_url,
        retry_backoff_base_s=0,
        scale_cooldown_s=0,  # and an interval of 0.5 s: lower after 0.5 s of lower need
        scale_interval_s=0.5,
        gpu_memory_budget_gb=2.5,  # two gan servers (1 GB each) per node, or one ddpm (2 GB)
    )
    migrations.upgrade(settings)
    database = Database(settings)
    publisher = Publisher(settings)
    runner = Runner(settings, database, publisher)
    ids, families = {}, {}
    with database.transaction() as session:
        tenant = get_or_create_tenant(session, "acme")
        for name, (folder, config) in (
            ("alpha", tiny_gan),
            ("beta", tiny_gan),
            ("slow", tiny_ddpm),
        ):
            shutil.copytree(folder, settings.artifacts / "models" / name)
            model = register_model(
                session,
                tenant_id=tenant.id,
                name=name,
                family=config["family"],
                path=f"models/{name}",
                config=config,
            )
            ids[name], families[name] = model.id, config["family"]
        tenant_id = tenant.id
    yield {
        "settings": settings,
        "database": database,
        "runner": runner,
        "scaler": Scaler(settings, runner),
        "models": ids,
        "families": families,
        "tenant_id": tenant_id,
    }
    for server in ray.get(get_pool().info.remote())["servers"]:
        with contextlib.suppress(ValueError):  # one killed by a test may still be listed
            ray.kill(ray.get_actor(server["replica"], namespace="genq"))
    ray.kill(get_pool())
    publisher.close()
    database.dispose()


def wait_until(check: Any, what: str, limit: int = 1800) -> Any:
    for _ in range(limit):
        value = check()
        if value:
            return value
        time.sleep(LOOK_S)
    raise AssertionError(f"timed out waiting for {what}")


def set_policy(stack: dict[str, Any], name: str, **policy: Any) -> None:
    with stack["database"].transaction() as session:
        session.execute(
            update(Model).where(Model.id == stack["models"][name]).values(serving=policy)
        )


def submit(stack: dict[str, Any], name: str, n: int, **params: Any) -> list[str]:
    with stack["database"].transaction() as session:
        return [
            create_job(
                session,
                NewJob(
                    tenant_id=stack["tenant_id"],
                    kind=JobKind.GENERATE,
                    family=stack["families"][name],
                    queue="generate",
                    params={"seed": i, "label": i % 10, **params},
                    model_id=stack["models"][name],
                ),
            )[0].id
            for i in range(n)
        ]


def replicas(model_id: str, ready: bool = True) -> list[dict[str, Any]]:
    servers = ray.get(get_pool().info.remote())["servers"]
    return [s for s in servers if s["model_id"] == model_id and (s["ready"] or not ready)]


def test_a_burst_grows_to_max_replicas_one_per_gpu_then_back_to_min(
    stack: dict[str, Any],
) -> None:
    alpha = stack["models"]["alpha"]
    set_policy(
        stack,
        "alpha",
        min_replicas=1,
        max_replicas=3,
        target_jobs_per_replica=2,
        idle_unload_s=2,
        last_idle_unload_s=1,
    )
    submit(stack, "alpha", 12)  # a burst: 12 queued jobs want 6 replicas, capped at 3
    assert stack["scaler"].tick() == {alpha: 3}
    grown = wait_until(lambda: len(replicas(alpha)) == 3 and replicas(alpha), "3 replicas")
    # One per node, so one per GPU (each node declares one).
    assert len({r["node_id"] for r in grown}) == 3
    assert all(r["gpu_ids"] == ["0"] and r["num_gpus"] == 0.25 for r in grown)

    # The burst is over (here: its jobs are gone): the scaler asks for the floor, and the pool
    # unloads the idle replicas above it after idle_unload_s.
    with stack["database"].transaction() as session:
        session.execute(update(Job).values(state=JobState.CANCELED))
    # (Lower only once the lower need has held for the window, one interval here.)
    wait_until(lambda: stack["scaler"].tick() == {alpha: 1}, "the scaler to ask for 1")
    wait_until(lambda: len(replicas(alpha, ready=False)) == 1, "the floor of 1 replica")
    events = [e for e in ray.get(get_pool().info.remote())["events"] if e["model_id"] == alpha]
    assert [e["event"] for e in events] == ["scale-up"] * 3 + ["scale-down"] * 2
    assert all(e["reason"].startswith("idle for 2") for e in events[3:])


def test_two_models_under_load_share_the_gpus_by_declared_memory(stack: dict[str, Any]) -> None:
    for name in ("alpha", "beta"):
        set_policy(stack, name, max_replicas=3, target_jobs_per_replica=1)
        submit(stack, name, 3)
    asked = stack["scaler"].tick()
    assert sorted(asked.values()) == [3, 3]
    ids = stack["models"]
    wait_until(
        lambda: len(replicas(ids["alpha"])) == 3 and len(replicas(ids["beta"])) == 3,
        "3 replicas of each model",
    )
    servers = ray.get(get_pool().info.remote())["servers"]
    by_node: dict[str, list[dict[str, Any]]] = {}
    for server in servers:
        by_node.setdefault(server["node_id"], []).append(server)
    # Each node's 2.5 GB budget holds two 1 GB servers: one of each model, on its one GPU.
    assert len(by_node) == NODES
    for on_node in by_node.values():
        assert sorted(s["model_id"] for s in on_node) == sorted([ids["alpha"], ids["beta"]])
        assert sum(s["memory_gb"] for s in on_node) == 2.0
        assert {tuple(s["gpu_ids"]) for s in on_node} == {("0",)}


def holding_a_batch(model_id: str) -> tuple[Any, dict[str, Any], list[str]] | None:
    """A replica of the model whose own info() says it holds two jobs or more: its handle, its
    row of the pool's info() and the jobs it holds (the pool's view is up to a second old, as
    long as a tiny batch takes)."""
    for row in replicas(model_id):
        try:
            handle = ray.get_actor(row["replica"], namespace="genq")
            held = ray.get(handle.info.remote())["active_jobs"]
        except (ValueError, ray.exceptions.RayActorError):  # gone since the pool's answer
            continue
        if len(held) >= 2:
            return handle, row, held
    return None


def test_killing_a_replica_mid_batch_loses_no_job(stack: dict[str, Any]) -> None:
    slow = stack["models"]["slow"]
    set_policy(stack, "slow", min_replicas=2, max_replicas=2)
    assert stack["scaler"].tick() == {slow: 2}
    first = wait_until(lambda: len(replicas(slow)) == 2 and replicas(slow), "2 replicas")
    runner: Runner = stack["runner"]
    ids: list[str] = []
    victims: list[dict[str, Any]] = []
    hit: list[Job] = []
    # The kill follows the replica's answer at once, but a batch can still end in between: then
    # no job was hit, and the fault is made again on new jobs once the pool has replaced it.
    for _ in range(3):
        batch = submit(stack, "slow", 6, steps=200)
        ids += batch
        threads = [threading.Thread(target=runner.run, args=(job_id,)) for job_id in batch]
        for thread in threads:
            thread.start()
        handle, victim, held = wait_until(lambda: holding_a_batch(slow), "a replica's batch")
        ray.kill(handle, no_restart=True)
        victims.append(victim)
        for thread in threads:
            thread.join()

        def settled(batch: list[str] = batch) -> bool:
            # What the broker would do: a token for each job put back in the queue.
            with stack["database"].transaction() as session:
                rows = session.execute(select(Job.id, Job.state).where(Job.id.in_(batch)))
                states = dict(rows.all())
            for job_id in [j for j, s in states.items() if s == JobState.QUEUED]:
                runner.run(job_id)
            return all(s == JobState.SUCCEEDED for s in states.values())

        wait_until(settled, "every job to succeed", limit=600)
        # A job the victim held and that finished elsewhere was hit: the killed replica could
        # not finish it. (One whose batch ended before the kill finished on the victim.)
        with stack["database"].transaction() as session:
            held_jobs = session.scalars(select(Job).where(Job.id.in_(held)))
            hit = [j for j in held_jobs if j.placement["replica"] != victim["replica"]]
            logs = session.execute(
                select(JobEvent.job_id, JobEvent.data).where(
                    JobEvent.job_id.in_([j.id for j in hit]), JobEvent.type == "log"
                )
            )
            moved = {job_id for job_id, data in logs if data["message"] == MOVED_NOTICE}
        if hit:
            break
        wait_until(lambda: len(replicas(slow)) == 2, "the killed replica replaced")
    assert hit, "no job was running on the killed replica"  # the fault hit jobs
    # Each job hit was either moved to a live replica within its attempt (the server died
    # before its first event) or ran again in a new attempt (it died while the job ran).
    assert all(j.id in moved or j.attempt > 1 for j in hit), [(j.id, j.attempt) for j in hit]
    with stack["database"].transaction() as session:
        jobs = list(session.scalars(select(Job).where(Job.id.in_(ids))))
    assert all(j.state == JobState.SUCCEEDED for j in jobs)
    assert all(j.placement and j.placement["replica"].startswith("model-") for j in jobs)
    # The pool replaced each dead replica: two live ones again, the victims' actors gone.
    again = wait_until(lambda: len(replicas(slow)) == 2 and replicas(slow), "2 replicas again")
    killed = {v["started_at"] for v in victims}
    assert not killed & {r["started_at"] for r in again}
    assert {r["started_at"] for r in first} - killed <= {r["started_at"] for r in again}


@ray.remote(num_cpus=0, resources={"gpu_memory_gb": 8})
class Holder:
    """Something else holding a node's GPU memory (not a genq server: nothing to unload)."""

    def ping(self) -> bool:
        return True


def test_a_job_that_cannot_be_placed_says_what_it_waits_for(stack: dict[str, Any]) -> None:
    from core.catalog import ensure_builtins
    from core.tables import Dataset

    holders = [Holder.remote() for _ in range(NODES)]  # every node's 8 GB is taken
    ray.get([h.ping.remote() for h in holders])
    database: Database = stack["database"]
    with database.transaction() as session:
        ensure_builtins(session)
        digits = session.scalar(select(Dataset.id).where(Dataset.name == "digits"))
        job, _ = create_job(
            session,
            NewJob(
                tenant_id=stack["tenant_id"],
                kind=JobKind.TRAIN,
                family="gan",
                queue="train",
                params={"preset": "tiny", "steps": 2, "batch_size": 4},
                dataset_id=digits,
                target_name="waited",
                num_gpus=0.25,
                gpu_memory_gb=4,
            ),
        )
    runner: Runner = stack["runner"]
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(runner.run(job.id)))
    thread.start()

    def message() -> str:
        with database.transaction() as session:
            return str(session.get(Job, job.id).progress_message)

    wait_until(lambda: message() == "waiting for GPU memory", "the job to say what it waits for")
    with database.transaction() as session:  # what preemption reads (core/preemption.py)
        waiting = session.get(Job, job.id)
        assert waiting.waiting_for == "gpu_memory_gb"
        assert waiting.waiting_since is not None and waiting.started_at is not None
        assert waiting.waiting_since >= waiting.started_at
    ray.kill(holders[0])  # one node's memory frees: the trainer starts there
    thread.join()
    assert outcome == ["succeeded"]
    with database.transaction() as session:
        done = session.get(Job, job.id)
        assert done.placement["replica"] == f"trainer-{job.id}"
        assert done.placement["gpu_ids"] == ["0"]
        assert done.progress_message != "waiting for GPU memory"
        assert done.waiting_for is None and done.waiting_since is None  # placed
    for holder in holders[1:]:
        ray.kill(holder)
