"""The Ray actors on a real local Ray (2 CPUs and one declared, fake GPU): events stream back
as they are yielded, a model server stays warm, cancels and errors reach the caller as
their own types, a trainer trains, GPU shares are requested where the cluster has GPUs, a
server a job found dead is replaced on the job's word, and a call to a pool killed just before
reaches a new pool.
The trainers and model servers are tiny gan ones: what is tested here is the actors, and a gan
actor's process starts without diffusers."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from ray.exceptions import ActorDiedError, RayTaskError  # noqa: E402

from core.errors import InvalidInputError, ModelError  # noqa: E402
from core.events import Log, ModelSaved, Output, Placement, Progress  # noqa: E402
from tests.support.ray_cluster import local_ray  # noqa: E402
from tests.support.recovery import wait_until  # noqa: E402
from workers.actors import start_trainer  # noqa: E402
from workers.families.base import CanceledError  # noqa: E402
from workers.registry import get_family  # noqa: E402
from workers.routing import call_pool, choose_server, get_model_server, pool_handle  # noqa: E402
from workers.server import ServingOptions  # noqa: E402

# The module starts a real Ray of its own: real processes, marker `stack`.
pytestmark = pytest.mark.stack

ECHO, GAN = get_family("echo"), get_family("gan")
TINY = {
    "preset": "tiny",
    "steps": 4,
    "batch_size": 8,
    "checkpoint_every": 2,
    "seed": 3,
}


@pytest.fixture(scope="module", autouse=True)
def ray_cluster() -> Iterator[None]:
    with local_ray(
        num_cpus=2,
        num_gpus=1,  # declared only: proves the GPU rule without a GPU
        resources={"gpu_memory_gb": 24},  # the custom resource a GPU node declares
    ):
        yield


def collect(stream) -> list:
    """The job's events, less the Placement that opens them (test_placement_comes_first)."""
    return [e for e in (ray.get(ref) for ref in stream) if not isinstance(e, Placement)]


def train_ctx(root, job_id: str) -> dict:
    return {
        "dataset": {"name": "digits", "kind": "images", "path": None},
        "checkpoint_dir": str(root / "checkpoints" / job_id),
        "model_dir": str(root / "models" / job_id),
        "model_dir_rel": f"models/{job_id}",
    }


def test_echo_server_streams_events_and_stays_warm():
    server = get_model_server("echo-warm", ECHO, None, {})
    params = {"message": "hi", "delay_s": 0.05, "progress_steps": 3}
    events = collect(server.generate.remote("job-1", params))
    assert events[:3] == [Progress(1, 3), Progress(2, 3), Progress(3, 3)]
    assert isinstance(events[3], Output) and events[3].data == b"hi"
    first = ray.get(server.info.remote())
    assert first["family"] == "echo" and first["device"] == "cpu" and first["jobs_served"] == 1

    again = get_model_server("echo-warm", ECHO, None, {})
    assert again._actor_id == server._actor_id
    collect(again.generate.remote("job-2", {"message": "again"}))
    second = ray.get(again.info.remote())
    assert second["jobs_served"] == 2 and second["load_s"] == first["load_s"]
    ray.kill(server)


def test_cancel_stops_a_running_generate_with_canceled_error():
    server = get_model_server("echo-cancel", ECHO, None, {})
    stream = server.generate.remote("job-c", {"delay_s": 60, "progress_steps": 600})
    assert isinstance(ray.get(next(stream)), Placement)
    assert ray.get(next(stream)) == Progress(1, 600)
    assert ray.get(server.cancel.remote("job-c")) is True  # it was running
    with pytest.raises(CanceledError) as info:
        for ref in stream:
            ray.get(ref)
    assert isinstance(info.value, RayTaskError)
    assert ray.get(server.info.remote())["active_jobs"] == []
    ray.kill(server)


def test_model_errors_arrive_as_their_own_types():
    server = get_model_server("echo-errors", ECHO, None, {})
    with pytest.raises(ModelError) as failed:
        collect(server.generate.remote("job-f", {"fail": True}))
    assert failed.value.cause.type == "model-error"
    assert failed.value.cause.detail == "echo was asked to fail"

    with pytest.raises(InvalidInputError) as invalid:
        collect(server.generate.remote("job-i", {"delay_s": -1}))
    assert [e["field"] for e in invalid.value.cause.errors] == ["params.delay_s"]
    # The server survives its jobs' errors.
    assert collect(server.generate.remote("job-ok", {"message": "ok"}))[-1].data == b"ok"
    ray.kill(server)


def test_trainer_trains_tiny_gan_and_its_model_serves_with_a_gpu_share(tmp_path):
    trainer = start_trainer("job-t", GAN)
    assert ray.get(trainer.info.remote())["resources"] == {"CPU": 1.0, "GPU": 0.25}
    events = collect(trainer.train.remote("job-t", "train", TINY, train_ctx(tmp_path, "job-t")))
    assert [e.step for e in events if isinstance(e, Progress)] == [1, 2, 3, 4]
    saved = events[-1]
    assert isinstance(saved, ModelSaved) and saved.path == "models/job-t"
    ray.kill(trainer)

    model_dir = str(tmp_path / "models" / "job-t")
    server = get_model_server("gan-t", GAN, model_dir, saved.config)
    info = ray.get(server.info.remote())
    assert info["resources"] == {"CPU": 1.0, "GPU": 0.25}
    assert info["device"] == "cpu"  # a declared GPU is no CUDA device
    assert info["gpu"] is None  # and no GPU figures are made up for it (the dashboard shows these)
    params = {"label": 2, "num_images": 2, "seed": 9}
    images = [e for e in collect(server.generate.remote("job-g", params)) if isinstance(e, Output)]
    assert [o.meta["seed"] for o in images] == [9, 10]
    with pytest.raises(InvalidInputError) as info:
        collect(server.generate.remote("job-bad", {"label": 10}))
    assert info.value.cause.errors[0]["field"] == "params.label"
    ray.kill(server)


