"""The `charlm` family: a GPT-style transformer over bytes.

The model is the decoder-only transformer of Radford et al. 2018/2019 (GPT, GPT-2) at toy
size, written the way nanoGPT writes it: token and position embeddings, `n_layer` pre-norm
blocks of causal self-attention and an MLP, a final LayerNorm and a head tied to the token
embedding. Tokens are the 256 byte values, so any UTF-8 text trains without a tokenizer; the
loss is the cross-entropy of the next byte, reported also as bits per character (per byte).
The last 5% of the text is held out and its bits per byte reported at every checkpoint.

Generation feeds the prompt's bytes (the last `block_size` of them), then samples one byte at
a time with temperature, top-k and top-p, from a CPU generator seeded per job, and streams
each decoded piece as a TextDelta event (an incremental UTF-8 decoder holds back a partial
multi-byte character until it is complete). The concurrent jobs of one model are decoded
together, one forward pass a step for all their rows, each job joining and leaving between
steps (the loop of workers/families/decoding.py; workers/batching.py feeds it).

Shapes: B batch, T time (<= block_size), C n_embd, H heads, V = 256.
"""

from __future__ import annotations

import codecs
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import ModelError
from core.events import Event, Log, Metric, Output, Progress, TextDelta
from workers.datasets import load_text
from workers.families.base import TokenProgress, TrainContext, job_seed
from workers.families.charlm_spec import (
    FAMILY,
    CharlmFinetuneParams,
    CharlmGenerateParams,
    CharlmTrainParams,
)
from workers.families.checkpoints import load_model_files, save_model
from workers.families.decoding import Decoder
from workers.families.training import LossWindow, TrainingRun, check_loss

CHECKPOINT_FORMAT = "genq-charlm-checkpoint/1"
V = 256
METRIC_EVERY = 20
HELD_OUT = 0.05
EVAL_BATCHES = 8  # batches of held-out text per evaluation
SAMPLE_TOKENS = 200  # length of the text sample written at the end of training
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
    "default": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128},
}


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(n_embd)
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)  # (B, T, C) each
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, C/H)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


