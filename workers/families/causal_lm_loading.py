"""Loading a `transformers` model folder: the pretrained base (`AutoModelForCausalLM` +
`AutoTokenizer`, safetensors only) or a registered LoRA version on top of it, its adapters
merged in order. Generation (causal_lm) and LoRA fine-tuning (causal_lm_lora) both load models
this way, so both import this module and neither imports the other's internals.

A registered LoRA version is a folder with the adapter (peft's `adapter_config.json` and
`adapter_model.safetensors`), a copy of the tokenizer, the adapters of its own ancestors under
`parents/NN/` and `genq.json`, whose `base_path` names the pretrained folder it grew from:
loading one loads the base, then merges each ancestor's adapter and its own in order, so
generation runs at the speed of the plain model. Weights are bf16 on CUDA where the GPU
supports it (fp16 otherwise), fp32 on a CPU.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from core.errors import InvalidInputError, ModelError
from workers.families.causal_lm_spec import check_layout
from workers.families.causal_lm_spec import context_length as spec_context_length
from workers.families.checkpoints import CONFIG_NAME
from workers.staging import local_model_folder

ADAPTER_CONFIG = "adapter_config.json"
PARENTS_DIR = "parents"


@contextmanager
def peft_quiet() -> Iterator[None]:
    """peft 0.21 reads an attribute transformers 5 renamed (a FutureWarning each time a model
    is wrapped); nothing for us to change."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        yield


def dtype_for(device: str) -> torch.dtype:
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _quiet() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def load_base(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """(model, tokenizer) of a pretrained folder; ModelError if it does not load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet()
    try:
        check_layout(path)
    except InvalidInputError as exc:
        raise ModelError(exc.detail) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, use_safetensors=True, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise ModelError(f"the model does not load: {type(exc).__name__}: {exc}") from None
    return model, tokenizer


def adapter_chain(version_dir: Path) -> list[Path]:
    """A LoRA version's adapters, oldest ancestor first, its own last."""
    parents = version_dir / PARENTS_DIR
    chain = sorted(parents.iterdir()) if parents.is_dir() else []
    return [*chain, version_dir]


def merge_adapters(model: Any, adapters: list[Path]) -> Any:
    """The model with each adapter folded into its weights, in order."""
    from peft import PeftModel

    for folder in adapters:
        with peft_quiet():
            model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    return model


def is_lora_version(model_dir: Path) -> bool:
    return (model_dir / ADAPTER_CONFIG).is_file()


def load_model(model_dir: Path, config: dict[str, Any], dtype: torch.dtype) -> tuple[Any, Any]:
    """(model, tokenizer) of a registered version: a pretrained folder, or a LoRA version on
    top of its base."""
    if not is_lora_version(model_dir):
        return load_base(model_dir, dtype)
    if not config:
        config = json.loads((model_dir / CONFIG_NAME).read_text())
    base_path = config.get("base_path")
    if not base_path:
        raise ModelError(f"{model_dir} is a LoRA adapter without the base_path of its model")
    model, _ = load_base(local_model_folder(base_path), dtype)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    return merge_adapters(model, adapter_chain(model_dir)), tokenizer


def context_length(model: Any) -> int | None:
    return spec_context_length(model.config.to_dict())
