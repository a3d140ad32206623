"""The `diffusers` and `transformers` implementations called directly (no Ray, no queue) on the
tiny folders of tests/support/pretrained_models.py: layout checks, cancel between denoising steps,
per-image seeds, stop strings that are never streamed, LoRA resume after a cancel equal to an
uninterrupted run, and what the loaders refuse. The stack test covers the same code through
the API; these cover what it cannot reach cheaply."""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from core.errors import InvalidInputError
from core.events import Log, ModelSaved, Output, Progress, TextDelta
from core.states import JobKind
from tests.support.pretrained_models import build_tiny_lm, build_tiny_sd
from workers.families import causal_lm, causal_lm_spec, sd_pipeline, sd_spec
from workers.families.base import CanceledError, DatasetRef, RunContext, TrainContext

FOX = "The quick brown fox jumps over the lazy dog. " * 60


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    found = {
        "sd": build_tiny_sd(root / "sd"),
        "lm": build_tiny_lm(root / "lm"),
        "lm-plain": build_tiny_lm(root / "lm-plain", chat_template=False),
    }
    text = root / "fox"
    text.mkdir()
    (text / "text.txt").write_text(FOX)
    found["fox"] = text
    return found


def cancel_after(calls: int) -> tuple[Callable[[], bool], list[int]]:
    """An is_canceled that answers True from its `calls`-th question on, and a record of how
    often it was asked (so a test can prove the cancel was seen)."""
    asked: list[int] = []

    def is_canceled() -> bool:
        asked.append(1)
        return len(asked) >= calls

    return is_canceled, asked


def test_layouts_are_read_without_loading(folders: dict[str, Path], tmp_path: Path) -> None:
    assert sd_spec.check_layout(folders["sd"])["pipeline"] == "StableDiffusionPipeline"
    lm = causal_lm_spec.check_layout(folders["lm"])
    assert lm == {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "chat_template": True,
        "context_length": 128,
    }
    assert causal_lm_spec.check_layout(folders["lm-plain"])["chat_template"] is False
    with pytest.raises(InvalidInputError) as refused:
        sd_spec.check_layout(folders["lm"])
    assert refused.value.errors[0]["field"] == "path"
    pickled = shutil.copytree(folders["sd"], tmp_path / "pickled")
    weights = pickled / "vae" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(InvalidInputError, match="pickle"):
        sd_spec.check_layout(pickled)


def test_submit_time_checks_use_what_the_folder_recorded() -> None:
    config = {"chat_template": False, "context_length": 128}
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    with pytest.raises(InvalidInputError) as refused:
        causal_lm_spec.check_model_params(JobKind.GENERATE, chat, config)
    assert refused.value.errors[0]["field"] == "params.messages"
    with pytest.raises(InvalidInputError) as refused:
        causal_lm_spec.check_model_params(JobKind.GENERATE, {"max_tokens": 128}, config)
    assert refused.value.errors[0]["field"] == "params.max_tokens"
    causal_lm_spec.check_model_params(JobKind.GENERATE, {"max_tokens": 100}, config)


def test_diffusers_stops_between_steps_when_canceled(folders: dict[str, Path]) -> None:
    model = sd_pipeline.load(folders["sd"], {}, "cpu")
    is_canceled, asked = cancel_after(2)
    events: list[Any] = []
    params = {"prompt": "a fox", "steps": 5, "seed": 1, "scheduler": "ddim"}
    with pytest.raises(CanceledError):
        for event in model.generate(params, RunContext("c", "cpu", is_canceled)):
            events.append(event)
    assert len(asked) == 2  # asked after each of the first two steps, canceled at the second
    assert [type(e) for e in events] == [Log, Progress, Progress]
    # The pipeline is usable afterwards, with its own scheduler back.
    done = list(model.generate({**params, "steps": 2}, RunContext("d", "cpu")))
    assert isinstance(done[-1], Output)
    assert type(model.pipe.scheduler).__name__ == "PNDMScheduler"
    long_prompt = {**params, "steps": 1, "prompt": "a fox in the snow at night"}
    logs = [e for e in model.generate(long_prompt, RunContext("l", "cpu")) if isinstance(e, Log)]
    assert logs[1].level == "warning" and "reads the first 16" in logs[1].message


def test_diffusers_image_i_is_its_own_seed(folders: dict[str, Path]) -> None:
    model = sd_pipeline.load(folders["sd"], {}, "cpu")
    params = {"prompt": "a fox", "steps": 2, "scheduler": "euler"}

    def pixels(seed: int, num_images: int) -> list[np.ndarray]:
        events = model.generate(
            {**params, "seed": seed, "num_images": num_images}, RunContext("s", "cpu")
        )
        outputs = [e for e in events if isinstance(e, Output)]
        return [np.asarray(Image.open(io.BytesIO(o.data)), dtype=np.int16) for o in outputs]

    batch = pixels(10, 3)
    alone = pixels(12, 1)[0]
    assert np.abs(batch[2] - alone).max() <= 1  # batched float maths may round one step apart
    assert np.abs(batch[0] - batch[2]).max() > 1