class CharLM(nn.Module):
    def __init__(self, n_layer: int, n_head: int, n_embd: int, block_size: int) -> None:
        super().__init__()
        self.block_size = block_size
        self.tok = nn.Embedding(V, n_embd)
        self.pos = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln = nn.LayerNorm(n_embd)
        # GPT-2's initialisation: small weights keep the tied head's first logits near zero,
        # so training starts at ~8 bits per byte instead of far above it.
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) byte ids -> next-byte logits (B, T, V)."""
        T = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.ln(x) @ self.tok.weight.T  # tied head


def build(config: dict[str, Any]) -> CharLM:
    return CharLM(config["n_layer"], config["n_head"], config["n_embd"], config["block_size"])


def batch(
    data: torch.Tensor, B: int, T: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """B random windows of T+1 bytes: inputs (B, T) and next-byte targets (B, T)."""
    starts = torch.randint(0, len(data) - T - 1, (B,), generator=gen)
    rows = torch.stack([data[s : s + T + 1] for s in starts.tolist()])  # (B, T+1)
    return rows[:, :-1], rows[:, 1:]


def bits_per_byte(model: CharLM, data: torch.Tensor, seed: int, device: torch.device) -> float:
    """Mean next-byte cross-entropy in bits over EVAL_BATCHES fixed windows of `data`."""
    T = model.block_size
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for _ in range(EVAL_BATCHES):
            x, y = batch(data, 16, T, gen)
            logits = model(x.to(device))
            total += F.cross_entropy(logits.reshape(-1, V), y.to(device).reshape(-1)).item()
    return total / EVAL_BATCHES / math.log(2)


def split(text: bytes, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    n_val = max(int(len(data) * HELD_OUT), block_size + 2)
    if len(data) - n_val < block_size + 2:
        raise ModelError(f"the text is too short: at least {2 * (block_size + 2)} bytes needed")
    return data[:-n_val], data[-n_val:]


def train(params: dict[str, Any], ctx: TrainContext) -> Iterator[Event]:
    finetune = ctx.parent_model_dir is not None
    p = (CharlmFinetuneParams if finetune else CharlmTrainParams).model_validate(params)
    device = torch.device(ctx.device)
    weights = None
    if finetune:
        weights, parent = load_model_files(ctx.parent_model_dir, ctx.parent_config, "charlm")
        config = {"family": "charlm", "preset": parent["preset"], **PRESETS[parent["preset"]]}
    else:
        assert isinstance(p, CharlmTrainParams)
        config = {"family": "charlm", "preset": p.preset, **PRESETS[p.preset]}
    text = load_text(ctx.dataset)
    train_data, val_data = split(text, config["block_size"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)
        model = build(config)
    if weights is not None:
        model.load_state_dict(weights)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.learning_rate, weight_decay=0.01)
    B, T = p.batch_size, config["block_size"]
    n_params = sum(q.numel() for q in model.parameters())
    yield Log(
        f"charlm {config['preset']}: {len(train_data)} training bytes, {len(val_data)} held out,"
        f" {n_params} parameters, on {device}"
    )

    run = TrainingRun(ctx, CHECKPOINT_FORMAT, {"lm": model}, {"lm": optimizer}, config, p)
    yield from run.resume()
    window = LossWindow()
    val_bpb = float("nan")
    for step in run.steps():
        # Cosine decay to a tenth of the rate: small models gain most from a cooled-down end.
        lr = p.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / p.steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = batch(train_data, B, T, run.generator(step))
        logits = model(x.to(device))  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, V), y.to(device).reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        check_loss(step, loss)
        window.add(loss.item())
        yield Progress(step, p.steps, "training")
        if run.is_due(step, METRIC_EVERY):
            (run.loss,) = window.means()
            values = {
                "loss": run.loss,
                "bits_per_char": run.loss / math.log(2),
                "tokens_per_s": window.rate(B * T),
            }
            yield Metric(step, values)
            window = LossWindow()
        if run.is_due(step, p.checkpoint_every):
            model.eval()
            val_bpb = bits_per_byte(model, val_data, p.seed, device)
            model.train()
            yield Metric(step, {"val_bits_per_char": val_bpb})
            yield run.checkpoint(step)

    model.eval()
    lm = CharLm(model, config)
    sample = "".join(
        e.text
        for e in lm.generate({"prompt": "", "max_tokens": SAMPLE_TOKENS, "seed": p.seed}, ctx)
        if isinstance(e, TextDelta)
    )
    yield Output(
        "sample.txt", "text", "text/plain; charset=utf-8", sample.encode(), {"seed": p.seed}
    )
    save_model(model.cpu(), config, ctx.model_dir)
    yield from run.saved({"final_loss": run.loss, "val_bits_per_char": val_bpb})


def pick(logits: torch.Tensor, rows: list[Row]) -> list[int]:
    """Each row's next byte from the (B, V) float32 CPU logits, with the row's own temperature,
    top-k, top-p and generator. The filtering runs once for the whole batch, row by row
    independently; each sampled row then draws its byte as `torch.multinomial(probs, 1,
    generator)` does (one exponential draw per byte from the row's generator, the byte with
    the largest probs / draw), so a row picks and consumes its generator exactly as it would
    alone with torch.multinomial."""
    B, V = logits.shape
    greedy = logits.argmax(dim=-1)  # (B,)
    sampled = [r for r, row in enumerate(rows) if row.p.temperature]
    if not sampled:
        return [int(t) for t in greedy.tolist()]
    ps = [rows[r].p for r in sampled]
    x = logits[sampled] / torch.tensor([[p.temperature] for p in ps])  # (S, V)
    if any(p.top_k for p in ps):
        # The k-th largest of each row with top-k (ties with it stay in); -inf: no top-k.
        ranked = x.sort(dim=-1, descending=True).values  # (S, V)
        k = torch.tensor([[max(p.top_k, 1) - 1] for p in ps])  # (S, 1)
        has_k = torch.tensor([[p.top_k > 0] for p in ps])  # (S, 1)
        kth = torch.where(has_k, ranked.gather(1, k), torch.tensor(float("-inf")))
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)  # (S, V)
    top_p = torch.tensor([[p.top_p] for p in ps])  # (S, 1)
    if bool((top_p < 1).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one byte).
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p) & (top_p < 1)
        probs = probs.scatter(1, order, sorted_probs.masked_fill(drop, 0.0))
    if not bool(torch.isfinite(probs).all()) or bool((probs.sum(dim=-1) <= 0).any()):
        raise ModelError("the model's next-byte probabilities are not finite")
    draws = torch.stack(
        [torch.empty(V).exponential_(1, generator=rows[r].gen) for r in sampled]
    )  # (S, V)
    chosen = (probs / draws).argmax(dim=-1)  # (S,)
    picks = greedy.tolist()
    for r, token in zip(sampled, chosen.tolist(), strict=True):
        picks[r] = token
    return [int(t) for t in picks]


class Row:
    """One job's text while its row is decoded: its sampler, its bytes so far (prompt
    included: the model's context), what it has streamed, and why it ended."""

    def __init__(self, p: CharlmGenerateParams) -> None:
        self.p = p
        self.seed = job_seed(p.seed)
        self.gen = torch.Generator().manual_seed(self.seed)
        self.prompt = list(p.prompt.encode("utf-8"))
        self.tokens = list(self.prompt) or [ord("\n")]  # an empty prompt starts after a newline
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Text that could be the start of a stop string is held back until it is not.
        self.hold = max((len(s) for s in p.stop), default=1) - 1
        self.text, self.sent, self.finish, self.made = "", 0, "", 0
        self.progress = TokenProgress(p.max_tokens)
        self.started = time.perf_counter()
        self.peak_rows = 1  # the most rows it shared a forward pass with (itself included)

    def add(self, token: int) -> Iterator[Event]:
        """Take the row's next byte; the text it streams. Sets `finish` once the row has
        ended."""
        i, p = self.made, self.p
        self.tokens.append(token)
        self.made = i + 1
        self.text += self.decoder.decode(bytes([token]))
        text, sent, hold = self.text, self.sent, self.hold
        cut = min((j for s in p.stop if (j := text.find(s, max(0, sent - hold))) >= 0), default=-1)
        if cut >= 0:
            self.text, self.finish = text[:cut], "stop"
            return
        ready = len(text) - hold
        if ready > sent:
            yield TextDelta(i, text[sent:ready])
            self.sent = ready
        if (event := self.progress.after(self.made)) is not None:
            yield event
        if self.made >= p.max_tokens:
            self.finish = "length"

    def end(self) -> Iterator[Event]:
        """The rest of the text, the last progress, how it ran and the output."""
        if self.finish != "stop":
            self.text += self.decoder.decode(b"", final=True)
        text, made = self.text, self.made
        if len(text) > self.sent:
            yield TextDelta(made, text[self.sent :])
        yield self.progress.done(made)
        yield Metric(
            0,
            {"batch_jobs": float(self.peak_rows), "batch_s": time.perf_counter() - self.started},
        )
        meta = {
            "seed": self.seed,
            "prompt_tokens": len(self.prompt),
            "completion_tokens": made,
            "finish_reason": self.finish,
            "params": {**self.p.model_dump(exclude={"prompt"}), "seed": self.seed},
        }
        yield Output("output.txt", "text", "text/plain; charset=utf-8", text.encode(), meta)


