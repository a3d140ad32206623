"""The `transformers` family's implementation: a causal language model loaded from a folder
on disk (`AutoModelForCausalLM` + `AutoTokenizer`, safetensors only), generating text token by
token; fine-tuning with LoRA lives in `causal_lm_lora`.

A registered LoRA version is a folder with the adapter (peft's `adapter_config.json` and
`adapter_model.safetensors`), a copy of the tokenizer, the adapters of its own ancestors under
`parents/NN/` and `genq.json`, whose `base_path` names the pretrained folder it grew from:
loading one loads the base, then merges each ancestor's adapter and its own in order, so
generation runs at the speed of the plain model.

Generation samples one token at a time with the KV cache, with temperature, top-k and top-p
from a CPU generator seeded per job (the same seed gives the same text on any device), and
streams each new piece of decoded text as a TextDelta event. A piece that ends in half a
UTF-8 character, or that could be the start of a stop string, is held back until it is
complete; the text ends before the first stop string, at the end-of-text token, or after
`max_tokens`. Weights are bf16 on CUDA where the GPU supports it (fp16 otherwise), fp32 on a
CPU.
"""

from __future__ import annotations

import inspect
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from core.errors import InvalidInputError, ModelError
from core.events import Event, Output, TextDelta
from workers.families.base import CanceledError, RunContext, TokenProgress
from workers.families.causal_lm_lora import (
    peft_quiet,
    train,  # noqa: F401 - the family's `train`
)
from workers.families.causal_lm_spec import (
    SEED_MAX,
    CausalLmGenerateParams,
    check_layout,
)
from workers.families.causal_lm_spec import context_length as spec_context_length
from workers.families.checkpoints import CONFIG_NAME
from workers.staging import local_model_folder

ADAPTER_CONFIG = "adapter_config.json"
PARENTS_DIR = "parents"


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


def pick(logits: torch.Tensor, p: CausalLmGenerateParams, gen: torch.Generator) -> int:
    """The next token from (V,) float32 CPU logits (as charlm picks its next byte)."""
    if p.temperature == 0:
        return int(logits.argmax())
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=0)
    if p.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs, 1, generator=gen))


def context_length(model: Any) -> int | None:
    return spec_context_length(model.config.to_dict())


class KvCache:
    """The model's key/value cache across steps. transformers 5 renamed the forward argument
    from `past_key_values` to `cache` model by model; this takes whichever the model has."""

    def __init__(self, model: Any) -> None:
        self.named_cache = "cache" in inspect.signature(model.forward).parameters
        self.value: Any = None
        if self.named_cache:
            from transformers import DynamicCache

            self.value = DynamicCache(config=model.config)

    def step(self, model: Any, input_ids: torch.Tensor) -> Any:
        if self.named_cache:
            return model(input_ids=input_ids, cache=self.value, use_cache=True)
        out = model(input_ids=input_ids, past_key_values=self.value, use_cache=True)
        self.value = out.past_key_values
        return out


class CausalLm:
    """A loaded language model; `generate` continues a prompt or answers a chat."""

    def __init__(self, model: Any, tokenizer: Any, config: dict[str, Any], device: str) -> None:
        self.model, self.tokenizer, self.config, self.device = model, tokenizer, config, device

    def prompt_ids(self, p: CausalLmGenerateParams) -> list[int]:
        tok = self.tokenizer
        if p.messages is not None:
            if not getattr(tok, "chat_template", None):
                raise InvalidInputError.one(
                    "params.messages",
                    "this model's tokenizer has no chat template: send `prompt` instead",
                )
            chat = [m.model_dump() for m in p.messages]
            text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            ids = list(tok(text, add_special_tokens=False)["input_ids"])
        else:
            ids = list(tok(p.prompt or "")["input_ids"]) if p.prompt else []
        if not ids:  # an empty prompt starts after the beginning- (or end-) of-text token
            start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            if start is None:
                raise InvalidInputError.one("params.prompt", "this model needs a non-empty prompt")
            ids = [start]
        limit = context_length(self.model)
        if limit is not None and len(ids) + p.max_tokens > limit:
            field = "params.max_tokens" if len(ids) < limit else "params.prompt"
            raise InvalidInputError.one(
                field,
                f"the prompt ({len(ids)} tokens) and max_tokens ({p.max_tokens}) exceed the"
                f" model's context of {limit} tokens",
            )
        return ids

    def generate(self, params: dict[str, Any], ctx: RunContext) -> Iterator[Event]:
        p = CausalLmGenerateParams.model_validate(params)
        seed = p.seed if p.seed is not None else secrets.randbelow(SEED_MAX + 1)
        gen = torch.Generator().manual_seed(seed)
        ids = self.prompt_ids(p)
        eos = self.tokenizer.eos_token_id
        hold = max((len(s) for s in p.stop), default=1) - 1  # a stop string may be arriving
        completion: list[int] = []
        sent, text, finish = 0, "", "length"
        cache = KvCache(self.model)
        step_input = torch.tensor([ids], device=self.device)  # (1, T)
        progress = TokenProgress(p.max_tokens)
        for _ in range(p.max_tokens):
            if ctx.is_canceled():
                raise CanceledError(f"job {ctx.job_id} was canceled")
            with torch.no_grad():
                out = cache.step(self.model, step_input)
            token = pick(out.logits[0, -1].float().cpu(), p, gen)
            if token == eos:
                finish = "eos"
                break
            completion.append(token)
            step_input = torch.tensor([[token]], device=self.device)
            text = self.tokenizer.decode(completion, skip_special_tokens=True)
            cut = min(
                (i for s in p.stop if (i := text.find(s, max(0, sent - hold))) >= 0), default=-1
            )
            if cut >= 0:
                text, finish = text[:cut], "stop"
                break
            ready = len(text) - hold
            if text.endswith("\ufffd"):  # half a UTF-8 character so far
                ready = min(ready, len(text) - 1)
            if ready > sent:
                yield TextDelta(len(completion) - 1, text[sent:ready])
                sent = ready
            if (event := progress.after(len(completion))) is not None:
                yield event
        if finish != "stop":
            text = self.tokenizer.decode(completion, skip_special_tokens=True)
        if len(text) > sent:
            yield TextDelta(len(completion), text[sent:])
        yield progress.done(len(completion))
        meta = {
            "seed": seed,
            "prompt_tokens": len(ids),
            "completion_tokens": len(completion),
            "finish_reason": finish,
            "params": {**p.model_dump(exclude={"prompt", "messages"}), "seed": seed},
        }
        yield Output("output.txt", "text", "text/plain; charset=utf-8", text.encode(), meta)


def load(model_dir: Path | None, config: dict[str, Any], device: str) -> CausalLm:
    if model_dir is None:
        raise ModelError("a transformers model needs its folder")
    model, tokenizer = load_model(Path(model_dir), config, dtype_for(device))
    model.to(device).eval()
    return CausalLm(model, tokenizer, config, device)
