"""The `ngram` family's implementation (genq's workers import it; torch lives here).

The model is the neural probabilistic language model of Bengio et al. 2003 over bytes: the
last `context` bytes are embedded, concatenated, passed through one tanh hidden layer, and
mapped to logits over the 256 next-byte values. Training samples random windows of the data
set's text; checkpoints and the saved model are safetensors (genq's checkpoint helpers), so a
restarted trainer resumes where its last checkpoint left off.

Generation runs every job of a batch as one row of each forward pass, padded to a fixed number
of rows so that a job's bytes do not depend on the jobs it shares the batch with; each job
samples from its own seeded generator, streams its text, reports tokens made of `max_tokens`
as progress, and stops alone when it is canceled.

Shapes: B rows, K context bytes, E embedding, H hidden, V = 256.
"""

from __future__ import annotations

import codecs
import math
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import ModelError
from core.events import Event, Log, Metric, ModelSaved, Output, Progress, TextDelta
from genq_family_ngram.spec import SEED_MAX, NgramGenerateParams, NgramTrainParams
from workers.datasets import load_text
from workers.families.base import (
    BatchItem,
    CanceledError,
    RunContext,
    TokenProgress,
    TrainContext,
    run_alone,
)
from workers.families.checkpoints import (
    CHECKPOINT_NAME,
    load_checkpoint,
    load_model_files,
    save_checkpoint,
    save_model,
)

CHECKPOINT_FORMAT = "genq-ngram-checkpoint/1"
V = 256
METRIC_EVERY = 10
# Every forward pass of generation has at least this many rows (the family's max_batch_size).
PAD_ROWS = 8


class Ngram(nn.Module):
    def __init__(self, context: int, embedding: int, hidden: int) -> None:
        super().__init__()
        self.context = context
        self.emb = nn.Embedding(V, embedding)
        self.hidden = nn.Linear(context * embedding, hidden)
        self.out = nn.Linear(hidden, V)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, K) byte ids -> next-byte logits (B, V)."""
        x = self.emb(idx).flatten(1)  # (B, K*E)
        return self.out(torch.tanh(self.hidden(x)))  # (B, V)


def build(config: dict[str, Any]) -> Ngram:
    return Ngram(config["context"], config["embedding"], config["hidden"])


def windows(data: torch.Tensor, B: int, K: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """B random (context (B, K), next byte (B,)) pairs from `data`."""
    starts = torch.randint(0, len(data) - K, (B,), generator=gen)
    rows = torch.stack([data[s : s + K + 1] for s in starts.tolist()])  # (B, K+1)
    return rows[:, :-1], rows[:, -1]


def train(params: dict[str, Any], ctx: TrainContext) -> Iterator[Event]:
    p = NgramTrainParams.model_validate(params)
    config = {"family": "ngram", "context": p.context, "embedding": p.embedding, "hidden": p.hidden}
    text = load_text(ctx.dataset)
    if len(text) < 2 * (p.context + 1):
        raise ModelError(f"the text is too short: at least {2 * (p.context + 1)} bytes needed")
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)
        model = build(config)
    device = torch.device(ctx.device)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.learning_rate)
    yield Log(f"ngram: {len(data)} bytes of text, context {p.context}, on {device}")

    checkpoint = ctx.checkpoint_dir / CHECKPOINT_NAME
    start, loss_value = 0, float("nan")
    if checkpoint.exists():
        start, loss_value = load_checkpoint(
            checkpoint, CHECKPOINT_FORMAT, {"ngram": model}, {"ngram": optimizer}, config
        )
        start = min(start, p.steps)
        yield Log(f"resumed from step {start}")
    for step in range(start + 1, p.steps + 1):
        if ctx.is_canceled():
            raise CanceledError(f"job {ctx.job_id} was canceled")
        gen = torch.Generator().manual_seed(p.seed * 2**20 + step)
        x, y = windows(data, p.batch_size, p.context, gen)
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise ModelError(f"the loss diverged at step {step}; try a lower learning_rate")
        yield Progress(step, p.steps, "training")
        if step % METRIC_EVERY == 0 or step == p.steps:
            yield Metric(step, {"loss": loss_value, "bits_per_char": loss_value / math.log(2)})
        if step % p.checkpoint_every == 0 or step == p.steps:
            save_checkpoint(
                checkpoint,
                CHECKPOINT_FORMAT,
                {"ngram": model},
                {"ngram": optimizer},
                step,
                config,
                loss_value,
            )
            yield Log(f"checkpoint at step {step}", level="debug")
    model.eval()
    sample = NgramLm(model.cpu(), config).sample_text(p.seed)
    yield Output("sample.txt", "text", "text/plain; charset=utf-8", sample.encode(), {})
    save_model(model, config, ctx.model_dir)
    yield ModelSaved(
        path=ctx.model_dir_rel,
        config={**config, "seed": p.seed, "steps": p.steps},
        metrics={"final_loss": loss_value},
    )


@dataclass(eq=False)
class _Row:
    """One job's generation in a batch."""

    index: int
    params: NgramGenerateParams
    ctx: RunContext
    seed: int
    tokens: list[int]
    gen: torch.Generator
    progress: TokenProgress
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    text: str = ""
    made: int = 0