class CharLm(Decoder[Row]):
    """A loaded charlm; `generate` continues a prompt, streaming TextDelta events.

    Continuous batching: `generate_continuous` (decoding.py, shared with the `transformers`
    family) decodes the rows of many jobs with one forward pass a step, each job joining and
    leaving between steps (TextBatch is this model's side of it). The model has no key/value
    cache: every step feeds each row's last `block_size` bytes, right-padded to the longest
    row's, and reads each row's logits at its own last byte. Attention is causal, so a row
    never sees the padding after it and its logits are what it gets alone up to float
    rounding (the matrix kernels change with the batch's shape); each row samples from its own
    generator, as alone."""

    max_batch_size = FAMILY.max_batch_size

    def __init__(self, model: CharLM, config: dict[str, Any]) -> None:
        self.model, self.config = model, config
        self.device = next(model.parameters()).device

    def next_logits(self, contexts: list[list[int]]) -> torch.Tensor:
        """Each row's next-byte logits, (B, V) float32 on the CPU."""
        T = self.model.block_size
        windows = [c[-T:] for c in contexts]
        B, L = len(windows), max(len(w) for w in windows)
        # Bytes are bytes: one buffer for the whole batch is far cheaper than tensor(lists).
        padded = b"".join(bytes(w) + bytes(L - len(w)) for w in windows)
        idx = torch.frombuffer(bytearray(padded), dtype=torch.uint8).view(B, L).long()  # (B, L)
        last = torch.tensor([len(w) - 1 for w in windows])  # (B,)
        with torch.no_grad():
            logits = self.model(idx.to(self.device))  # (B, L, V)
        return logits[torch.arange(B), last.to(self.device)].float().cpu()  # (B, V)

    def new_batch(self) -> TextBatch:
        return TextBatch(self)


class TextBatch:
    """One run's rows of a CharLm (decoding.DecodeBatch). Without a cache there is nothing
    to prefill, keep or drop: each row holds its own bytes (`Row.tokens`), a row's first byte
    comes from the next step, and every step feeds all the rows' bytes again."""

    def __init__(self, lm: CharLm) -> None:
        self.lm = lm

    def open(self, params: dict[str, Any]) -> Row:
        return Row(CharlmGenerateParams.model_validate(params))

    def prefill(self, row: Row) -> None:
        return None

    def join(self, index: int, row: Row, state: Any) -> None:
        pass

    def step(self, rows: list[Row]) -> torch.Tensor:
        return self.lm.next_logits([row.tokens for row in rows])  # (B, V)

    def pick(self, logits: torch.Tensor, rows: list[Row]) -> list[int]:
        return pick(logits, rows)

    def feed(self, tokens: list[int]) -> None:
        pass  # Row.add appended each row's byte to its own tokens

    def drop(self, indices: list[int]) -> None:
        pass


def load(model_dir: Path | None, config: dict[str, Any], device: str) -> CharLm:
    weights, config = load_model_files(model_dir, config, "charlm")
    model = build(config)
    model.load_state_dict(weights)
    model.to(device).eval()
    return CharLm(model, config)
