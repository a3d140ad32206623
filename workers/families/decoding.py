"""Continuous batching of token-by-token text generation, shared by the families that decode
text (charlm, transformers): the loop in which jobs join the running batch and leave it between
two decode steps, each row samples its own next token, streams its own events and ends on its
own stop, and a row whose job is canceled or fails leaves while the others go on.

A family keeps what is its own: its `Row` (sampler, text, stops), and a `DecodeBatch` made
for each run: how a job's params become a row, how a row enters the batch (a prompt prefilled
alone, or nothing until the next step), the forward pass of all rows and the sampling.
workers/batching.py feeds `Decoder.generate_continuous` jobs as they arrive.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, Generic, Protocol, TypeVar

import torch
from pydantic import ValidationError

from core.errors import InvalidInputError
from core.events import Event
from workers.families.base import BatchItem, CanceledError, RunContext

# What the intake hands over: (the job's index in this run, its params, its context).
Joiner = tuple[int, dict[str, Any], RunContext]
# What the loop yields: (index, event), (index, the job's failure), (index, None) at its end.
Decoded = tuple[int, Event | BaseException | None]


class Row(Protocol):
    """One job's row as the loop sees it."""

    finish: str  # why the row ended; empty while it runs
    peak_rows: int  # the most rows it shared a forward pass with (itself included)

    def add(self, token: int) -> Iterator[Event]: ...

    def end(self) -> Iterator[Event]: ...


R = TypeVar("R", bound=Row)


class DecodeBatch(Protocol[R]):
    """The model side of one run: the rows a family decodes together."""

    def open(self, params: dict[str, Any]) -> R:
        """A job's row; raises InvalidInputError or ValidationError for its params."""
        ...

    def prefill(self, row: R) -> tuple[Any, torch.Tensor] | None:
        """(what `join` keeps of the row, its first token's logits (V,)) from its prompt
        alone, or None where the next step computes its first token."""
        ...

    def join(self, index: int, row: R, state: Any) -> None:
        """Add a row that goes on (prefilled: `state`, its first token taken) to the batch."""
        ...

    def step(self, rows: list[R]) -> torch.Tensor:
        """One forward pass of the rows, in batch order: their next-token logits (B, V)."""
        ...

    def pick(self, logits: torch.Tensor, rows: list[R]) -> list[int]:
        """Each row's next token from the (B, V) logits, with its own sampler."""
        ...

    def feed(self, tokens: list[int]) -> None:
        """The tokens the rows just took, in batch order: the next step's input."""
        ...

    def drop(self, indices: list[int]) -> None:
        """Take these rows out (ended, canceled or failed); the others keep their places."""
        ...


class Decoder(ABC, Generic[R]):
    """A loaded text model: `generate` (one job), `generate_batch` (a fixed set of jobs) and
    `generate_continuous` (jobs joining as they come) all run the same loop."""

    max_batch_size: int

    @abstractmethod
    def new_batch(self) -> DecodeBatch[R]:
        """An empty batch for one run of the loop."""

    def generate(self, params: dict[str, Any], ctx: RunContext) -> Iterator[Event]:
        """One job alone: the continuous path with a batch of one."""
        joiners: list[Joiner] = [(0, params, ctx)]
        for _, item in self.generate_continuous(lambda free: [joiners.pop()] if joiners else []):
            if isinstance(item, BaseException):
                raise item
            if item is not None:
                yield item

    def generate_batch(self, jobs: list[tuple[dict[str, Any], RunContext]]) -> Iterator[BatchItem]:
        """A fixed set of jobs decoded together (the family interface's batch call)."""
        waiting: list[Joiner] = [(i, params, ctx) for i, (params, ctx) in enumerate(jobs)]

        def take(free: int) -> list[Joiner]:
            taken = waiting[:free]
            del waiting[:free]
            return taken

        for index, item in self.generate_continuous(take):
            if item is not None:
                yield index, item

    def generate_continuous(
        self, take: Callable[[int], list[Joiner]], stepped: Callable[[int], None] | None = None
    ) -> Iterator[Decoded]:
        """Decode every job `take(free rows)` hands over, taking more between steps, until
        none runs and none waits. Yields (index, event) for a job, (index, exception) when one
        job fails or is canceled (its row leaves, the others go on) and (index, None) once a
        job has sent all its events. `stepped(rows)` is told of each shared forward pass."""
        batch = self.new_batch()
        rows: dict[int, tuple[R, RunContext]] = {}  # the running rows, in batch order
        while True:
            for index, params, ctx in take(self.max_batch_size - len(rows)):
                yield from _join(batch, rows, index, params, ctx)
            gone = [i for i, (_, ctx) in rows.items() if ctx.is_canceled()]
            for i in gone:
                yield i, CanceledError(f"job {rows.pop(i)[1].job_id} was canceled")
            batch.drop(gone)
            if not rows:
                if gone:
                    continue  # others may have come meanwhile
                return
            running = list(rows)
            try:
                row_list = [rows[i][0] for i in running]
                tokens = batch.pick(batch.step(row_list), row_list)
            except Exception as exc:  # noqa: BLE001 - the rows' failure (out of memory...)
                # Each running job fails with it (the runner retries a transient one) rather
                # than starting again alone: its text has been streamed already.
                for i in running:
                    rows.pop(i)
                    yield i, exc
                batch.drop(running)
                continue
            if stepped is not None:
                stepped(len(running))
            ended = []
            for r, i in enumerate(running):
                row = rows[i][0]
                row.peak_rows = max(row.peak_rows, len(running))
                for event in row.add(tokens[r]):
                    yield i, event
                if row.finish:
                    ended.append(i)
                    yield from _end(i, rows.pop(i)[0])
            batch.feed(tokens)
            batch.drop(ended)


def _join(
    batch: DecodeBatch[R],
    rows: dict[int, tuple[R, RunContext]],
    index: int,
    params: dict[str, Any],
    ctx: RunContext,
) -> Iterator[Decoded]:
    """Open a job's row and add it to the batch (or end it at once)."""
    if ctx.is_canceled():
        yield index, CanceledError(f"job {ctx.job_id} was canceled")
        return
    try:
        row = batch.open(params)
    except (InvalidInputError, ValidationError) as exc:
        yield index, exc
        return
    try:
        prefilled = batch.prefill(row)
    except Exception as exc:  # noqa: BLE001 - this job's own failure (its prompt)
        yield index, exc
        return
    state = None
    if prefilled is not None:
        state, logits = prefilled
        for event in row.add(batch.pick(logits[None], [row])[0]):
            yield index, event
        if row.finish:
            yield from _end(index, row)
            return
    rows[index] = (row, ctx)
    batch.join(index, row, state)


def _end(index: int, row: Row) -> Iterator[Decoded]:
    for event in row.end():
        yield index, event
    yield index, None
