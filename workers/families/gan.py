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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from core.events import Event, Log, Metric, Output, Progress
from workers.datasets import ImageDataset, load_dataset
from workers.families.base import RunContext, TrainContext, image_seeds, job_seed, run_alone
from workers.families.checkpoints import load_model_files, save_model
from workers.families.gan_spec import GanFinetuneParams, GanGenerateParams, GanTrainParams
from workers.families.pictures import (
    check_label,
    class_name,
    draw_batch,
    grid_output,
    image_outputs,
    seeded_latents,
)
from workers.families.training import (
    LossWindow,
    TrainingRun,
    check_loss,
    image_model_config,
    load_parent_images,
)

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
    return image_model_config("gan", preset, PRESETS[preset], dataset)


def build(config: dict[str, Any]) -> tuple[Generator, Discriminator]:
    g = Generator(config["z_dim"], config["width"], config["channels"], config["num_classes"])
    d = Discriminator(config["width"], config["channels"], config["num_classes"])
    return g, d


def sample(g: Generator, labels: torch.Tensor, seeds: list[int], min_rows: int = 1) -> torch.Tensor:
    """One image per (label, seed), each depending on its own seed only: (B, C, S, S). The
    call is padded to `min_rows` rows, where the kernels give every row the same bits whatever
    the batch (workers/batching.py)."""
    device = next(g.parameters()).device
    z, labels = seeded_latents(seeds, g.z_dim, labels, min_rows)  # (B', Z), (B',)
    with torch.no_grad():
        return g(z.to(device), labels.to(device))[: len(seeds)].float().cpu()


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
        dataset = load_parent_images(ctx.dataset, config)
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

    run = TrainingRun(ctx, CHECKPOINT_FORMAT, modules, optimizers, config, p)
    yield from run.resume()
    window = LossWindow()
    for step in run.steps():
        gen = run.generator(step)
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

        window.add(d_loss.item(), g_loss.item())
        check_loss(step, d_loss, g_loss)
        yield Progress(step, p.steps, "training")
        if run.is_due(step, METRIC_EVERY):
            run.loss, g_mean = window.means()
            rate = window.rate(B)
            yield Metric(step, {"d_loss": run.loss, "g_loss": g_mean, "samples_per_s": rate})
            window = LossWindow()
        if run.is_due(step, p.checkpoint_every):
            yield run.checkpoint(step)

    ema.eval()
    columns = min(K, 10)
    labels = torch.arange(K).repeat_interleave(2)  # two samples per class
    images = sample(ema, labels, [p.seed + i for i in range(len(labels))])
    meta = {"labels": labels.tolist(), "seed": p.seed}
    yield grid_output(images, columns * 2 if K <= 5 else columns, meta)
    save_model(ema.cpu(), config, ctx.model_dir)
    yield from run.saved({"final_d_loss": run.loss})


class Gan:
    """A loaded generator; `generate` draws `num_images` images of one class,
    `generate_batch` draws several jobs' images in one call of the generator."""

    def __init__(self, g: Generator, config: dict[str, Any]) -> None:
        self.g, self.config = g, config

    def _request(self, params: dict[str, Any]) -> tuple[GanGenerateParams, int, list[int]]:
        p = GanGenerateParams.model_validate(params)
        check_label(p.label, self.config)
        seed = job_seed(p.seed)
        return p, seed, image_seeds(seed, p.num_images)

    def _outputs(
        self, p: GanGenerateParams, seed: int, seeds: list[int], images: torch.Tensor
    ) -> Iterator[Output]:
        meta = {"label": p.label, "class_name": class_name(p.label, self.config)}
        yield from image_outputs(images, {**p.model_dump(), "seed": seed}, seeds, meta)

    def _sample(self, labels: torch.Tensor, seeds: list[int], min_rows: int) -> torch.Tensor:
        return sample(self.g, labels, seeds, min_rows)

    def generate(self, params: dict[str, Any], ctx: RunContext) -> Iterator[Event]:
        yield from run_alone(self.generate_batch, params, ctx)

    def generate_batch(
        self, jobs: list[tuple[dict[str, Any], RunContext]]
    ) -> Iterator[tuple[int | None, Event | BaseException]]:
        """Every job's images from one call of the generator; a job this model refuses, or
        one canceled before the call, leaves the batch alone."""
        yield from draw_batch(jobs, self._request, self._sample, self._outputs)


def load(model_dir: Path | None, config: dict[str, Any], device: str) -> Gan:
    weights, config = load_model_files(model_dir, config, "gan")
    g, _ = build(config)
    g.load_state_dict(weights)
    g.to(device).eval()
    return Gan(g, config)
