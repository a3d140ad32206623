"""Training checkpoints and saved models as safetensors, shared by ddpm, gan, vae and charlm.

A checkpoint is one safetensors file holding the weights of every named module, the state of
every named optimizer, and (in its metadata) the step, the loss and the model configuration it
was made for: a restarted trainer resumes from it, and refuses one made for another
configuration. A saved model is a folder with `model.safetensors` (weights only) and
`genq.json` (the configuration), swapped into place atomically (`new_folder`, which a family
that saves in another layout, such as ddpm's diffusers folders, uses directly). Nothing is ever
pickled.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from core.artifacts import write_atomic
from core.errors import ModelError

CHECKPOINT_NAME = "checkpoint.safetensors"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "genq.json"


def _canonical(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


def save_checkpoint(
    path: Path,
    fmt: str,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    step: int,
    config: dict[str, Any],
    loss: float,
) -> None:
    """Every module's weights and every optimizer's state in one file, written atomically."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
    groups: dict[str, Any] = {}
    for name, optimizer in optimizers.items():
        state = optimizer.state_dict()
        groups[name] = state["param_groups"]
        for index, values in state["state"].items():
            for key, value in values.items():
                tensors[f"optim-{name}.{index}.{key}"] = torch.as_tensor(value).cpu().contiguous()
    metadata = {
        "format": fmt,
        "step": str(step),
        "param_groups": json.dumps(groups),
        "config": _canonical(config),
        "loss": repr(loss),
    }
    write_atomic(path, save(tensors, metadata=metadata))


def read_checkpoint_meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_checkpoint(
    path: Path,
    fmt: str,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    config: dict[str, Any],
) -> tuple[int, float]:
    """Restore what `save_checkpoint` wrote; returns (step, loss) at the checkpoint."""
    meta = read_checkpoint_meta(path)
    if meta.get("format") != fmt:
        raise ModelError(f"{path.name} is not a {fmt} checkpoint")
    if meta["config"] != _canonical(config):
        raise ModelError("the checkpoint was made for a different model configuration")
    tensors = load_file(str(path))
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict(
            {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        )
    groups = json.loads(meta["param_groups"])
    for name, optimizer in optimizers.items():
        state: dict[int, dict[str, torch.Tensor]] = {}
        prefix = f"optim-{name}."
        for key, value in tensors.items():
            if key.startswith(prefix):
                index, slot = key[len(prefix) :].split(".", 1)
                state.setdefault(int(index), {})[slot] = value
        optimizer.load_state_dict({"state": state, "param_groups": groups[name]})
    return int(meta["step"]), float(meta.get("loss", "nan"))


@contextmanager
def new_folder(model_dir: Path) -> Iterator[Path]:
    """A temporary sibling of `model_dir` to fill; swapped into place as `model_dir` when the
    block ends, removed if it raises, so a reader never sees a half-written model."""
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=model_dir.parent, prefix=f".{model_dir.name}."))
    try:
        yield tmp
        if model_dir.exists():
            shutil.rmtree(model_dir)
        tmp.rename(model_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model(module: torch.nn.Module, config: dict[str, Any], model_dir: Path) -> None:
    """Weights and configuration into a new folder (`new_folder`)."""
    with new_folder(model_dir) as tmp:
        weights = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(weights, str(tmp / WEIGHTS_NAME), metadata={"format": config["family"]})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))


def load_model_files(
    model_dir: Path | None, config: dict[str, Any], family: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, config) of a saved model; a registry row without its config uses the copy
    saved beside the weights."""
    if model_dir is None:
        raise ModelError(f"a {family} model needs its folder")
    if not config:
        config = json.loads((Path(model_dir) / CONFIG_NAME).read_text())
    if config.get("family") != family:
        raise ModelError(f"{model_dir} holds a {config.get('family')} model, not {family}")
    return load_file(str(Path(model_dir) / WEIGHTS_NAME)), config


class AdapterWeights:
    """The adapter part of a peft-wrapped module (a language model, a UNet), shaped like a
    module for save_checkpoint/load_checkpoint: only the LoRA weights are saved and loaded."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return dict(get_peft_model_state_dict(self.model))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, state)
