"""The `gan` family: a class-conditional DCGAN on small labelled images.

Generator (Radford, Metz & Chintala 2015, "DCGAN", arXiv:1511.06434): a noise vector z and a
learned class embedding go through a linear layer to a 4x4 feature map, then transposed
convolutions double it to 8x8 and 16x16, and a tanh gives pixels in [-1, 1]. Discriminator: a
strided convolution stack whose pooled features h give a score `w.h + embed(y).h` — the
projection discriminator of Miyato & Koyama 2018 (arXiv:1802.05637), which conditions on the
class far better than concatenating a label. Every discriminator layer is spectrally
normalised and the loss is the hinge loss (Miyato et al. 2018, arXiv:1802.05957), the usual
recipe that keeps a small GAN stable without tuning. The generator that is saved is an
exponential moving average of the trained one, which draws cleaner samples.

Each step's randomness comes from (seed, step) alone, so a resumed run takes the steps an
uninterrupted one would have. Shapes: B batch, C channels, S = image side, K classes, Z z_dim.
"""

from __future__ import annotations

import copy
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from core.errors import InvalidInputError, ModelError
from core.events import Event, Log, Metric, ModelSaved, Output, Progress
from workers.datasets import ImageDataset, load_dataset
from workers.families.base import CanceledError, RunContext, TrainContext, run_alone
from workers.families.checkpoints import (
    CHECKPOINT_NAME,
    load_checkpoint,
    load_model_files,
    save_checkpoint,
    save_model,
)
from workers.families.gan_spec import (
    SEED_MAX,
    GanFinetuneParams,
    GanGenerateParams,
    GanTrainParams,
)
from workers.families.pictures import grid_png, png_bytes, to_pil, to_uint8

CHECKPOINT_FORMAT = "genq-gan-checkpoint/1"
METRIC_EVERY = 20
EMA_DECAY = 0.999
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"image_size": 16, "z_dim": 16, "width": 16},
    "default": {"image_size": 16, "z_dim": 32, "width": 32},
}


class Generator(nn.Module):
    def __init__(self, z_dim: int, width: int, channels: int, num_classes: int) -> None:
        super().__init__()
        self.z_dim, self.width = z_dim, width
        self.embed = nn.Embedding(num_classes, z_dim)
        self.fc = nn.Linear(2 * z_dim, 4 * width * 4 * 4)
        self.net = nn.Sequential(
            nn.BatchNorm2d(4 * width),
            nn.ReLU(),
            nn.ConvTranspose2d(4 * width, 2 * width, 4, 2, 1),  # 4 -> 8
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1),  # 8 -> 16
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, channels, 3, 1, 1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, self.embed(y)], dim=1))  # (B, 4W*16)
        return self.net(h.view(-1, 4 * self.width, 4, 4))  # (B, C, 16, 16)


