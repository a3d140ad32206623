"""LoRA fine-tuning for the `transformers` family (Hu et al. 2021, "LoRA: Low-Rank Adaptation
of Large Language Models"), with peft.

The base model is frozen; low-rank adapters on the named linear layers (by default the
attention projections peft knows for the architecture) are trained on random windows of
`seq_len` tokens of a text data set, the last 5% of the tokens held out for a validation loss
at each checkpoint. A fine-tune of a LoRA version first merges the parent's adapters into the
base, so each version adds one adapter on top of its parent.

Checkpoints hold only the adapter weights and the optimizer state (safetensors, through
`checkpoints.save_checkpoint`), so they stay small even for a large base; a restarted trainer
resumes from the last one. The saved version is a folder with the adapter, the tokenizer, the
ancestors' adapters under `parents/NN/` and `genq.json` naming the base folder; it is swapped
into place atomically. Window i of step s is drawn from a generator seeded with (seed, s), so
a resumed run sees the same data as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from core.errors import InvalidInputError, ModelError
from core.events import Event, Log, Metric, Progress
from workers.datasets import load_text
from workers.families.base import TrainContext
from workers.families.causal_lm_loading import (
    PARENTS_DIR,
    adapter_chain,
    context_length,
    dtype_for,
    is_lora_version,
    load_model,
    peft_quiet,
)
from workers.families.causal_lm_spec import CausalLmFinetuneParams
from workers.families.checkpoints import CONFIG_NAME, AdapterWeights, new_folder
from workers.families.training import LossWindow, TrainingRun, check_loss, step_seed

CHECKPOINT_FORMAT = "genq-lora-checkpoint/1"
METRIC_EVERY = 10
HELD_OUT = 0.05
EVAL_BATCHES = 4
TOKENIZE_CHUNK = 1 << 20  # characters per tokenizer call on a large text


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole text as one (N,) tensor of token ids, tokenized in chunks."""
    ids: list[int] = []
    for start in range(0, len(text), TOKENIZE_CHUNK):
        piece = text[start : start + TOKENIZE_CHUNK]
        ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def windows(data: torch.Tensor, B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """B random windows of T tokens: (B, T)."""
    starts = torch.randint(0, len(data) - T + 1, (B,), generator=gen)
    return torch.stack([data[s : s + T] for s in starts.tolist()])


def lora_model(model: Any, p: CausalLmFinetuneParams, model_type: str) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    config = LoraConfig(
        # GPT-2-style models keep their linear layers transposed (Conv1D).
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
        r=p.r,
        lora_alpha=p.alpha,
        lora_dropout=p.dropout,
        target_modules=p.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        with peft_quiet():
            return get_peft_model(model, config)
    except ValueError as exc:
        if p.target_modules is None:
            message = f"no default LoRA target modules for {model_type!r} models: name them"
        else:
            message = f"not linear layers of this {model_type} model: {exc}"
        raise InvalidInputError.one("params.target_modules", message) from None


def mean_loss(model: Any, data: torch.Tensor, B: int, T: int, seed: int, device: str) -> float:
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for _ in range(EVAL_BATCHES):
            x = windows(data, B, T, gen).to(device)
            total += model(input_ids=x, labels=x).loss.item()
    return total / EVAL_BATCHES


def save_version(
    model: Any, tokenizer: Any, parent_dir: Path, config: dict[str, Any], model_dir: Path
) -> None:
    """Adapter, tokenizer, ancestors' adapters and genq.json into a new folder (swapped into
    place: checkpoints.new_folder)."""
    with new_folder(model_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if is_lora_version(parent_dir):
            for i, folder in enumerate(adapter_chain(parent_dir)):
                target = tmp / PARENTS_DIR / f"{i:02d}"
                target.mkdir(parents=True)
                for name in ("adapter_config.json", "adapter_model.safetensors"):
                    shutil.copyfile(folder / name, target / name)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))


def train(params: dict[str, Any], ctx: TrainContext) -> Iterator[Event]:
    if ctx.parent_model_dir is None:
        raise InvalidInputError.one("kind", "a transformers model is fine-tuned, not trained")
    p = CausalLmFinetuneParams.model_validate(params)
    parent_dir = Path(ctx.parent_model_dir)
    parent_config = dict(ctx.parent_config)
    # As registered (a store key, an s3:// URL or an absolute path): valid on every machine.
    base_path = parent_config.get("base_path") or ctx.parent_model_path or str(parent_dir)
    # The frozen base may be half precision on a GPU; the adapters peft adds stay fp32.
    model, tokenizer = load_model(parent_dir, parent_config, dtype_for(ctx.device))
    model_type = str(model.config.model_type)
    limit = context_length(model)
    if limit is not None and p.seq_len > limit:
        raise InvalidInputError.one(
            "params.seq_len", f"longer than the model's context of {limit} tokens"
        )
    text = load_text(ctx.dataset).decode("utf-8", errors="replace")
    data = tokenize(tokenizer, text)
    n_val = max(int(len(data) * HELD_OUT), p.seq_len)
    if len(data) - n_val < p.seq_len:
        raise ModelError(
            f"the text is too short: {len(data)} tokens, at least {2 * p.seq_len} needed"
            " for seq_len windows to train on and hold out"
        )
    train_data, val_data = data[:-n_val], data[-n_val:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)  # the adapters' initialisation
        model = lora_model(model, p, model_type)
    model.to(ctx.device).train()
    trainable = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=p.learning_rate, weight_decay=0.0)
    lora = {"r": p.r, "alpha": p.alpha, "dropout": p.dropout}
    config = {
        "family": "transformers",
        "kind": "lora",
        "base_path": base_path,
        "model_type": model_type,
        "lora": {**lora, "target_modules": sorted(model.peft_config["default"].target_modules)},
        # What the API checks a generate job against (causal_lm_spec.check_model_params).
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "context_length": limit,
    }
    yield Log(
        f"LoRA on {model_type}: {sum(q.numel() for q in trainable)} trainable parameters,"
        f" {len(train_data)} training tokens, {len(val_data)} held out, on {ctx.device}"
    )

    modules: dict[str, Any] = {"adapter": AdapterWeights(model)}
    run = TrainingRun(ctx, CHECKPOINT_FORMAT, modules, {"adapter": optimizer}, config, p)
    yield from run.resume()
    val_loss = float("nan")
    B, T = p.batch_size, p.seq_len
    window = LossWindow()
    for step in run.steps():
        lr = p.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / p.steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        seed = step_seed(p.seed, step)
        x = windows(train_data, B, T, torch.Generator().manual_seed(seed)).to(ctx.device)
        torch.manual_seed(seed)  # the adapters' dropout: a resumed run draws the same masks
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        check_loss(step, loss)
        window.add(loss.item())
        yield Progress(step, p.steps, "fine-tuning")
        if run.is_due(step, METRIC_EVERY):
            (run.loss,) = window.means()
            yield Metric(step, {"loss": run.loss, "tokens_per_s": window.rate(B * T)})
            window = LossWindow()
        if run.is_due(step, p.checkpoint_every):
            model.eval()
            val_loss = mean_loss(model, val_data, min(B, 8), T, p.seed, ctx.device)
            model.train()
            yield Metric(step, {"val_loss": val_loss})
            yield run.checkpoint(step)

    model.eval()
    save_version(model, tokenizer, parent_dir, config, ctx.model_dir)
    yield from run.saved({"final_loss": run.loss, "val_loss": val_loss}, "the adapter")
