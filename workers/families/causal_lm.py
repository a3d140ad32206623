"""The `transformers` family's generation: a causal language model loaded from a folder on
disk (causal_lm_loading: the pretrained base, or a LoRA version merged into it), generating text
token by token, the concurrent jobs of one model decoded together; fine-tuning with LoRA lives
in `causal_lm_lora`.

Continuous batching (the loop in `decoding`, the padded cache in `causal_lm_batch`). The
model server hands the model an intake of jobs (workers/batching.py); between two decode steps
the model takes the jobs that arrived, prefills each one's prompt alone and adds its row to the
running batch, then runs one forward pass for every row. A row leaves as soon as its job ends
(end-of-text, a stop string, `max_tokens`, cancel, or an error of its own) and the others go
on. A job alone runs through the same code as a batch of one.

Each job samples its tokens with its own temperature, top-k and top-p, from its own CPU
generator seeded per job (the same seed gives the same text on any device), and streams each
new piece of decoded text as a TextDelta event. A piece that ends in half a UTF-8 character,
or that could be the start of a stop string, is held back until it is complete; the text ends
before the first stop string, at the end-of-text token, or after `max_tokens`.

Same seed, same text, alone or batched: a row's logits in a batch differ from its logits alone
by float rounding only (about 1e-6 on the CPU: the matrix kernels change with the batch size,
and the padding columns change the order of the attention's sums), so a token can differ only
where two candidates are that close: under greedy decoding two logits within 1e-6, under
sampling the generator's draw within about 1e-7 of the boundary between two tokens.
docs/batching.md gives the measured figures; tests/workers/test_lm_batching.py checks the texts
are equal.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from core.errors import InvalidInputError, ModelError
from core.events import Event, Metric, Output, TextDelta
from workers.families.base import TokenProgress, job_seed
from workers.families.causal_lm_batch import RowBatch, is_batchable
from workers.families.causal_lm_loading import context_length, dtype_for, load_model
from workers.families.causal_lm_lora import train  # noqa: F401 - the family's `train`
from workers.families.causal_lm_spec import FAMILY, CausalLmGenerateParams
from workers.families.decoding import Decoder


def pick(logits: torch.Tensor, rows: list[Row]) -> list[int]:
    """Each row's next token from the (B, V) logits of the batch, with the row's own
    temperature, top-k, top-p and generator. The filtering runs once for the whole batch on
    the model's device, row by row independently; each row draws one uniform number from its
    own CPU generator (so the same seed draws the same numbers on any device), which picks its
    token from its filtered distribution by inverse CDF."""
    B, V = logits.shape
    logits = logits.float()
    device = logits.device
    temperature = torch.tensor([r.p.temperature for r in rows], device=device)
    greedy = logits.argmax(dim=-1)  # (B,)
    if bool((temperature == 0).all()):
        return [int(t) for t in greedy.tolist()]
    scaled = logits / temperature.clamp(min=1e-6)[:, None]
    ranked, order = scaled.sort(dim=-1, descending=True)  # (B, V) each
    top_k = torch.tensor([r.p.top_k if 0 < r.p.top_k < V else V for r in rows], device=device)
    kth = ranked.gather(1, (top_k - 1)[:, None])  # (B, 1): ties with the k-th stay in
    probs = torch.softmax(ranked.masked_fill(ranked < kth, float("-inf")), dim=-1)
    top_p = torch.tensor([r.p.top_p if r.p.top_p < 1 else 2.0 for r in rows], device=device)[
        :, None
    ]
    # Keep the smallest prefix whose mass reaches top_p (always at least one token).
    probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
    cdf = probs.cumsum(dim=-1)  # (B, V), not normalised: its last column is the kept mass
    draws = torch.tensor(
        [float(torch.rand((), generator=r.gen)) if r.p.temperature else 0.0 for r in rows],
        device=device,
    )
    at = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True).clamp(max=V - 1)
    sampled = order.gather(1, at)[:, 0]  # (B,)
    return [int(t) for t in torch.where(temperature == 0, greedy, sampled).tolist()]


class Row:
    """One job's text while its row is decoded: its sampler, what it has made, what it has
    streamed so far, and why it ended."""

    def __init__(self, p: CausalLmGenerateParams, ids: list[int], tokenizer: Any) -> None:
        self.p, self.ids, self.tokenizer = p, ids, tokenizer
        self.seed = job_seed(p.seed)
        self.gen = torch.Generator().manual_seed(self.seed)
        self.eos = tokenizer.eos_token_id
        self.hold = max((len(s) for s in p.stop), default=1) - 1  # a stop string may be arriving
        self.completion: list[int] = []
        self.sent, self.text, self.finish = 0, "", ""
        self.progress = TokenProgress(p.max_tokens)
        self.started = time.perf_counter()
        self.peak_rows = 1  # the most rows it shared a forward pass with (itself included)

    def add(self, token: int) -> Iterator[Event]:
        """Take the row's next token; the text it streams. Sets `finish` once the row has
        ended."""
        if token == self.eos:
            self.finish = "eos"
            return
        self.completion.append(token)
        text = self.tokenizer.decode(self.completion, skip_special_tokens=True)
        sent, hold = self.sent, self.hold
        cut = min(
            (i for s in self.p.stop if (i := text.find(s, max(0, sent - hold))) >= 0), default=-1
        )
        if cut >= 0:
            self.text, self.finish = text[:cut], "stop"
            return
        self.text = text
        ready = len(text) - hold
        if text.endswith("\ufffd"):  # half a UTF-8 character so far
            ready = min(ready, len(text) - 1)
        if ready > sent:
            yield TextDelta(len(self.completion) - 1, text[sent:ready])
            self.sent = ready
        if len(self.completion) >= self.p.max_tokens:
            self.finish = "length"
        elif (event := self.progress.after(len(self.completion))) is not None:
            yield event

    def end(self) -> Iterator[Event]:
        """The rest of the text, the last progress, how it ran and the output."""
        text = self.text
        if self.finish != "stop":
            text = self.tokenizer.decode(self.completion, skip_special_tokens=True)
        if len(text) > self.sent:
            yield TextDelta(len(self.completion), text[self.sent :])
        made = len(self.completion)
        yield self.progress.done(made)
        yield Metric(
            0,
            {"batch_jobs": float(self.peak_rows), "batch_s": time.perf_counter() - self.started},
        )
        p = self.p
        meta = {
            "seed": self.seed,
            "prompt_tokens": len(self.ids),
            "completion_tokens": made,
            "finish_reason": self.finish,
            "params": {**p.model_dump(exclude={"prompt", "messages"}), "seed": self.seed},
        }
        yield Output("output.txt", "text", "text/plain; charset=utf-8", text.encode(), meta)


class CausalLm(Decoder[Row]):
    """A loaded language model; `generate` continues a prompt or answers a chat."""

    def __init__(self, model: Any, tokenizer: Any, config: dict[str, Any], device: str) -> None:
        self.model, self.tokenizer, self.config, self.device = model, tokenizer, config, device
        # Rows one forward pass may hold: the family's limit, or 1 for a model whose cache
        # cannot be padded (the server then runs its jobs one at a time).
        self.max_batch_size = FAMILY.max_batch_size if is_batchable(model) else 1

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

    def new_batch(self) -> TextBatch:
        return TextBatch(self)


class TextBatch:
    """One run's rows of a CausalLm (decoding.DecodeBatch): each prompt prefilled alone, then
    its row added to the padded cache of the others (causal_lm_batch.RowBatch)."""

    def __init__(self, lm: CausalLm) -> None:
        self.lm = lm
        self.rows = RowBatch(lm.model, lm.device)

    def open(self, params: dict[str, Any]) -> Row:
        p = CausalLmGenerateParams.model_validate(params)
        return Row(p, self.lm.prompt_ids(p), self.lm.tokenizer)

    def prefill(self, row: Row) -> tuple[Any, torch.Tensor]:
        return self.rows.prefill(row.ids)

    def join(self, index: int, row: Row, state: Any) -> None:
        self.rows.join(index, state, len(row.ids), row.completion[-1])

    def step(self, rows: list[Row]) -> torch.Tensor:
        return self.rows.step()  # the batch holds every row's last token already

    def pick(self, logits: torch.Tensor, rows: list[Row]) -> list[int]:
        return pick(logits, rows)

    def feed(self, tokens: list[int]) -> None:
        self.rows.feed(tokens)

    def drop(self, indices: list[int]) -> None:
        self.rows.drop(indices)


def load(model_dir: Path | None, config: dict[str, Any], device: str) -> CausalLm:
    if model_dir is None:
        raise ModelError("a transformers model needs its folder")
    model, tokenizer = load_model(Path(model_dir), config, dtype_for(device))
    model.to(device).eval()
    return CausalLm(model, tokenizer, config, device)
