"""The `ddpm` family's network and its reverse process: the network presets, the model config
`load` rebuilds a model from, the noise schedulers (DDPM, or DDIM for deterministic sampling),
and Algorithm 2 of Ho, Jain & Abbeel 2020 (arXiv:2006.11239) over a batch of jobs, with
classifier-free guidance. Training (ddpm.py) samples its end-of-run grid with it, and the loaded
model (ddpm.py) its jobs' images.

Shapes: B batch, C image channels, H = W = image_size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from core.events import Event, Progress
from workers.datasets import ImageDataset
from workers.families.base import CanceledError, RunContext

# Network presets. `tiny` trains in seconds on a CPU (tests); `default` draws recognisable
# digits after a few thousand steps. Both are attention-free: at 16x16 attention buys little
# and costs most of the time on a CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "image_size": 16,
        "num_train_timesteps": 200,
        "unet": {
            "block_out_channels": [16, 32],
            "layers_per_block": 1,
            "down_block_types": ["DownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "UpBlock2D"],
            "norm_num_groups": 8,
        },
    },
    "default": {
        "image_size": 16,
        "num_train_timesteps": 1000,
        "unet": {
            "block_out_channels": [32, 64, 64],
            "layers_per_block": 1,
            "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "UpBlock2D", "UpBlock2D"],
            "norm_num_groups": 8,
        },
    },
}
SCHEDULE = {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing"}


# -- building ---------------------------------------------------------------------------------


def model_config(preset: str, dataset: ImageDataset) -> dict[str, Any]:
    """Everything `load` needs to rebuild the model; stored with the registered model."""
    spec = PRESETS[preset]
    size = spec["image_size"]
    unet = {
        "sample_size": size,
        "in_channels": dataset.channels,
        "out_channels": dataset.channels,
        # One embedding more than classes: the null label of classifier-free guidance.
        "num_class_embeds": dataset.num_classes + 1,
        **spec["unet"],
    }
    return {
        "family": "ddpm",
        "preset": preset,
        "image_size": size,
        "channels": dataset.channels,
        "num_classes": dataset.num_classes,
        "null_label": dataset.num_classes,
        "class_names": list(dataset.class_names),
        "num_train_timesteps": spec["num_train_timesteps"],
        "scheduler": dict(SCHEDULE),
        "unet": unet,
    }


def build_scheduler(config: dict[str, Any], sampler: str = "ddpm") -> DDPMScheduler:
    # A fresh one per job: set_timesteps mutates it. DDIM (Song, Meng & Ermon 2020,
    # arXiv:2010.02502) samples the same trained network deterministically in fewer steps.
    ddpm = DDPMScheduler(
        num_train_timesteps=config["num_train_timesteps"], **config.get("scheduler", SCHEDULE)
    )
    if sampler == "ddim":
        return DDIMScheduler.from_config(ddpm.config)  # type: ignore[no-any-return]
    return ddpm


# -- sampling ---------------------------------------------------------------------------------


@dataclass
class DenoiseJob:
    """One job's rows of a denoising batch: a label and a seed per image, and its context."""

    labels: torch.Tensor  # (n,)
    seeds: list[int]
    ctx: RunContext


def _forward(
    unet: UNet2DModel, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, min_rows: int
) -> torch.Tensor:
    """The network on B rows, padded with zero rows up to `min_rows`: below some batch size
    the CPU and GPU kernels switch algorithms and a row's result changes in the last bits, so
    every call that might be compared (a job alone, the same job in a batch) is kept above it."""
    rows = x.shape[0]
    if rows < min_rows:
        x = torch.cat([x, x.new_zeros((min_rows - rows, *x.shape[1:]))])
        y = torch.cat([y, y.new_zeros(min_rows - rows)])
    return unet(x, t, class_labels=y).sample[:rows]  # type: ignore[no-any-return]


def denoise_jobs(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    jobs: list[DenoiseJob],
    steps: int,
    guidance_scale: float = 1.0,
    null_label: int | None = None,
    min_rows: int = 1,
) -> Iterator[tuple[int | None, Event | torch.Tensor | BaseException]]:
    """Algorithm 2 for several jobs in one batch, one image per (label, seed). Yields
    (None, Progress) per step for every job still running, (j, CanceledError) when job j's
    cancel is seen (its rows leave the batch, the others go on), and at the end (j, images)
    with job j's images (n, C, H, W) in [-1, 1] on the CPU. With guidance_scale != 1, each
    step also predicts the noise without the label and moves away from it (Ho & Salimans
    2022, arXiv:2207.12598): eps = eps_null + s * (eps_label - eps_null)."""
    cfg = unet.config
    device = unet.device
    owners = [j for j, job in enumerate(jobs) for _ in job.seeds]  # job of each row
    # One CPU generator per image: an image depends on its own seed only, not on the batch.
    generators = [torch.Generator().manual_seed(s) for job in jobs for s in job.seeds]
    shape = (1, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    x = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(device)  # (B,C,H,W)
    y = torch.cat([job.labels for job in jobs]).to(device)  # (B,)
    running = set(range(len(jobs)))
    scheduler.set_timesteps(steps)
    total = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        for j in sorted(running):
            if jobs[j].ctx.is_canceled():
                running.discard(j)
                yield j, CanceledError(f"job {jobs[j].ctx.job_id} was canceled")
        if not running:
            return
        if len(running) < len(set(owners)):  # drop the rows of jobs canceled just now
            keep = [k for k, j in enumerate(owners) if j in running]
            x, y = x[keep], y[keep]
            generators = [generators[k] for k in keep]
            owners = [owners[k] for k in keep]
        with torch.no_grad():
            if guidance_scale == 1.0 or null_label is None:
                eps = _forward(unet, x, t.to(device), y, min_rows)  # (B, C, H, W)
            else:
                both = _forward(
                    unet,
                    torch.cat([x, x]),
                    t.to(device),
                    torch.cat([y, torch.full_like(y, null_label)]),
                    min_rows,
                )  # (2B, C, H, W)
                eps_label, eps_null = both.chunk(2)
                eps = eps_null + guidance_scale * (eps_label - eps_null)
        x = scheduler.step(eps, t, x, generator=generators).prev_sample  # (B, C, H, W)
        yield None, Progress(i + 1, total, "denoising")
    images = x.clamp(-1, 1).float().cpu()
    for j in sorted(running):
        yield j, images[[k for k, owner in enumerate(owners) if owner == j]]


def denoise(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    labels: torch.Tensor,
    seeds: list[int],
    steps: int,
    ctx: RunContext,
    guidance_scale: float = 1.0,
    null_label: int | None = None,
) -> Iterator[Event | torch.Tensor]:
    """One job's denoising: Progress per step, then its images (B, C, H, W) as the last item."""
    job = DenoiseJob(labels, seeds, ctx)
    for _, item in denoise_jobs(
        unet, scheduler, [job], steps, guidance_scale, null_label, ctx.min_rows
    ):
        if isinstance(item, BaseException):
            raise item
        yield item
