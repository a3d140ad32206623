"""What every trainer's loop shares (gan, vae, ddpm, charlm and the two LoRA fine-tunes): the
randomness of a step, resuming from the job's checkpoint, stopping between steps once the job's
cancel was requested, refusing a loss that diverged, checkpointing every `checkpoint_every`
steps and at the last, the windows of steps that Metric events report on, and the events that
announce the saved model; and, for the labelled-image trainers, the model config (gan, vae)
and a fine-tune's images (gan, vae, ddpm).

What a step computes, and which metrics it reports, stays in the family's own loop, which
reads top to bottom as before: a `TrainingRun` resumes, hands out the steps and writes the
checkpoints; a fresh `LossWindow` after each Metric event collects the next window's losses.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from core.datasetref import DatasetRef
from core.errors import InvalidInputError, ModelError
from core.events import Event, Log, ModelSaved
from workers.datasets import ImageDataset, load_dataset
from workers.families.base import CanceledError, TrainContext
from workers.families.checkpoints import CHECKPOINT_NAME, load_checkpoint, save_checkpoint


class StepParams(Protocol):
    """The training params every family's spec has (pydantic models match it)."""

    steps: int
    checkpoint_every: int
    seed: int


def step_seed(seed: int, step: int) -> int:
    """The seed of one training step's randomness, from (seed, step) alone, so a resumed run
    draws what the uninterrupted one would have. step < 2**20 (the specs' bound), seed < 2**32."""
    return seed * 2**20 + step


def check_loss(step: int, *losses: torch.Tensor) -> None:
    """A ModelError once any of the step's losses is not finite: the run cannot recover."""
    if not all(torch.isfinite(loss) for loss in losses):
        raise ModelError(f"the loss diverged at step {step}; try a lower learning_rate")


class TrainingRun:
    """One training attempt of `p.steps` steps, checkpointed under `fmt` (checkpoints.py) into
    the job's checkpoint folder. `loss` is what the checkpoint and the saved model's metrics
    record: the loss at the resumed checkpoint, then whatever the loop last set it to."""

    def __init__(
        self,
        ctx: TrainContext,
        fmt: str,
        modules: dict[str, Any],
        optimizers: dict[str, torch.optim.Optimizer],
        config: dict[str, Any],
        p: StepParams,
    ) -> None:
        self.ctx, self.fmt, self.config, self.p = ctx, fmt, config, p
        self.modules, self.optimizers = modules, optimizers
        self.path = ctx.checkpoint_dir / CHECKPOINT_NAME
        self.start = 0
        self.loss = float("nan")

    def resume(self) -> Iterator[Event]:
        """Restores the job's last checkpoint if there is one (a ModelError if it was made for
        another configuration)."""
        if self.path.exists():
            start, self.loss = load_checkpoint(
                self.path, self.fmt, self.modules, self.optimizers, self.config
            )
            self.start = min(start, self.p.steps)
            yield Log(f"resumed from step {self.start}")

    def steps(self) -> Iterator[int]:
        """The steps still to take; CanceledError before one once the job's cancel was
        requested."""
        for step in range(self.start + 1, self.p.steps + 1):
            if self.ctx.is_canceled():
                raise CanceledError(f"job {self.ctx.job_id} was canceled")
            yield step

    def generator(self, step: int) -> torch.Generator:
        """The CPU generator of `step`'s randomness (its data, noise, timesteps)."""
        return torch.Generator().manual_seed(step_seed(self.p.seed, step))

    def is_due(self, step: int, every: int) -> bool:
        """Whether something done every `every` steps (a metric, a checkpoint) is due after
        `step`; it always is after the last."""
        return step % every == 0 or step == self.p.steps

    def checkpoint(self, step: int) -> Log:
        save_checkpoint(
            self.path, self.fmt, self.modules, self.optimizers, step, self.config, self.loss
        )
        return Log(f"checkpoint at step {step}", level="debug")

    def saved(
        self,
        metrics: dict[str, float],
        what: str = "the model",
        config: dict[str, Any] | None = None,
    ) -> Iterator[Event]:
        """The events after the model (`config`, by default the run's) was saved."""
        rel = self.ctx.model_dir_rel
        yield Log(f"saved {what} to {rel}")
        config = self.config if config is None else config
        yield ModelSaved(
            path=rel, config={**config, "seed": self.p.seed, "steps": self.p.steps}, metrics=metrics
        )


class LossWindow:
    """The losses of the steps since the last Metric event (one or more per step) and how long
    those steps took."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, ...]] = []
        self.started = time.perf_counter()

    def add(self, *losses: float) -> None:
        self.rows.append(losses)

    def means(self) -> list[float]:
        """Each loss's mean over the window."""
        return [sum(column) / len(self.rows) for column in zip(*self.rows, strict=True)]

    def rate(self, per_step: int) -> float:
        """Items (samples, tokens) a second, at `per_step` items a step."""
        elapsed = time.perf_counter() - self.started
        return len(self.rows) * per_step / max(elapsed, 1e-9)


def image_model_config(
    family: str, preset: str, sizes: dict[str, Any], dataset: ImageDataset
) -> dict[str, Any]:
    """What a labelled-image model trained from a preset records (gan, vae): its family, its
    preset and that preset's network `sizes`, and the channels and classes of its images."""
    return {
        "family": family,
        "preset": preset,
        **sizes,
        "channels": dataset.channels,
        "num_classes": dataset.num_classes,
        "class_names": list(dataset.class_names),
    }


def load_parent_images(ref: DatasetRef | None, parent: dict[str, Any]) -> ImageDataset:
    """A fine-tune's images at its parent's size and channels; refused, naming `dataset`, when
    they are not of as many classes as the parent model knows."""
    dataset = load_dataset(ref, parent["image_size"], parent["channels"])
    if dataset.num_classes != parent["num_classes"]:
        raise InvalidInputError.one(
            "dataset",
            f"has {dataset.num_classes} classes, the model has {parent['num_classes']}",
        )
    return dataset
