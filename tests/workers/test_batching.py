"""Cross-job batching and the model pool on a real local Ray (declared, fake GPU), with a real
tiny ddpm model: jobs batched together get the bytes they get alone, progress fans out, a
cancel takes one job out of a running batch, incompatible jobs do not join, a batch that fails
is rerun job by job; and with a tiny gan model (its processes start without diffusers), where
the family does not matter: idle servers unload, the least recently used server is evicted
under a memory budget, small servers share one GPU, and 4 jobs through a real `genq up` run as
one batch."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

ray = pytest.importorskip("ray")
torch = pytest.importorskip("torch")

from core.errors import ModelError  # noqa: E402
from core.events import Output, Progress  # noqa: E402
from tests.support.model_servers import run_job, run_together, shared_with  # noqa: E402
from tests.support.stackproc import StackProcess  # noqa: E402
from workers.actors import model_server_name  # noqa: E402
from workers.batching import Batcher  # noqa: E402
from workers.families.base import CanceledError, Family, RunContext  # noqa: E402
from workers.pool import get_pool  # noqa: E402
from workers.registry import get_family  # noqa: E402
from workers.replicas import ALIVE_TRUST_S  # noqa: E402
from workers.routing import get_model_server  # noqa: E402
from workers.server import ServingOptions  # noqa: E402

# The module starts a real Ray of its own (tests/workers/conftest.py): real processes,
# marker `stack`.
pytestmark = [pytest.mark.stack, pytest.mark.usefixtures("ray_four_cpus")]

DDPM, GAN = get_family("ddpm"), get_family("gan")
# A long wait makes "these concurrent jobs share one batch" certain on a busy 2-core machine.
BATCHING = ServingOptions(batch_max_wait_ms=2000, idle_unload_s=None)


@pytest.fixture(scope="module")
def model(tiny_ddpm: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The tiny ddpm model folder of tests/conftest.py (seeded random weights, as `train`
    would save it)."""
    return tiny_ddpm


def images(events: list[Any]) -> list[bytes]:
    return [e.data for e in events if isinstance(e, Output)]


def is_gone(model_id: str) -> bool:
    try:
        ray.get_actor(model_server_name(model_id), namespace="genq")
    except ValueError:
        return True
    return False


def test_batched_jobs_get_the_bytes_they_get_alone(model: tuple[str, dict]) -> None:
    server = get_model_server("b-ident", DDPM, *model, BATCHING)
    jobs = {
        f"j{i}": {"label": i, "num_images": n, "steps": 12, "seed": 40 + 7 * i}
        for i, n in enumerate([1, 2, 1, 3])
    }
    jobs["j4"] = {**jobs["j0"], "sampler": "ddim", "guidance_scale": 3.0}  # another key
    together = run_together(server, jobs)
    for job_id in ["j0", "j1", "j2", "j3"]:
        assert shared_with(together[job_id]) == 4  # one batch of the four compatible jobs
        # Progress fans out: every job sees every step.
        steps = [e.step for e in together[job_id] if isinstance(e, Progress)]
        assert steps == list(range(1, 13))
    assert shared_with(together["j4"]) == 1  # different sampler and guidance: ran alone

    for job_id, params in jobs.items():
        alone = images(run_job(server, f"{job_id}-alone", params))
        assert len(alone) == params["num_images"]
        assert images(together[job_id]) == alone, job_id
    every = [png for events in together.values() for png in images(events)]
    assert len(set(every)) == len(every)  # different seeds, different images
    stats = ray.get(server.info.remote())["batching"]
    assert stats["batches"] == 1 and stats["batched_jobs"] == 4 and stats["largest_batch_jobs"] == 4
    ray.kill(server)