def test_stop_strings_end_the_text_and_are_never_streamed(folders: dict[str, Path]) -> None:
    model = causal_lm.load(folders["lm"], {}, "cpu")
    greedy = {"prompt": "The quick", "max_tokens": 16, "temperature": 0, "seed": 0}
    free = [e for e in model.generate(greedy, RunContext("a", "cpu")) if isinstance(e, Output)]
    full = free[0].data.decode()
    stop = full[3:6]  # three characters from the middle of what it writes
    events = list(model.generate({**greedy, "stop": [stop]}, RunContext("b", "cpu")))
    (output,) = [e for e in events if isinstance(e, Output)]
    deltas = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert output.data.decode() == deltas == full[: full.index(stop)]
    assert output.meta["finish_reason"] == "stop"
    assert free[0].meta["finish_reason"] == "length"
    # Progress is tokens made of max_tokens; a text cut by its stop string ends complete.
    progress = [e for e in events if isinstance(e, Progress)]
    made = output.meta["completion_tokens"]
    assert progress[-1] == Progress(made, made, "tokens") and made < 16
    assert all(p.total == 16 for p in progress[:-1])


def test_lm_refuses_what_does_not_fit(folders: dict[str, Path]) -> None:
    plain = causal_lm.load(folders["lm-plain"], {}, "cpu")
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with pytest.raises(InvalidInputError) as refused:
        list(plain.generate(chat, RunContext("c", "cpu")))
    assert refused.value.errors[0]["field"] == "params.messages"
    with pytest.raises(InvalidInputError) as refused:
        list(plain.generate({"prompt": "The quick", "max_tokens": 127}, RunContext("c", "cpu")))
    assert refused.value.errors[0]["field"] == "params.max_tokens"


def lora_ctx(root: Path, folders: dict[str, Path], job_id: str, **kw: Any) -> TrainContext:
    return TrainContext(
        job_id=job_id,
        device="cpu",
        dataset=DatasetRef("fox", "text", folders["fox"]),
        checkpoint_dir=root / "checkpoints" / job_id,
        model_dir=root / "models" / job_id,
        model_dir_rel=f"models/{job_id}",
        parent_model_dir=folders["lm"],
        **kw,
    )


def test_lora_resumes_to_the_same_adapter(folders: dict[str, Path], tmp_path: Path) -> None:
    params = {"steps": 6, "batch_size": 2, "seq_len": 16, "checkpoint_every": 3, "seed": 5}
    whole = list(causal_lm.train(params, lora_ctx(tmp_path, folders, "whole")))
    assert isinstance(whole[-1], ModelSaved)

    is_canceled, asked = cancel_after(5)  # canceled before step 5: the checkpoint is step 3
    cut = lora_ctx(tmp_path, folders, "cut", is_canceled=is_canceled)
    with pytest.raises(CanceledError):
        list(causal_lm.train(params, cut))
    assert len(asked) == 5
    assert not cut.model_dir.exists()
    resumed = list(causal_lm.train(params, lora_ctx(tmp_path, folders, "cut")))
    assert any(isinstance(e, Log) and e.message == "resumed from step 3" for e in resumed)
    a = load_file(str(tmp_path / "models" / "whole" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "models" / "cut" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_lora_names_bad_target_modules(folders: dict[str, Path], tmp_path: Path) -> None:
    params = {"steps": 1, "seq_len": 16, "target_modules": ["no_such_layer"]}
    with pytest.raises(InvalidInputError) as refused:
        list(causal_lm.train(params, lora_ctx(tmp_path, folders, "bad")))
    assert refused.value.errors[0]["field"] == "params.target_modules"


def test_pretrained_roots_limit_absolute_paths(tmp_path: Path) -> None:
    from api.catalog import pretrained_folder
    from core.settings import Settings

    allowed = tmp_path / "models"
    (allowed / "sd15").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    settings = Settings(var_dir=tmp_path, pretrained_roots=f"{allowed}:{tmp_path / 'more'}")
    assert pretrained_folder(settings, str(allowed / "sd15")) == (
        allowed / "sd15",
        str(allowed / "sd15"),
    )
    for outside in (tmp_path / "elsewhere", allowed / ".." / "elsewhere"):
        with pytest.raises(InvalidInputError) as refused:
            pretrained_folder(settings, str(outside))
        assert refused.value.errors[0]["field"] == "path"
