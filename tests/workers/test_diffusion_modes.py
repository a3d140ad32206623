"""The `diffusers` family's LoRA fine-tuning, adapters and image modes, called directly (no
Ray, no queue) on the tiny pipeline of tests/support/pretrained_models.py: a LoRA trained for a few
steps changes the images for the same seed and prompt; the adapter version alone is small;
switching adapters on one model server does not load the base again; image-to-image with
strength 0 returns the input; inpainting keeps the pixels outside the mask; previews."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from core.errors import InvalidInputError
from core.events import Event, ModelSaved, Output
from core.states import JobKind
from tests.support.pretrained_models import build_tiny_sd, build_tiny_sdxl, captioned_folder
from workers.families import sd_loading, sd_lora, sd_pipeline, sd_spec
from workers.families.base import DatasetRef, RunContext, TrainContext
from workers.server import ModelServer, ServingOptions


def train_adapter(
    base: Path, data: Path, out: Path, seed: int, steps: int = 6, **extra: Any
) -> list[Event]:
    ctx = TrainContext(
        job_id=f"lora-{out.name}",
        device="cpu",
        dataset=DatasetRef("pics", "captioned_images", data),
        checkpoint_dir=out.parent / f"{out.name}-ckpt",
        model_dir=out,
        model_dir_rel=f"models/{out.name}",
        parent_model_dir=base,
        parent_model_path=str(base),
    )
    ctx.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    params = {"rank": 4, "alpha": 8.0, "steps": steps, "learning_rate": 5e-2, "seed": seed}
    params.update(extra)
    return list(sd_lora.train(params, ctx))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd-modes")
    base = build_tiny_sd(root / "sd")
    data = captioned_folder(root / "pics")
    train_adapter(base, data, root / "lora-a", seed=1)
    train_adapter(base, data, root / "lora-b", seed=2)
    return {"sd": base, "pics": data, "a": root / "lora-a", "b": root / "lora-b"}


def images_of(events: Iterator[Event]) -> list[np.ndarray]:
    return [
        np.asarray(Image.open(io.BytesIO(e.data)))
        for e in events
        if isinstance(e, Output) and e.kind == "image"
    ]


def run(model: Any, params: dict[str, Any], **ctx: Any) -> list[Event]:
    return list(model.generate(params, RunContext(job_id="j", device="cpu", **ctx)))


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_lora_changes_the_images_and_the_version_holds_only_the_adapter(
    tiny: dict[str, Path],
) -> None:
    saved = json.loads((tiny["a"] / "genq.json").read_text())
    assert saved["kind"] == "lora" and saved["base_path"] == str(tiny["sd"])
    assert sorted(f.name for f in tiny["a"].iterdir()) == [
        "genq.json",
        "pytorch_lora_weights.safetensors",
    ]
    adapter_bytes = (tiny["a"] / "pytorch_lora_weights.safetensors").stat().st_size
    assert saved["adapter_bytes"] == adapter_bytes
    assert adapter_bytes * 10 < folder_bytes(tiny["sd"])

    model = sd_pipeline.load(tiny["sd"], {}, "cpu")
    params = {"prompt": "a red square", "steps": 4, "seed": 7}
    plain = images_of(iter(run(model, params)))
    adapted = images_of(iter(run(model, params, adapter={"id": "a", "dir": str(tiny["a"])})))
    again = images_of(iter(run(model, params)))
    assert np.abs(plain[0].astype(int) - adapted[0].astype(int)).max() > 0
    assert np.array_equal(plain[0], again[0])  # the adapter is off again for the base
    # Weight 0 draws as the base model.
    zero = {**params, "lora_scale": 0.0}
    off = images_of(iter(run(model, zero, adapter={"id": "a", "dir": str(tiny["a"])})))
    assert np.abs(plain[0].astype(int) - off[0].astype(int)).max() <= 1


def test_the_trainer_reports_what_it_saved(tiny: dict[str, Path], tmp_path: Path) -> None:
    events = train_adapter(tiny["sd"], tiny["pics"], tmp_path / "lora", seed=3, steps=2)
    saved = [e for e in events if isinstance(e, ModelSaved)]
    assert len(saved) == 1
    assert saved[0].metrics["adapter_bytes"] == saved[0].config["adapter_bytes"] > 0
    assert saved[0].config["lora"] == {
        "alpha": 8.0,
        "rank": 4,
        "target_modules": ["to_k", "to_out.0", "to_q", "to_v"],
    }


def test_switching_adapters_does_not_load_the_base_again(tiny: dict[str, Path]) -> None:
    loads_before = sd_loading.BASE_LOADS[0]
    server = ModelServer(
        "diffusers", str(tiny["sd"]), {}, ServingOptions(batch_min_rows=1, idle_unload_s=None)
    )
    assert sd_loading.BASE_LOADS[0] == loads_before + 1
    params = {"prompt": "a blue circle", "steps": 3, "seed": 11}
    a = {"id": "model-a", "path": str(tiny["a"])}
    b = {"id": "model-b", "path": str(tiny["b"])}
    drawn = {}
    for name, adapter in (("a", a), ("b", b), ("a2", a), ("base", None), ("b2", b)):
        drawn[name] = images_of(server.generate(f"job-{name}", params, adapter=adapter))[0]
    assert sd_loading.BASE_LOADS[0] == loads_before + 1  # one base, five jobs
    assert server.model.adapters.loads == 2  # each adapter read once, then switched
    assert np.array_equal(drawn["a"], drawn["a2"]) and np.array_equal(drawn["b"], drawn["b2"])
    assert not np.array_equal(drawn["a"], drawn["b"])
    assert not np.array_equal(drawn["a"], drawn["base"])


def test_an_adapter_folder_alone_serves_its_adapter(tiny: dict[str, Path]) -> None:
    """A server started on the adapter version's own folder (not its base's) loads the base
    its genq.json names and draws with the adapter."""
    model = sd_pipeline.load(tiny["b"], {}, "cpu")
    base = sd_pipeline.load(tiny["sd"], {}, "cpu")
    params = {"prompt": "a blue circle", "steps": 3, "seed": 5}
    on_base = images_of(iter(run(base, params, adapter={"id": "b", "dir": str(tiny["b"])})))
    assert np.array_equal(images_of(iter(run(model, params)))[0], on_base[0])


def test_img2img_with_strength_zero_returns_the_input(tiny: dict[str, Path]) -> None:
    model = sd_pipeline.load(tiny["sd"], {}, "cpu")
    source = Image.effect_noise((48, 40), 60).convert("RGB")
    params = {"prompt": "a fox", "image": "file-x", "strength": 0.0, "steps": 4, "seed": 1}
    out = images_of(iter(run(model, params, inputs={"image": png(source)})))
    assert np.array_equal(out[0], np.asarray(source))
    # With strength, it is redrawn from the input, at the input's size.
    redrawn = images_of(
        iter(run(model, {**params, "strength": 0.75}, inputs={"image": png(source)}))
    )
    assert redrawn[0].shape == (40, 48, 3)
    assert not np.array_equal(redrawn[0], np.asarray(source))


def test_inpainting_keeps_the_pixels_outside_the_mask(tiny: dict[str, Path]) -> None:
    model = sd_pipeline.load(tiny["sd"], {}, "cpu")
    source = Image.effect_noise((32, 32), 60).convert("RGB")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    params = {"prompt": "a fox", "image": "file-x", "mask": "file-y", "steps": 4, "seed": 2}
    out = images_of(iter(run(model, params, inputs={"image": png(source), "mask": png(mask)})))
    inside = np.asarray(mask) > 127
    before, after = np.asarray(source).astype(int), out[0].astype(int)
    assert np.abs(before - after)[~inside].max() <= 2
    assert np.abs(before - after)[inside].mean() > 5  # the masked square was repainted


def test_previews_come_every_n_steps_and_are_small(tiny: dict[str, Path]) -> None:
    model = sd_pipeline.load(tiny["sd"], {}, "cpu")
    params = {
        "prompt": "a fox",
        "steps": 4,
        "seed": 3,
        "preview_every": 2,
        "width": 256,
        "height": 160,
    }
    previews = [e for e in run(model, params) if isinstance(e, Output) and e.kind == "preview"]
    assert [p.meta["step"] for p in previews] == [2, 4]
    for p in previews:
        image = Image.open(io.BytesIO(p.data))
        assert max(image.size) <= sd_pipeline.PREVIEW_MAX_SIDE
        assert len(p.data) < 64 * 1024


def test_inputs_that_are_missing_or_unreadable_name_the_field(tiny: dict[str, Path]) -> None:
    model = sd_pipeline.load(tiny["sd"], {}, "cpu")
    params = {"prompt": "a fox", "image": "file-x", "steps": 2, "seed": 1}
    with pytest.raises(InvalidInputError) as missing:
        run(model, params)
    assert missing.value.errors[0]["field"] == "params.image"
    with pytest.raises(InvalidInputError) as garbage:
        run(model, params, inputs={"image": b"not a picture"})
    assert garbage.value.errors[0]["field"] == "params.image"


def test_spec_checks_name_the_field() -> None:
    with pytest.raises(ValueError, match="needs `image`"):
        sd_spec.SdGenerateParams.model_validate({"prompt": "x", "mask": "file-a"})
    with pytest.raises(ValueError, match="strength"):
        sd_spec.SdGenerateParams.model_validate({"prompt": "x", "image": "f", "strength": 1.5})
    with pytest.raises(ValueError, match="target_modules"):
        sd_spec.SdFinetuneParams.model_validate({"target_modules": ["conv_in"]})
    with pytest.raises(InvalidInputError):
        sd_spec.check_model_params(JobKind.FINETUNE, {}, {"family": "diffusers", "kind": "lora"})
    # Image jobs run alone; an adapter weight is part of the key.
    assert sd_spec.batch_key(sd_spec.SdGenerateParams(prompt="x", image="f")) is None
    a = sd_spec.batch_key(sd_spec.SdGenerateParams(prompt="x"))
    b = sd_spec.batch_key(sd_spec.SdGenerateParams(prompt="y", lora_scale=0.5))
    assert a is not None and a != b


def test_xl_pipelines_take_images_and_masks_too(tmp_path: Path) -> None:
    model = sd_pipeline.load(build_tiny_sdxl(tmp_path / "sdxl"), {}, "cpu")
    source = Image.effect_noise((32, 32), 60).convert("RGB")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 32, 12))
    inputs = {"image": png(source), "mask": png(mask)}
    params = {"prompt": "a fox", "image": "f", "strength": 0.6, "steps": 3, "seed": 2}
    (redrawn,) = images_of(iter(run(model, params, inputs=inputs)))
    assert redrawn.shape == (32, 32, 3) and not np.array_equal(redrawn, np.asarray(source))
    (painted,) = images_of(iter(run(model, {**params, "mask": "m"}, inputs=inputs)))
    assert np.abs(painted.astype(int) - np.asarray(source).astype(int))[12:].max() <= 2
