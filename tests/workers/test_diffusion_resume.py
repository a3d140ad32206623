"""A LoRA fine-tune of a diffusion pipeline survives its trainer being killed: on a real local
Ray (its own cluster, never one already on the host), the trainer process is SIGKILLed after
its first checkpoint (its PID comes from the trainer itself, so nothing else on the machine is
touched), and a new attempt resumes from the checkpoint and saves the same adapter as a run
that was never interrupted."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

ray = pytest.importorskip("ray")

from ray.exceptions import ActorDiedError, RayActorError  # noqa: E402

from core.events import Log, ModelSaved, Placement  # noqa: E402
from tests.support.pretrained_models import build_tiny_sd, captioned_folder  # noqa: E402
from tests.support.ray_cluster import local_ray  # noqa: E402
from workers.actors import start_trainer  # noqa: E402
from workers.families.sd_lora import ADAPTER_FILE  # noqa: E402
from workers.registry import get_family  # noqa: E402

# The module starts a real Ray of its own: real processes, marker `stack`.
pytestmark = pytest.mark.stack

SD = get_family("diffusers")
PARAMS = {"rank": 4, "alpha": 4.0, "steps": 40, "checkpoint_every": 2, "learning_rate": 1e-2}


@pytest.fixture(scope="module", autouse=True)
def ray_cluster() -> Iterator[None]:
    with local_ray(num_cpus=2):
        yield


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd-resume")
    return {"sd": build_tiny_sd(root / "sd"), "pics": captioned_folder(root / "pics")}


def ctx(folders: dict[str, Path], root: Path, job_id: str) -> dict[str, Any]:
    return {
        "dataset": {"name": "pics", "kind": "captioned_images", "path": str(folders["pics"])},
        "checkpoint_dir": str(root / job_id / "checkpoints"),
        "model_dir": str(root / job_id / "model"),
        "model_dir_rel": f"models/{job_id}",
        "parent_model_dir": str(folders["sd"]),
    }


def events_of(stream: Any) -> list[Any]:
    return [e for e in (ray.get(ref) for ref in stream) if not isinstance(e, Placement)]


def test_a_killed_lora_trainer_resumes_from_its_checkpoint(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    job = ctx(folders, tmp_path, "job-crash")
    trainer = start_trainer("job-crash", SD)
    pid = ray.get(trainer.info.remote())["pid"]
    assert pid != os.getpid()
    stream = trainer.train.remote("job-crash", "finetune", PARAMS, job)
    for ref in stream:
        event = ray.get(ref)
        assert not isinstance(event, ModelSaved)
        if isinstance(event, Log) and event.message.startswith("checkpoint at step"):
            os.kill(pid, signal.SIGKILL)
            break
    with pytest.raises((ActorDiedError, RayActorError)):  # the kill landed: the trainer is gone
        for ref in stream:
            ray.get(ref)
    assert (Path(job["checkpoint_dir"]) / "checkpoint.safetensors").is_file()

    retry = start_trainer("job-crash", SD)
    events = events_of(retry.train.remote("job-crash", "finetune", PARAMS, job))
    resumed = [e.message for e in events if isinstance(e, Log) and e.message.startswith("resumed")]
    assert len(resumed) == 1
    step = int(resumed[0].rsplit(" ", 1)[1])
    assert 2 <= step < PARAMS["steps"]
    assert [e for e in events if isinstance(e, ModelSaved)]
    ray.kill(retry)

    whole = ctx(folders, tmp_path, "job-whole")
    straight = start_trainer("job-whole", SD)
    events_of(straight.train.remote("job-whole", "finetune", PARAMS, whole))
    ray.kill(straight)
    after_crash = load_file(str(Path(job["model_dir"]) / ADAPTER_FILE))
    uninterrupted = load_file(str(Path(whole["model_dir"]) / ADAPTER_FILE))
    assert after_crash.keys() == uninterrupted.keys()
    for name, tensor in after_crash.items():
        torch.testing.assert_close(tensor, uninterrupted[name], rtol=1e-4, atol=1e-6)