def test_a_cancel_takes_one_job_out_of_a_running_batch(model: tuple[str, dict]) -> None:
    server = get_model_server("b-cancel", DDPM, *model, BATCHING)
    jobs = {f"c{i}": {"label": i, "num_images": 1, "steps": 200, "seed": i} for i in range(3)}
    results: dict[str, Any] = {}

    def consume(job_id: str) -> None:
        events = []
        try:
            for ref in server.generate.remote(job_id, jobs[job_id]):
                events.append(ray.get(ref))
                if job_id == "c0" and isinstance(events[-1], Progress) and events[-1].step == 5:
                    assert ray.get(server.cancel.remote("c0")) is True
            results[job_id] = events
        except CanceledError as exc:
            results[job_id] = exc

    threads = [threading.Thread(target=consume, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(results["c0"], CanceledError)
    for job_id in ("c1", "c2"):
        assert shared_with(results[job_id]) == 3
        assert [e.step for e in results[job_id] if isinstance(e, Progress)][-1] == 200
        # Leaving the batch changed nothing for the others: the bytes they get alone.
        assert images(results[job_id]) == images(run_job(server, f"{job_id}-alone", jobs[job_id]))
    assert ray.get(server.info.remote())["active_jobs"] == []
    ray.kill(server)


class FailingInBatches:
    """A model (the family interface) whose batches fail and whose jobs alone succeed unless
    asked to fail: what the batcher does with a failed batch."""

    def __init__(self) -> None:
        self.batch_calls = 0

    def generate(self, params: dict[str, Any], ctx: RunContext) -> Iterator[Any]:
        yield Progress(1, 1)
        if params.get("poison"):
            raise RuntimeError("this job cannot be drawn")
        yield Output("out.txt", "text", "text/plain", str(params["label"]).encode())

    def generate_batch(self, jobs: list[tuple[dict, RunContext]]) -> Iterator[Any]:
        self.batch_calls += 1
        yield None, Progress(1, 1)
        raise RuntimeError("the batch broke")


class LabelParams(BaseModel):
    label: int = 0
    poison: bool = False


def test_a_failed_batch_is_rerun_job_by_job() -> None:
    family = Family(
        name="failing",
        description="batches that fail",
        implementation="tests.workers.test_batching",
        generate_params=LabelParams,
        max_batch_size=8,
        batch_key=lambda p: "all",
    )
    model = FailingInBatches()
    batcher = Batcher(model, family, max_wait_s=2.0, min_rows=1)
    labels = {"ok-1": {"label": 1}, "bad": {"label": 2, "poison": True}, "ok-3": {"label": 3}}
    requests = {
        j: batcher.request(j, p, RunContext(job_id=j, device="cpu")) for j, p in labels.items()
    }
    outcome: dict[str, Any] = {}

    def consume(job_id: str) -> None:
        try:
            outcome[job_id] = list(batcher.run(requests[job_id]))
        except Exception as exc:
            outcome[job_id] = exc

    threads = [threading.Thread(target=consume, args=(j,)) for j in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert model.batch_calls == 1  # the fault fired: the three ran as one batch, which raised
    assert batcher.stats.batches == 1 and batcher.stats.solo_jobs == 3
    assert [e.data for e in outcome["ok-1"] if isinstance(e, Output)] == [b"1"]
    assert [e.data for e in outcome["ok-3"] if isinstance(e, Output)] == [b"3"]
    assert isinstance(outcome["bad"], ModelError)
    assert "this job cannot be drawn" in outcome["bad"].detail


def test_an_idle_server_unloads_and_the_next_job_starts_a_fresh_one(
    tiny_gan: tuple[str, dict],
) -> None:
    quick = ServingOptions(idle_unload_s=0.5)
    server = get_model_server("b-idle", GAN, *tiny_gan, quick)
    params = {"num_images": 1, "seed": 1}
    first = images(run_job(server, "i1", params))
    looks = 0
    while not is_gone("b-idle") and looks < 600:
        looks += 1
        time.sleep(0.1)
    assert is_gone("b-idle"), "the idle server did not unload"
    again = get_model_server("b-idle", GAN, *tiny_gan, quick)
    assert again._actor_id != server._actor_id
    assert images(run_job(again, "i2", params)) == first
    assert ray.get(again.info.remote())["jobs_served"] == 1
    ray.kill(again)


def test_lru_eviction_under_a_budget_and_small_servers_share_one_gpu(
    tiny_gan: tuple[str, dict],
) -> None:
    # gan declares 0.25 GPU and 1 GB: a 2.5 GB budget holds two servers per node.
    budget = ServingOptions(gpu_memory_budget_gb=2.5, idle_unload_s=None)
    a = get_model_server("lru-a", GAN, *tiny_gan, budget)
    b = get_model_server("lru-b", GAN, *tiny_gan, budget)
    info_a, info_b = ray.get([a.info.remote(), b.info.remote()])
    assert info_a["resources"]["GPU"] == 0.25 and info_b["resources"]["GPU"] == 0.25
    assert info_a["gpu_ids"] == info_b["gpu_ids"] == ["0"]  # both on the one declared GPU

    # A worker process asks the pool again once its handle is ALIVE_TRUST_S old; only then
    # does the pool see the use (its LRU order is that stale at most).
    time.sleep(ALIVE_TRUST_S)
    assert get_model_server("lru-a", GAN, *tiny_gan, budget)._actor_id == a._actor_id  # used last
    c = get_model_server("lru-c", GAN, *tiny_gan, budget)
    assert ray.get(c.info.remote())["family"] == "gan"
    assert is_gone("lru-b") and not is_gone("lru-a")
    evicted = [e["model_id"] for e in ray.get(get_pool().info.remote())["evictions"]]
    assert evicted == ["lru-b"]
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(b.info.remote())
    assert images(run_job(a, "a1", {"num_images": 1, "seed": 5}))
    ray.kill(a)
    ray.kill(c)


@pytest.mark.stack
def test_four_concurrent_jobs_through_the_stack_run_as_one_batch(tmp_path: Path) -> None:
    stack = StackProcess(
        tmp_path / "var", {"GENQ_RAY_NUM_CPUS": "2", "GENQ_BATCH_MAX_WAIT_MS": "2000"}
    )
    try:
        stack.start()
        params = {"preset": "tiny", "steps": 4, "batch_size": 8, "checkpoint_every": 4}
        body = {"kind": "train", "family": "gan", "dataset": "digits", "name": "d"}
        trained = stack.wait(stack.submit({**body, "params": params})["id"])
        assert trained["state"] == "succeeded", trained
        ids = [
            stack.submit(
                {
                    "kind": "generate",
                    "model": "d:1",
                    "params": {"label": i, "num_images": 1, "seed": i},
                }
            )["id"]
            for i in range(4)
        ]
        done = [stack.wait(job_id) for job_id in ids]
        assert [j["state"] for j in done] == ["succeeded"] * 4, done
        assert [j["metrics"]["batch_jobs"] for j in done] == [4, 4, 4, 4]
        assert all(len(j["outputs"]) == 1 for j in done)
        code, _ = stack.stop()
        assert code == 0, stack.log_text()[-3000:]
    finally:
        stack.kill()