class Discriminator(nn.Module):
    def __init__(self, width: int, channels: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            spectral_norm(nn.Conv2d(channels, width, 3, 1, 1)),
            nn.LeakyReLU(0.1),
            spectral_norm(nn.Conv2d(width, 2 * width, 4, 2, 1)),  # 16 -> 8
            nn.LeakyReLU(0.1),
            spectral_norm(nn.Conv2d(2 * width, 4 * width, 4, 2, 1)),  # 8 -> 4
            nn.LeakyReLU(0.1),
        )
        self.out = spectral_norm(nn.Linear(4 * width, 1))
        self.embed = spectral_norm(nn.Embedding(num_classes, 4 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.net(x).sum(dim=(2, 3))  # (B, 4W)
        return self.out(h).squeeze(1) + (self.embed(y) * h).sum(dim=1)  # (B,)


def model_config(preset: str, dataset: ImageDataset) -> dict[str, Any]:
    spec = PRESETS[preset]
    return {
        "family": "gan",
        "preset": preset,
        "image_size": spec["image_size"],
        "z_dim": spec["z_dim"],
        "width": spec["width"],
        "channels": dataset.channels,
        "num_classes": dataset.num_classes,
        "class_names": list(dataset.class_names),
    }


def build(config: dict[str, Any]) -> tuple[Generator, Discriminator]:
    g = Generator(config["z_dim"], config["width"], config["channels"], config["num_classes"])
    d = Discriminator(config["width"], config["channels"], config["num_classes"])
    return g, d


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 2**20 + step)


def sample(g: Generator, labels: torch.Tensor, seeds: list[int], min_rows: int = 1) -> torch.Tensor:
    """One image per (label, seed), each depending on its own seed only: (B, C, S, S). The
    call is padded to `min_rows` rows, where the kernels give every row the same bits whatever
    the batch (workers/batching.py)."""
    device = next(g.parameters()).device
    z = torch.cat(
        [torch.randn(1, g.z_dim, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )  # (B, Z)
    rows = len(seeds)
    if rows < min_rows:
        z = torch.cat([z, z.new_zeros((min_rows - rows, g.z_dim))])
        labels = torch.cat([labels, labels.new_zeros(min_rows - rows)])
    with torch.no_grad():
        return g(z.to(device), labels.to(device))[:rows].float().cpu()


def _ema_update(ema: nn.Module, model: nn.Module, step: int) -> None:
    # The decay warms up from 0.1 to EMA_DECAY: with a fixed 0.999 the average would still
    # hold a third of the random initial weights after 1000 steps.
    decay = min(EMA_DECAY, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1 - decay)
        for e, b in zip(ema.buffers(), model.buffers(), strict=True):
            e.copy_(b)


def train(params: dict[str, Any], ctx: TrainContext) -> Iterator[Event]:
    finetune = ctx.parent_model_dir is not None
    p = (GanFinetuneParams if finetune else GanTrainParams).model_validate(params)
    device = torch.device(ctx.device)
    if ctx.parent_model_dir is not None:
        weights, config = load_model_files(ctx.parent_model_dir, ctx.parent_config, "gan")
        dataset = load_dataset(ctx.dataset, config["image_size"], config["channels"])
        if dataset.num_classes != config["num_classes"]:
            raise InvalidInputError.one(
                "dataset",
                f"has {dataset.num_classes} classes, the model has {config['num_classes']}",
            )
        config = {k: config[k] for k in model_config("tiny", dataset) if k in config}
        config["class_names"] = list(dataset.class_names)
    else:
        weights = None
        assert isinstance(p, GanTrainParams)
        dataset = load_dataset(ctx.dataset, PRESETS[p.preset]["image_size"])
        config = model_config(p.preset, dataset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)
        g, d = build(config)
    if weights is not None:
        g.load_state_dict(weights)  # the parent's (EMA) generator; D starts fresh
    ema = copy.deepcopy(g)
    for module in (g, d, ema):
        module.to(device).train()
    opt_g = torch.optim.Adam(g.parameters(), lr=p.learning_rate, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(d.parameters(), lr=p.learning_rate, betas=(0.0, 0.9))
    modules: dict[str, nn.Module] = {"g": g, "d": d, "ema": ema}
    optimizers = {"g": opt_g, "d": opt_d}
    x_all, y_all = dataset.images.to(device), dataset.labels.to(device)  # (N,C,S,S), (N,)
    N, K, B = len(x_all), dataset.num_classes, p.batch_size
    n_params = sum(q.numel() for q in g.parameters())
    yield Log(
        f"gan {config['preset']}: {N} images, {K} classes, G {n_params} parameters, on {device}"
    )

    checkpoint = ctx.checkpoint_dir / CHECKPOINT_NAME
    start, final_loss = 0, float("nan")
    if checkpoint.exists():
        start, final_loss = load_checkpoint(
            checkpoint, CHECKPOINT_FORMAT, modules, optimizers, config
        )
        start = min(start, p.steps)
        yield Log(f"resumed from step {start}")

    d_losses: list[float] = []
    g_losses: list[float] = []
    window_start = time.perf_counter()
    for step in range(start + 1, p.steps + 1):
        if ctx.is_canceled():
            raise CanceledError(f"job {ctx.job_id} was canceled")
        gen = step_generator(p.seed, step)
        idx = torch.randint(0, N, (B,), generator=gen).to(device)  # (B,)
        x_real, y_real = x_all[idx], y_all[idx]  # (B,C,S,S), (B,)
        z = torch.randn(B, g.z_dim, generator=gen).to(device)  # (B, Z)
        y_fake = torch.randint(0, K, (B,), generator=gen).to(device)  # (B,)

        x_fake = g(z, y_fake)  # (B, C, S, S)
        d_loss = (
            F.relu(1 - d(x_real, y_real)).mean() + F.relu(1 + d(x_fake.detach(), y_fake)).mean()
        )
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()

        g_loss = -d(x_fake, y_fake).mean()
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        _ema_update(ema, g, step)

        d_losses.append(d_loss.item())
        g_losses.append(g_loss.item())
        if not (torch.isfinite(d_loss) and torch.isfinite(g_loss)):
            raise ModelError(f"the loss diverged at step {step}; try a lower learning_rate")
        yield Progress(step, p.steps, "training")
        if step % METRIC_EVERY == 0 or step == p.steps:
            elapsed = time.perf_counter() - window_start
            d_mean, g_mean = sum(d_losses) / len(d_losses), sum(g_losses) / len(g_losses)
            final_loss = d_mean
            rate = len(d_losses) * B / max(elapsed, 1e-9)
            yield Metric(step, {"d_loss": d_mean, "g_loss": g_mean, "samples_per_s": rate})
            d_losses, g_losses, window_start = [], [], time.perf_counter()
        if step % p.checkpoint_every == 0 or step == p.steps:
            save_checkpoint(
                checkpoint, CHECKPOINT_FORMAT, modules, optimizers, step, config, final_loss
            )
            yield Log(f"checkpoint at step {step}", level="debug")

    ema.eval()
    columns = min(K, 10)
    labels = torch.arange(K).repeat_interleave(2)  # two samples per class
    images = sample(ema, labels, [p.seed + i for i in range(len(labels))])
    yield Output(
        name="samples.png",
        kind="grid",
        content_type="image/png",
        data=grid_png(images, columns=columns * 2 if K <= 5 else columns),
        meta={"labels": labels.tolist(), "seed": p.seed},
    )
    save_model(ema.cpu(), config, ctx.model_dir)
    yield Log(f"saved the model to {ctx.model_dir_rel}")
    yield ModelSaved(
        path=ctx.model_dir_rel,
        config={**config, "seed": p.seed, "steps": p.steps},
        metrics={"final_d_loss": final_loss},
    )


class Gan:
    """A loaded generator; `generate` draws `num_images` images of one class,
    `generate_batch` draws several jobs' images in one call of the generator."""

    def __init__(self, g: Generator, config: dict[str, Any]) -> None:
        self.g, self.config = g, config

    def _request(self, params: dict[str, Any]) -> tuple[GanGenerateParams, int, list[int]]:
        p = GanGenerateParams.model_validate(params)
        K = self.config["num_classes"]
        if p.label >= K:
            raise InvalidInputError.one("params.label", f"this model knows labels 0 to {K - 1}")
        seed = p.seed if p.seed is not None else secrets.randbelow(SEED_MAX + 1)
        return p, seed, [(seed + i) % (SEED_MAX + 1) for i in range(p.num_images)]

    def _outputs(
        self, p: GanGenerateParams, seed: int, seeds: list[int], images: torch.Tensor
    ) -> Iterator[Output]:
        recorded = json.dumps({**p.model_dump(), "seed": seed}, sort_keys=True)
        names = self.config.get("class_names") or []
        size = self.config["image_size"]
        for i, pixels in enumerate(to_uint8(images)):
            yield Output(
                name=f"image-{i}.png",
                kind="image",
                content_type="image/png",
                data=png_bytes(
                    to_pil(pixels), {"genq:params": recorded, "genq:seed": str(seeds[i])}
                ),
                meta={
                    "seed": seeds[i],
                    "label": p.label,
                    "class_name": names[p.label] if p.label < len(names) else str(p.label),
                    "index": i,
                    "width": size,
                    "height": size,
                },
            )

    def generate(self, params: dict[str, Any], ctx: RunContext) -> Iterator[Event]:
        yield from run_alone(self.generate_batch, params, ctx)

    def generate_batch(
        self, jobs: list[tuple[dict[str, Any], RunContext]]
    ) -> Iterator[tuple[int | None, Event | BaseException]]:
        """Every job's images from one call of the generator; a job this model refuses, or
        one canceled before the call, leaves the batch alone."""
        requests = {}
        for index, (params, ctx) in enumerate(jobs):
            if ctx.is_canceled():
                yield index, CanceledError(f"job {ctx.job_id} was canceled")
                continue
            try:
                requests[index] = self._request(params)
            except (InvalidInputError, ValidationError) as exc:
                yield index, exc
        if not requests:
            return
        order = sorted(requests)
        labels = torch.cat(
            [torch.full((requests[i][0].num_images,), requests[i][0].label) for i in order]
        )
        seeds = [s for i in order for s in requests[i][2]]
        images = sample(self.g, labels, seeds, jobs[order[0]][1].min_rows)  # (B, C, S, S)
        yield None, Progress(1, 1, "generated")
        start = 0
        for i in order:
            p, seed, job_seeds = requests[i]
            mine = images[start : start + len(job_seeds)]
            start += len(job_seeds)
            for output in self._outputs(p, seed, job_seeds, mine):
                yield i, output


def load(model_dir: Path | None, config: dict[str, Any], device: str) -> Gan:
    weights, config = load_model_files(model_dir, config, "gan")
    g, _ = build(config)
    g.load_state_dict(weights)
    g.to(device).eval()
    return Gan(g, config)