def test_trainer_cancel_then_a_new_attempt_resumes(tmp_path):
    ctx = train_ctx(tmp_path, "job-r")
    params = {**TINY, "steps": 100_000, "checkpoint_every": 2}
    trainer = start_trainer("job-r", GAN)
    stream = trainer.train.remote("job-r", "train", params, ctx)
    assert isinstance(ray.get(next(stream)), Placement)
    step = 0
    with pytest.raises(CanceledError):
        for ref in stream:
            event = ray.get(ref)
            if isinstance(event, Progress):
                step = event.step
                if step == 3:
                    trainer.cancel.remote()
    assert 3 <= step < 100_000

    # The next attempt replaces any trainer the job still has, and resumes.
    retry = start_trainer("job-r", GAN)
    with pytest.raises(ActorDiedError):
        ray.get(trainer.info.remote())
    stream = retry.train.remote("job-r", "train", {**params, "steps": step + 1}, ctx)
    events = []
    for ref in stream:
        events.append(ray.get(ref))
        if isinstance(events[-1], Progress):
            break
    resumed = [e.message for e in events if isinstance(e, Log) and e.message.startswith("resumed")]
    assert resumed == [f"resumed from step {step - step % 2}"]
    ray.kill(retry)


def test_finetune_is_refused_where_the_family_has_no_finetune(tmp_path):
    # `echo` trains nothing.
    trainer = start_trainer("job-ft", ECHO)
    with pytest.raises(InvalidInputError):
        collect(trainer.train.remote("job-ft", "finetune", TINY, train_ctx(tmp_path, "job-ft")))
    ray.kill(trainer)


def test_a_model_that_cannot_load_kills_its_server(tmp_path):
    server = get_model_server("gan-missing", GAN, str(tmp_path / "nothing"), {})
    with pytest.raises(ActorDiedError):
        ray.get(server.info.remote())


def test_a_server_a_job_found_dead_is_dropped_whatever_ray_still_says():
    # Ray's control store can list a just-killed server as alive for a moment after its caller
    # saw ActorDiedError; the caller's word (`dead`) is taken over Ray's. Told so of a server
    # that is in fact still alive (Ray's lag at its longest), the pool kills it and hands out a
    # new one under another name, so that no lookup by name can find the old actor again.
    options = ServingOptions()
    first = choose_server("echo-found-dead", "echo", None, {}, options)
    first.done()
    assert ray.get(first.handle.info.remote())["family"] == "echo"
    second = choose_server(
        "echo-found-dead", "echo", None, {}, options, dead=first.handle._actor_id.hex()
    )
    second.done()
    assert second.handle._actor_id != first.handle._actor_id and second.name != first.name
    collected = collect(second.handle.generate.remote("job-1", {"message": "on the new one"}))
    assert collected[-1].data == b"on the new one"
    with pytest.raises(ActorDiedError):
        ray.get(first.handle.info.remote())
    ray.kill(second.handle)


def test_importing_actors_starts_no_ray_and_loads_no_torch():
    code = "import sys, ray, workers.actors\nprint(ray.is_initialized(), 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]


def test_a_trainer_reserves_the_gpu_memory_its_job_asked_for(tmp_path):
    trainer = start_trainer("job-mem", GAN, num_gpus=0.5, gpu_memory_gb=16)
    held = ray.get(trainer.info.remote())["resources"]
    assert held.get("GPU") == 0.5 and held.get("gpu_memory_gb") == 16
    ray.kill(trainer)
    with pytest.raises(InvalidInputError) as refused:
        start_trainer("job-huge", GAN, gpu_memory_gb=80)
    assert refused.value.errors[0]["field"] == "resources.gpu_memory_gb"


def test_placement_comes_first_and_says_where_the_job_runs(tmp_path):
    server = get_model_server("echo-where", ECHO, None, {})
    first = ray.get(next(server.generate.remote("job-w", {"message": "x"})))
    assert isinstance(first, Placement)
    node = ray.get_runtime_context().get_node_id()
    assert first.node_id == node and first.node_ip and first.hostname
    assert first.replica == "model-echo-where" and first.gpu_ids == []
    assert first.load_s is not None and first.loaded_at is not None
    ray.kill(server)

    trainer = start_trainer("job-pl", GAN)
    stream = trainer.train.remote("job-pl", "train", TINY, train_ctx(tmp_path, "job-pl"))
    where = ray.get(next(stream))
    assert isinstance(where, Placement) and where.replica == "trainer-job-pl"
    assert where.gpu_ids == ["0"] and where.load_s is None  # the declared GPU's id
    ray.kill(trainer)


def is_dead(actor: Any) -> bool:
    try:
        ray.get(actor.info.remote(), timeout=30)
    except ray.exceptions.RayActorError:
        return True
    return False


def test_a_call_to_a_pool_killed_just_before_reaches_a_new_pool():
    # The last test of the module: it kills the module's pool. The worker's cached handle is
    # then dead, and a lookup by name may still find the dead pool for a moment: the call
    # goes on until it reaches a live one.
    first = pool_handle()
    assert "servers" in ray.get(first.info.remote())
    ray.kill(first, no_restart=True)
    # The kill lands a moment later (ray.kill does not wait for it): a call sent meanwhile may
    # still be answered, so the old handle is called until it finds the pool dead.
    wait_until(lambda: is_dead(first), 30, "the killed pool dead")
    assert "servers" in call_pool("info")
    assert pool_handle()._actor_id != first._actor_id
