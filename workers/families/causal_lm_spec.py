"""The `transformers` family: any causal language model a self-hoster has on disk (a folder
that `AutoModelForCausalLM` and `AutoTokenizer` load), registered with `POST /v1/models`;
generation from a prompt or chat messages, and LoRA fine-tuning (peft) on a text data set.

Besides the parameter schemas, this module checks a model folder's layout without torch, so
the API can refuse a wrong folder at once: `config.json` with a `model_type`, a tokenizer, and
safetensors weights (pickled `.bin` weights could run code when loaded, and are refused).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from core.errors import InvalidInputError
from core.states import JobKind
from workers.families.base import (
    CheckpointEvery,
    Family,
    OpenAIShape,
    Resources,
    StopStrings,
    TextSeed,
    TopP,
    TrainSeed,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(..., max_length=100_000)


class CausalLmGenerateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(
        None, max_length=100_000, description="Text the output continues (or give `messages`)."
    )
    messages: list[ChatMessage] | None = Field(
        None,
        min_length=1,
        max_length=500,
        description="A chat, formatted with the tokenizer's chat template (or give `prompt`).",
    )
    max_tokens: int = Field(256, ge=1, le=32_768, description="Tokens to generate at most.")
    temperature: float = Field(
        1.0, ge=0, le=10, description="Softmax temperature; 0 always takes the likeliest token."
    )
    top_k: int = Field(0, ge=0, le=100_000, description="Sample among the k likeliest; 0: all.")
    top_p: TopP = 1.0
    stop: StopStrings = Field(default_factory=list)
    seed: TextSeed = None

    @field_validator("messages")
    @classmethod
    def _one_input(
        cls, messages: list[ChatMessage] | None, info: ValidationInfo
    ) -> list[ChatMessage] | None:
        if messages is not None and info.data.get("prompt") is not None:
            raise ValueError("give either `prompt` or `messages`, not both")
        return messages


class CausalLmFinetuneParams(BaseModel):
    """LoRA: low-rank adapters on the attention (and MLP) projections, the base frozen."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, le=4096, description="LoRA scale numerator (alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Names of the linear layers to adapt. Unset: the architecture's usual"
        " attention projections.",
    )
    steps: int = Field(200, ge=1, le=1_000_000, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, le=1024)
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    seq_len: int = Field(256, ge=8, le=131_072, description="Tokens per training window.")
    seed: TrainSeed = 0
    checkpoint_every: CheckpointEvery = 50


def check_layout(path: Path, field: str = "path") -> dict[str, Any]:
    """What a model folder holds (model type, architecture), or 422 naming `field`. Looks at
    files only: loading happens in a worker."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InvalidInputError.one(field, f"{path} has no config.json (not a model folder)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInputError.one(field, f"config.json does not parse: {exc}") from exc
    if not isinstance(config, dict) or not config.get("model_type"):
        raise InvalidInputError.one(field, "config.json has no model_type")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise InvalidInputError.one(field, f"{path} has no tokenizer files")
    files = [f for f in path.iterdir() if f.is_file()]
    if not any(f.suffix == ".safetensors" for f in files):
        pickled = [f.name for f in files if f.suffix in PICKLE_SUFFIXES]
        detail = f" (found {pickled[0]}: pickle weights are refused)" if pickled else ""
        raise InvalidInputError.one(field, f"{path} has no .safetensors weights{detail}")
    architectures = config.get("architectures") or []
    return {
        "model_type": config["model_type"],
        "architectures": list(architectures),
        "chat_template": has_chat_template(path),
        "context_length": context_length(config),
    }


def has_chat_template(path: Path) -> bool:
    """Whether the tokenizer of the folder can format a chat (transformers keeps the template
    in tokenizer_config.json, or beside it in chat_template.jinja / .json)."""
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    try:
        tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(isinstance(tokenizer_config, dict) and tokenizer_config.get("chat_template"))


def context_length(config: dict[str, Any]) -> int | None:
    """The model's context in tokens, from the names architectures give it in config.json."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = config.get(name)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_model_params(kind: JobKind, params: dict[str, Any], config: dict[str, Any]) -> None:
    """At submit: what the registered folder cannot do is a 422 then, not a failed job later.
    (A model registered before these keys were recorded is checked by the worker only.)"""
    if kind != JobKind.GENERATE:
        return
    if params.get("messages") is not None and config.get("chat_template") is False:
        raise InvalidInputError.one(
            "params.messages", "this model's tokenizer has no chat template: send `prompt` instead"
        )
    limit = config.get("context_length")
    if isinstance(limit, int) and params.get("max_tokens", 0) >= limit:
        raise InvalidInputError.one(
            "params.max_tokens", f"the model's context is {limit} tokens, prompt included"
        )


def batch_key(p: CausalLmGenerateParams) -> str:
    """Every generate job of a model can share its batch: sampling, seed, stop strings and
    lengths are per row (causal_lm_batch.py)."""
    return "text"


FAMILY = Family(
    name="transformers",
    description="Any causal language model on disk (transformers), registered with"
    " POST /v1/models; prompt or chat generation, streamed; LoRA fine-tuning.",
    implementation="workers.families.causal_lm",
    generate_params=CausalLmGenerateParams,
    finetune_params=CausalLmFinetuneParams,
    dataset_kinds=("text",),
    resources=Resources(num_gpus=1.0, num_cpus=1.0, gpu_memory_gb=8.0),
    check_model_params=check_model_params,
    check_layout=check_layout,
    openai=OpenAIShape.CHAT,
    # Rows (jobs) decoded together by one forward pass; GENQ_BATCH_MAX_ROWS may lower it.
    max_batch_size=64,
    batch_key=batch_key,
)
