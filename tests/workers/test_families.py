"""The family implementations without Ray: the built-in data sets, echo, and a tiny ddpm built
from config (seeded) that trains, checkpoints, resumes, saves, loads and generates."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from core.errors import InvalidInputError, ModelError
from core.events import Log, Metric, ModelSaved, Output, Progress
from workers.datasets import load_digits, load_image_folder
from workers.families import ddpm, echo
from workers.families.base import CanceledError, DatasetRef, RunContext, TrainContext
from workers.families.checkpoints import CHECKPOINT_NAME, read_checkpoint_meta

# Two denoising steps for the end-of-training grid: enough to make it, cheap on a CPU.
TRAIN = {
    "preset": "tiny",
    "steps": 8,
    "batch_size": 16,
    "checkpoint_every": 3,
    "seed": 7,
    "sample_steps": 2,
}


def train_ctx(root: Path, job_id: str = "job-1", **kw) -> TrainContext:
    return TrainContext(
        job_id=job_id,
        device="cpu",
        dataset=DatasetRef("digits", "images", None),
        checkpoint_dir=root / "checkpoints" / job_id,
        model_dir=root / "models" / job_id,
        model_dir_rel=f"models/{job_id}",
        **kw,
    )


def cancel_after(events: list, step: int):
    """An is_canceled that turns true once a Progress event of `step` was collected."""
    return lambda: any(isinstance(e, Progress) and e.step >= step for e in events)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddpm")
    ctx = train_ctx(root)
    events = list(ddpm.train(dict(TRAIN), ctx))
    return root, ctx, events


@pytest.fixture(scope="module")
def model(trained):
    root, ctx, events = trained
    saved = events[-1]
    return ddpm.load(ctx.model_dir, saved.config, "cpu")


def outputs(model, params: dict) -> list[Output]:
    return [e for e in model.generate(params, RunContext("gen", "cpu")) if isinstance(e, Output)]


# -- data sets --------------------------------------------------------------------------------


def test_digits_are_scaled_tensors():
    data = load_digits(16)
    assert data.images.shape == (1797, 1, 16, 16)
    assert data.images.dtype == torch.float32
    assert data.images.min() == -1.0 and data.images.max() == 1.0
    assert data.labels.shape == (1797,) and data.labels.dtype == torch.int64
    assert sorted(data.labels.unique().tolist()) == list(range(10))
    assert data.class_names == [str(d) for d in range(10)]


def test_image_folder_labels_come_from_sub_folders(tmp_path):
    for name, color in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.new("RGB", (30, 20), color).save(tmp_path / name / f"{i}.png")
    Image.new("L", (8, 8), 0).save(tmp_path / "dogs" / "gray.jpg")
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")

    data = load_image_folder(tmp_path, size=12)
    assert data.class_names == ["cats", "dogs"]
    assert data.images.shape == (5, 3, 12, 12)  # RGB because some images are
    assert data.labels.tolist() == [0, 0, 1, 1, 1]
    assert data.images[0, 0].eq(1.0).all() and data.images[0, 2].eq(-1.0).all()  # red
    assert data.images[4].eq(-1.0).all()  # black grayscale image

    gray = load_image_folder(tmp_path, size=12, channels=1)
    assert gray.images.shape == (5, 1, 12, 12)


def test_image_folder_rejects_broken_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InvalidInputError) as info:
        load_image_folder(tmp_path)
    assert info.value.errors[0]["field"] == "dataset"


# -- echo -------------------------------------------------------------------------------------


def test_echo_returns_its_message_after_progress():
    model = echo.load(None, {}, "cpu")
    events = list(
        model.generate(
            {"message": "héllo", "delay_s": 0.05, "progress_steps": 3}, RunContext("j", "cpu")
        )
    )
    assert [e.step for e in events[:-1]] == [1, 2, 3]
    out = events[-1]
    assert isinstance(out, Output) and out.name == "output.txt" and out.kind == "text"
    assert out.data == "héllo".encode() and out.meta == {"chars": 5}


def test_echo_honours_cancel_and_fail():
    model = echo.load(None, {}, "cpu")
    events: list = []
    ctx = RunContext("j", "cpu", is_canceled=cancel_after(events, 2))
    with pytest.raises(CanceledError):
        for event in model.generate({"delay_s": 60, "progress_steps": 1000}, ctx):
            events.append(event)
    assert [e.step for e in events] == [1, 2]
    with pytest.raises(ModelError, match="echo was asked to fail"):
        list(model.generate({"fail": True}, RunContext("j", "cpu")))


# -- ddpm training ----------------------------------------------------------------------------


def test_training_yields_progress_metrics_samples_and_the_model(trained):
    root, ctx, events = trained
    assert [e.step for e in events if isinstance(e, Progress)] == list(range(1, 9))
    metrics = [e for e in events if isinstance(e, Metric)]
    assert metrics[-1].step == 8
    assert all(math.isfinite(m.values["loss"]) and m.values["samples_per_s"] > 0 for m in metrics)

    grid = next(e for e in events if isinstance(e, Output))
    assert (grid.name, grid.kind, grid.content_type) == ("samples.png", "grid", "image/png")
    image = Image.open(io.BytesIO(grid.data))
    assert image.size == (10 * 32, 32)  # ten 16px classes, upscaled 2x
    assert grid.meta == {"labels": list(range(10)), "steps": 2, "seed": 7}

    saved = events[-1]
    assert isinstance(saved, ModelSaved) and saved.path == "models/job-1"
    assert math.isfinite(saved.metrics["final_loss"])
    config = saved.config
    assert config["preset"] == "tiny" and config["num_classes"] == 10
    assert (
        config["image_size"] == 16
        and config["unet"]["num_class_embeds"] == 11
        and config["null_label"] == 10
    )
    json.dumps(config)  # stored as JSON in the model row
    files = sorted(p.name for p in ctx.model_dir.iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors", "genq.json"]


def test_sample_steps_zero_draws_no_grid(tmp_path):
    params = {**TRAIN, "steps": 1, "sample_steps": 0}
    events = list(ddpm.train(params, train_ctx(tmp_path)))
    assert not any(isinstance(e, Output) for e in events)
    assert Log("drawing one sample per class") not in events
    assert isinstance(events[-1], ModelSaved)


def test_checkpoint_is_one_safetensors_file_with_optimizer_state(trained):
    root, ctx, events = trained
    assert [p.name for p in ctx.checkpoint_dir.iterdir()] == ["checkpoint.safetensors"]
    path = ctx.checkpoint_dir / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["step"] == "8" and meta["format"] == ddpm.CHECKPOINT_FORMAT
    assert any(k.startswith("model.") for k in keys)
    assert any(k.endswith(".exp_avg_sq") for k in keys)


def test_a_canceled_run_resumes_from_its_last_checkpoint(trained, tmp_path):
    _, _, straight = trained
    events: list = []
    ctx = train_ctx(tmp_path, is_canceled=cancel_after(events, 4))
    with pytest.raises(CanceledError):
        for event in ddpm.train(dict(TRAIN), ctx):
            events.append(event)
    meta = read_checkpoint_meta(ctx.checkpoint_dir / CHECKPOINT_NAME)
    assert meta["step"] == "3"  # checkpoint_every=3; step 4 was not checkpointed
    assert not ctx.model_dir.exists()

    resumed = list(ddpm.train(dict(TRAIN), train_ctx(tmp_path)))
    assert Log("resumed from step 3") in resumed
    assert [e.step for e in resumed if isinstance(e, Progress)] == list(range(4, 9))
    # Step randomness comes from (seed, step): the resumed run ends where the straight one did.
    ours = load_file(str(ctx.model_dir / "diffusion_pytorch_model.safetensors"))
    theirs = load_file(str(trained[1].model_dir / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


# -- ddpm generation --------------------------------------------------------------------------


def test_generate_gives_seeded_pngs_with_their_parameters(model):
    events = list(
        model.generate(
            {"label": 3, "num_images": 3, "steps": 5, "seed": 11}, RunContext("g", "cpu")
        )
    )
    assert [e.step for e in events if isinstance(e, Progress)] == [1, 2, 3, 4, 5]
    images = [e for e in events if isinstance(e, Output)]
    assert [o.name for o in images] == ["image-0.png", "image-1.png", "image-2.png"]
    for i, out in enumerate(images):
        assert out.kind == "image" and out.content_type == "image/png"
        assert out.meta == {
            "seed": 11 + i,
            "label": 3,
            "class_name": "3",
            "index": i,
            "width": 16,
            "height": 16,
        }
        png = Image.open(io.BytesIO(out.data))
        assert png.format == "PNG" and png.size == (16, 16) and png.mode == "L"
        assert png.text["genq:seed"] == str(11 + i)
        assert json.loads(png.text["genq:params"]) == {
            "label": 3,
            "num_images": 3,
            "steps": 5,
            "sampler": "ddpm",
            "guidance_scale": 1.0,
            "seed": 11,
        }
    assert images[0].data != images[1].data


def test_same_seed_same_bytes_other_seed_other_bytes(model):
    params = {"label": 1, "num_images": 2, "steps": 4, "seed": 5}
    first = [o.data for o in outputs(model, params)]
    assert first == [o.data for o in outputs(model, params)]
    assert first != [o.data for o in outputs(model, {**params, "seed": 6})]


def test_no_seed_picks_one_and_records_it(model):
    out = outputs(model, {"label": 0, "num_images": 1, "steps": 3})[0]
    seed = out.meta["seed"]
    assert json.loads(Image.open(io.BytesIO(out.data)).text["genq:params"])["seed"] == seed
    again = outputs(model, {"label": 0, "num_images": 1, "steps": 3, "seed": seed})[0]
    assert again.data == out.data


def test_generate_rejects_what_the_model_cannot_do(model):
    with pytest.raises(InvalidInputError) as info:
        outputs(model, {"label": 10})
    assert info.value.errors[0]["field"] == "params.label"
    with pytest.raises(InvalidInputError) as info:
        outputs(model, {"steps": 500})  # tiny has 200 training timesteps
    assert info.value.errors[0]["field"] == "params.steps"


def test_generate_stops_when_canceled(model):
    events: list = []
    ctx = RunContext("g", "cpu", is_canceled=cancel_after(events, 2))
    with pytest.raises(CanceledError):
        for event in model.generate({"steps": 50, "seed": 1}, ctx):
            events.append(event)
    assert not any(isinstance(e, Output) for e in events)


# -- imports ----------------------------------------------------------------------------------


def test_specs_and_registry_load_neither_torch_nor_ray():
    code = (
        "import sys, workers, workers.registry, workers.families.base\n"
        "import workers.families.echo_spec, workers.families.ddpm_spec\n"
        "print(sorted(m for m in ('torch', 'ray', 'diffusers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
