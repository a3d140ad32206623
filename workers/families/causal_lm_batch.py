"""Continuous batching for the `transformers` family: the rows of many jobs decoded by one
forward pass a step, each row joining and leaving between steps (Yu et al. 2022, "Orca: A
Distributed Serving System for Transformer-Based Generative Models", iteration-level
scheduling).

`RowBatch` keeps the decode state of the rows running now: one key/value cache for all of them
(transformers' `DynamicCache`, each layer's tensors (B, H, S, D)), a padding mask (B, S) and the
next position of each row (B,). A joining row is prefilled on its own (its prompt alone, so its
first token does not depend on the others), then its cache is left-padded, or the batch's is,
to the longer of the two and concatenated along the batch dimension. A leaving row is dropped
with an index select; cache columns that have become padding for every row are cut off, so the
batch stays as long as its longest row. Positions are explicit per row, so a left-padded row
sees the positions it would see alone, and the mask keeps its attention off the padding.

Only caches whose layers grow by concatenation (`DynamicLayer`: full attention) can be padded
this way; a model with sliding-window or recurrent layers runs its jobs one row at a time
through the same code (`is_batchable` says which).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


def is_batchable(model: Any) -> bool:
    """Whether the model's cache is made of full-attention layers that left padding fits."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    return all(type(layer) is DynamicLayer for layer in cache.layers)


class RowBatch:
    """The rows being decoded together. Row r of every tensor is the r-th entry of `rows`
    (whatever the caller keeps per row: here, the job's index in the batch)."""

    def __init__(self, model: Any, device: str) -> None:
        self.model, self.device = model, device
        # transformers 5 renamed the forward argument from `past_key_values` to `cache`
        # model by model; this takes whichever the model has.
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.rows: list[Any] = []
        self.cache: Any = None
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=device)  # (B, S)
        self.positions = torch.zeros((0,), dtype=torch.long, device=device)  # (B,)
        self.tokens = torch.zeros((0,), dtype=torch.long, device=device)  # (B,) last token

    def __len__(self) -> int:
        return len(self.rows)

    def _forward(self, cache: Any, **inputs: Any) -> Any:
        with torch.no_grad():
            return self.model(**inputs, **{self.cache_arg: cache}, use_cache=True)

    def prefill(self, ids: list[int]) -> tuple[Any, torch.Tensor]:
        """(the row's cache, its next-token logits (V,)) for a prompt, computed alone."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        T = len(ids)
        out = self._forward(
            cache,
            input_ids=torch.tensor([ids], device=self.device),  # (1, T)
            attention_mask=torch.ones((1, T), dtype=torch.long, device=self.device),
            position_ids=torch.arange(T, device=self.device)[None],  # (1, T)
        )
        return cache, out.logits[0, -1]

    def join(self, row: Any, cache: Any, length: int, token: int) -> None:
        """Add a prefilled row (its cache holds `length` positions) whose next input is
        `token`."""
        one = torch.ones((1, length), dtype=torch.long, device=self.device)
        if self.cache is None:
            self.cache, self.mask = cache, one
        else:
            S = self.mask.shape[1]
            width = max(S, length)
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
                mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
                mine.values = torch.cat(
                    [_pad_left(mine.values, width), _pad_left(theirs.values, width)]
                )
            self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(one, width)])
        self.rows.append(row)
        self.positions = torch.cat([self.positions, torch.tensor([length], device=self.device)])
        self.tokens = torch.cat([self.tokens, torch.tensor([token], device=self.device)])

    def step(self) -> torch.Tensor:
        """One forward pass of every row's last token: the next-token logits (B, V)."""
        B = len(self.rows)
        self.mask = torch.cat(
            [self.mask, torch.ones((B, 1), dtype=torch.long, device=self.device)], dim=1
        )
        out = self._forward(
            self.cache,
            input_ids=self.tokens[:, None],  # (B, 1)
            attention_mask=self.mask,  # (B, S + 1)
            position_ids=self.positions[:, None],  # (B, 1)
        )
        self.positions = self.positions + 1
        return out.logits[:, -1]  # (B, V)

    def feed(self, tokens: list[int]) -> None:
        """The tokens each row (in order) takes as its next input."""
        self.tokens = torch.tensor(tokens, dtype=torch.long, device=self.device)

    def drop(self, rows: list[Any]) -> None:
        """Take these rows out; the others keep their caches and places."""
        keep = [i for i, r in enumerate(self.rows) if r not in rows]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = None
            self.mask = self.mask[:0, :0]
            self.positions, self.tokens = self.positions[:0], self.tokens[:0]
            return
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.positions, self.tokens = self.positions[index], self.tokens[index]
        # Columns that are padding in every row left are cut: the batch gets no longer than
        # its longest row.
        first = int(self.mask.any(dim=0).long().argmax())
        if first > 0:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[..., first:, :]
                layer.values = layer.values[..., first:, :]


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """`t` with zeros before its sequence positions up to `width`: (B, S) masks along dim 1,
    (B, H, S, D) caches along dim 2."""
    dim = 1 if t.dim() == 2 else 2
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
