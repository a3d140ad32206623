"""One contract over every trainable family's `tiny` preset, without Ray: train a few steps
on the built-in data set, save, load, generate; shapes, finite values, the same bytes for the
same seed, different bytes for another seed, resume from a checkpoint, fine-tune from the
saved model, and refusal of bad parameters — both by the spec (what the API checks at submit)
and by the loaded model (what only the model knows, such as its number of classes)."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import load_file

from core.errors import InvalidInputError
from core.events import Log, Metric, ModelSaved, Output, Progress, TextDelta
from workers.families.base import CanceledError, DatasetRef, Family, RunContext, TrainContext
from workers.registry import get_family

DIGITS = DatasetRef("digits", "images", None)
PYDOCS = DatasetRef("pydocs", "text", None)


@dataclass(frozen=True)
class Case:
    family: str
    dataset: DatasetRef
    generate: dict[str, Any]
    bad_spec: dict[str, Any]  # refused by the family's pydantic params
    bad_model: dict[str, Any]  # passes the spec, refused by the loaded model
    bad_field: str
    loss_keys: tuple[str, ...]
    train_extra: dict[str, Any] = field(default_factory=dict)  # this family's own train params

    def train(self, **over: Any) -> dict[str, Any]:
        return {**TRAIN, **self.train_extra, **over}


TRAIN = {"preset": "tiny", "steps": 6, "batch_size": 8, "checkpoint_every": 4, "seed": 3}
CASES = [
    Case("ddpm", DIGITS, {"label": 3, "num_images": 2, "steps": 4}, {"steps": 0},
         {"label": 10}, "params.label", ("loss",), {"sample_steps": 2}),
    Case("gan", DIGITS, {"label": 3, "num_images": 2}, {"num_images": 0},
         {"label": 10}, "params.label", ("d_loss", "g_loss")),
    Case("vae", DIGITS, {"label": 3, "num_images": 2}, {"mode": "dream"},
         {"mode": "reconstruct"}, "params.images", ("recon", "kl")),
    Case("charlm", PYDOCS, {"prompt": "Return the ", "max_tokens": 24, "top_k": 20, "top_p": 0.9},
         {"temperature": -1}, {"prompt": "x" * 10}, "", ("loss", "bits_per_char")),
]  # fmt: skip


def ctx_for(root: Path, case: Case, job_id: str, **kw: Any) -> TrainContext:
    return TrainContext(
        job_id=job_id,
        device="cpu",
        dataset=case.dataset,
        checkpoint_dir=root / "checkpoints" / job_id,
        model_dir=root / "models" / job_id,
        model_dir_rel=f"models/{job_id}",
        **kw,
    )


def applies_to(wanted: Callable[[Family], bool]) -> Callable[[Any], Any]:
    """Generate a test only for the families whose declared capabilities `wanted` accepts
    (its params, data set kinds, fine-tuning); a case that does not apply is never made."""

    def mark(test: Any) -> Any:
        test.applies_to = wanted
        return test

    return mark


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" in metafunc.fixturenames:
        wanted = getattr(metafunc.function, "applies_to", lambda family: True)
        cases = [c for c in CASES if wanted(get_family(c.family))]
        # Module scope: each family trains once for all the tests that take it.
        metafunc.parametrize("case", cases, ids=[c.family for c in cases], scope="module")


def params_of(family: Family) -> set[str]:
    return set(family.generate_params.model_fields) if family.generate_params else set()


@pytest.fixture(scope="module")
def trained(case, tmp_path_factory):
    root = tmp_path_factory.mktemp(case.family)
    ctx = ctx_for(root, case, "job-1")
    impl = get_family(case.family).load_implementation()
    events = list(impl.train(case.train(), ctx))
    saved = events[-1]
    assert isinstance(saved, ModelSaved)
    model = impl.load(ctx.model_dir, saved.config, "cpu")
    return case, impl, root, ctx, events, model


def outputs(model: Any, params: dict[str, Any]) -> list[Output]:
    return [e for e in model.generate(params, RunContext("gen", "cpu")) if isinstance(e, Output)]


def test_training_streams_progress_losses_and_a_sample(trained):
    case, _, root, ctx, events, _ = trained
    assert [e.step for e in events if isinstance(e, Progress)] == list(range(1, 7))
    metrics = [e for e in events if isinstance(e, Metric) and case.loss_keys[0] in e.values]
    assert metrics and metrics[-1].step == 6
    for key in case.loss_keys:
        assert all(math.isfinite(m.values[key]) for m in metrics)
    sample = next(e for e in events if isinstance(e, Output))
    assert sample.kind in ("grid", "text") and sample.data
    assert isinstance(events[0], Log)
    # A checkpoint is safetensors (never pickle) and records the last step.
    checkpoint = ctx.checkpoint_dir / "checkpoint.safetensors"
    with safe_open(str(checkpoint), framework="pt") as f:
        assert f.metadata()["step"] == "6"
    assert not list(root.rglob("*.pt")) and not list(root.rglob("*.bin"))


def test_generation_has_shapes_finite_values_and_is_seeded(trained):
    case, _, _, _, _, model = trained
    first = outputs(model, {**case.generate, "seed": 11})
    again = outputs(model, {**case.generate, "seed": 11})
    other = outputs(model, {**case.generate, "seed": 12})
    assert [o.data for o in first] == [o.data for o in again]
    assert [o.data for o in first] != [o.data for o in other]
    if case.family == "charlm":
        (out,) = first
        assert out.meta["completion_tokens"] == 24 and out.meta["prompt_tokens"] == 11
        assert out.meta["seed"] == 11
        return
    assert len(first) == 2
    for out in first:
        image = Image.open(io.BytesIO(out.data))
        assert image.size == (16, 16) and image.mode == "L"
        assert '"seed": 11' in image.text["genq:params"]
        assert out.meta["label"] == 3
        pixels = torch.tensor(list(image.getdata()), dtype=torch.float32)
        assert torch.isfinite(pixels).all() and pixels.std() > 0  # not a blank image


@applies_to(lambda family: "text" in family.dataset_kinds)
def test_a_text_model_streams_the_text_it_returns(trained):
    case, _, _, _, _, model = trained
    events = list(model.generate({**case.generate, "seed": 5}, RunContext("g", "cpu")))
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert deltas and [d.index for d in deltas] == sorted(d.index for d in deltas)
    assert "".join(d.text for d in deltas).encode() == events[-1].data
    greedy = {"prompt": "The ", "max_tokens": 10, "temperature": 0}
    assert (
        outputs(model, {**greedy, "seed": 1})[0].data
        == outputs(model, {**greedy, "seed": 2})[0].data
    )


@applies_to(lambda family: "stop" in params_of(family))
def test_generation_stops_before_a_stop_string(trained):
    case, _, _, _, _, model = trained
    free = {**case.generate, "seed": 5}
    (whole,) = outputs(model, free)
    text = whole.data.decode()
    assert whole.meta["finish_reason"] == "length"
    stop = text[5:7]
    cut_at = text.find(stop)
    events = list(model.generate({**free, "stop": [stop]}, RunContext("g", "cpu")))
    deltas = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert deltas == text[:cut_at] == events[-1].data.decode()
    assert events[-1].meta["finish_reason"] == "stop"
    assert events[-1].meta["completion_tokens"] < whole.meta["completion_tokens"]


def test_bad_parameters_are_refused(trained):
    case, impl, _, _, _, model = trained
    family = get_family(case.family)
    with pytest.raises(ValidationError):
        family.generate_params.model_validate({**case.generate, **case.bad_spec})
    with pytest.raises(ValidationError):
        family.train_params.model_validate({**TRAIN, "learning_rate": 0})
    with pytest.raises(ValidationError):
        family.train_params.model_validate({**TRAIN, "unknown": 1})
    if case.family == "charlm":
        # Any prompt is valid text for a byte-level model: only the spec refuses.
        with pytest.raises(ValidationError):
            family.generate_params.model_validate({"max_tokens": 0})
        return
    with pytest.raises(InvalidInputError) as info:
        outputs(model, {**case.generate, **case.bad_model})
    assert info.value.errors[0]["field"] == case.bad_field


def test_resume_takes_the_steps_an_uninterrupted_run_would(trained, tmp_path):
    case, impl, _, ctx, _, _ = trained
    # Cancel a second run once step 4 (a checkpoint) is done, then restart it.
    seen: list[Any] = []
    stopped = ctx_for(
        tmp_path,
        case,
        "job-2",
        is_canceled=lambda: any(isinstance(e, Progress) and e.step >= 4 for e in seen),
    )
    with pytest.raises(CanceledError):
        for event in impl.train(case.train(), stopped):
            seen.append(event)
    assert not stopped.model_dir.exists()  # the fault fired before the model was saved
    resumed = list(impl.train(case.train(), ctx_for(tmp_path, case, "job-2")))
    assert any(isinstance(e, Log) and e.message == "resumed from step 4" for e in resumed)
    assert [e.step for e in resumed if isinstance(e, Progress)] == [5, 6]
    # Every weights file of the saved model (one per family's layout) equals the other run's.
    names = sorted(p.name for p in ctx.model_dir.glob("*.safetensors"))
    assert names and names == sorted(p.name for p in stopped.model_dir.glob("*.safetensors"))
    for name in names:
        one = load_file(str(ctx.model_dir / name))
        two = load_file(str(stopped.model_dir / name))
        assert one.keys() == two.keys()
        assert all(torch.allclose(one[k], two[k], atol=1e-6) for k in one)


@applies_to(lambda family: family.finetune_params is not None)
def test_finetune_continues_from_the_saved_model(trained, tmp_path):
    case, impl, _, ctx, events, _ = trained
    saved = events[-1]
    child = ctx_for(
        tmp_path, case, "job-ft", parent_model_dir=ctx.model_dir, parent_config=saved.config
    )
    params = {k: v for k, v in case.train(steps=2).items() if k != "preset"}
    with pytest.raises(ValidationError):
        list(impl.train(case.train(), child))  # a fine-tune keeps its parent's preset
    result = list(impl.train(params, child))
    assert isinstance(result[-1], ModelSaved)
    tuned = impl.load(child.model_dir, result[-1].config, "cpu")
    parent = impl.load(ctx.model_dir, saved.config, "cpu")
    seeded = {**case.generate, "seed": 4}
    assert outputs(tuned, seeded)[0].data != outputs(parent, seeded)[0].data


@applies_to(lambda family: {"mode", "images"} <= params_of(family))
def test_reconstructs_and_interpolates_uploaded_images(trained):
    case, _, _, _, _, model = trained
    pngs = []
    for color in (0, 255):
        buf = io.BytesIO()
        Image.new("L", (24, 20), color).save(buf, format="PNG")
        pngs.append(base64.b64encode(buf.getvalue()).decode())
    recon = outputs(model, {"mode": "reconstruct", "images": pngs[:1], "num_images": 1, "seed": 1})
    assert len(recon) == 1 and recon[0].meta["mode"] == "reconstruct"
    line = outputs(model, {"mode": "interpolate", "images": pngs, "num_images": 3, "seed": 1})
    assert len(line) == 3 and len({o.data for o in line}) == 3
    with pytest.raises(InvalidInputError) as info:
        outputs(model, {"mode": "reconstruct", "images": ["bm90IGFuIGltYWdl"]})
    assert info.value.errors[0]["field"] == "params.images.0"


@applies_to(lambda family: {"sampler", "guidance_scale"} <= params_of(family))
def test_ddim_sampler_and_classifier_free_guidance(trained):
    case, impl, _, ctx, events, model = trained
    base = {"label": 2, "num_images": 1, "steps": 4, "seed": 9}
    ddpm_out = outputs(model, base)[0].data
    ddim = outputs(model, {**base, "sampler": "ddim"})[0].data
    assert ddim == outputs(model, {**base, "sampler": "ddim"})[0].data
    assert ddim != ddpm_out
    guided = outputs(model, {**base, "sampler": "ddim", "guidance_scale": 4.0})[0].data
    assert guided != ddim
    # A model saved before null labels existed cannot be guided, and says so.
    old_config = {k: v for k, v in events[-1].config.items() if k != "null_label"}
    old = impl.load(ctx.model_dir, old_config, "cpu")
    with pytest.raises(InvalidInputError) as info:
        outputs(old, {**base, "guidance_scale": 2.0})
    assert info.value.errors[0]["field"] == "params.guidance_scale"
    with pytest.raises(ValidationError):
        get_family("ddpm").generate_params.model_validate({"sampler": "euler"})