class NgramLm:
    """A loaded ngram model."""

    def __init__(self, model: Ngram, config: dict[str, Any]) -> None:
        self.model, self.config = model, config
        self.device = next(model.parameters()).device

    def sample_text(self, seed: int) -> str:
        events = self.generate({"max_tokens": 120, "seed": seed}, RunContext("sample", "cpu"))
        return "".join(e.text for e in events if isinstance(e, TextDelta))

    def generate(self, params: dict[str, Any], ctx: RunContext) -> Iterator[Event]:
        yield from run_alone(self.generate_batch, params, ctx)

    def generate_batch(self, jobs: list[tuple[dict[str, Any], RunContext]]) -> Iterator[BatchItem]:
        rows: list[_Row] = []
        for index, (params, ctx) in enumerate(jobs):
            p = NgramGenerateParams.model_validate(params)
            seed = p.seed if p.seed is not None else secrets.randbelow(SEED_MAX + 1)
            tokens = [ord("\n")] * self.model.context + list(p.prompt.encode("utf-8"))
            gen = torch.Generator().manual_seed(seed)
            rows.append(_Row(index, p, ctx, seed, tokens, gen, TokenProgress(p.max_tokens)))
        K = self.model.context
        while rows:
            for row in [r for r in rows if r.ctx.is_canceled()]:
                rows.remove(row)
                yield row.index, CanceledError(f"job {row.ctx.job_id} was canceled")
            if not rows:
                return
            n = max(PAD_ROWS, len(rows), *(r.ctx.min_rows for r in rows))
            context = torch.zeros(n, K, dtype=torch.long)  # (B, K); padding rows are ignored
            for i, row in enumerate(rows):
                context[i] = torch.tensor(row.tokens[-K:])
            with torch.no_grad():
                logits = self.model(context.to(self.device)).float().cpu()  # (B, V)
            for i, row in enumerate(list(rows)):
                yield from self._step(row, logits[i])
                if row.made == row.params.max_tokens:
                    rows.remove(row)
                    yield from self._finish(row)

    def _step(self, row: _Row, logits: torch.Tensor) -> Iterator[BatchItem]:
        """Sample row's next byte from its (V,) logits and stream what it adds to the text."""
        if row.params.temperature == 0:
            token = int(logits.argmax())
        else:
            probs = torch.softmax(logits / row.params.temperature, dim=0)
            token = int(torch.multinomial(probs, 1, generator=row.gen))
        row.tokens.append(token)
        piece = row.decoder.decode(bytes([token]))
        if piece:
            yield row.index, TextDelta(row.made, piece)
            row.text += piece
        row.made += 1
        if (event := row.progress.after(row.made)) is not None:
            yield row.index, event

    def _finish(self, row: _Row) -> Iterator[BatchItem]:
        tail = row.decoder.decode(b"", final=True)
        if tail:
            yield row.index, TextDelta(row.made, tail)
            row.text += tail
        yield row.index, row.progress.done(row.made)
        meta = {
            "seed": row.seed,
            "completion_tokens": row.made,
            "params": {**row.params.model_dump(exclude={"prompt"}), "seed": row.seed},
        }
        data = row.text.encode()
        yield row.index, Output("output.txt", "text", "text/plain; charset=utf-8", data, meta)


def load(model_dir: Path | None, config: dict[str, Any], device: str) -> NgramLm:
    weights, config = load_model_files(model_dir, config, "ngram")
    model = build(config)
    model.load_state_dict(weights)
    model.to(device).eval()
    return NgramLm(model, config)
