"""The `vae` family: a class-conditional convolutional variational autoencoder.

Kingma & Welling 2013 (arXiv:1312.6114), conditioned on the class as in Sohn, Lee & Yan 2015
("CVAE"). The encoder maps an image x and its class y to a Gaussian q(z | x, y) with mean mu
and log-variance logvar; the decoder maps a latent z and a class y back to pixel logits. The
loss per image is the reconstruction term (binary cross-entropy of the pixels scaled to
[0, 1], summed over pixels) plus `kl_weight` times KL(q(z | x, y) || N(0, I)), both reported
as metrics. Sampling draws z from the prior N(0, I) and decodes it with the requested class;
reconstruction decodes the mean of q; interpolation decodes points on the line between the
means of two images.

Shapes: B batch, C channels, S = image side (16), K classes, Z z_dim, W width.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import InvalidInputError
from core.events import Event, Log, Metric, Output, Progress
from workers.datasets import ImageDataset, load_dataset
from workers.families.base import (
    CanceledError,
    RunContext,
    TrainContext,
    image_seeds,
    job_seed,
    run_alone,
)
from workers.families.checkpoints import load_model_files, save_model
from workers.families.pictures import (
    check_label,
    decode_image,
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
from workers.families.vae_spec import VaeFinetuneParams, VaeGenerateParams, VaeTrainParams

CHECKPOINT_FORMAT = "genq-vae-checkpoint/1"
METRIC_EVERY = 20
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"image_size": 16, "z_dim": 4, "width": 8},
    "default": {"image_size": 16, "z_dim": 16, "width": 32},
}


class Vae(nn.Module):
    def __init__(self, z_dim: int, width: int, channels: int, num_classes: int) -> None:
        super().__init__()
        self.z_dim, self.width, self.num_classes = z_dim, width, num_classes
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1),  # 16 -> 8
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 4, 2, 1),  # 8 -> 4
            nn.SiLU(),
            nn.Flatten(),
        )
        self.to_latent = nn.Linear(2 * width * 16 + num_classes, 2 * z_dim)
        self.from_latent = nn.Linear(z_dim + num_classes, 2 * width * 16)
        self.decoder = nn.Sequential(
            nn.SiLU(),
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1),  # 4 -> 8
            nn.SiLU(),
            nn.ConvTranspose2d(width, width, 4, 2, 1),  # 8 -> 16
            nn.SiLU(),
            nn.Conv2d(width, channels, 3, 1, 1),
        )

    def encode(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, S, S) in [-1, 1], (B,) -> mu, logvar, each (B, Z)."""
        h = torch.cat([self.encoder(x), F.one_hot(y, self.num_classes).float()], dim=1)
        mu, logvar = self.to_latent(h).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, Z), (B,) -> pixel logits (B, C, S, S)."""
        h = self.from_latent(torch.cat([z, F.one_hot(y, self.num_classes).float()], dim=1))
        return self.decoder(h.view(-1, 2 * self.width, 4, 4))


def model_config(preset: str, dataset: ImageDataset) -> dict[str, Any]:
    return image_model_config("vae", preset, PRESETS[preset], dataset)


def build(config: dict[str, Any]) -> Vae:
    return Vae(config["z_dim"], config["width"], config["channels"], config["num_classes"])


def to_images(logits: torch.Tensor) -> torch.Tensor:
    """Pixel logits -> (B, C, S, S) in [-1, 1] on the CPU."""
    return (torch.sigmoid(logits.float()) * 2 - 1).cpu()


def losses(
    vae: Vae, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction, KL), each a mean over the batch of a per-image sum."""
    mu, logvar = vae.encode(x, y)  # (B, Z) each
    z = mu + eps * (0.5 * logvar).exp()  # the reparameterisation trick
    target = (x + 1) / 2  # (B, C, S, S) in [0, 1]
    recon = F.binary_cross_entropy_with_logits(vae.decode(z, y), target, reduction="sum")
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum()
    return recon / len(x), kl / len(x)


def train(params: dict[str, Any], ctx: TrainContext) -> Iterator[Event]:
    finetune = ctx.parent_model_dir is not None
    p = (VaeFinetuneParams if finetune else VaeTrainParams).model_validate(params)
    device = torch.device(ctx.device)
    weights = None
    if finetune:
        weights, parent = load_model_files(ctx.parent_model_dir, ctx.parent_config, "vae")
        dataset = load_parent_images(ctx.dataset, parent)
        config = {
            **model_config(parent["preset"], dataset),
            **{k: parent[k] for k in ("z_dim", "width")},
        }
    else:
        assert isinstance(p, VaeTrainParams)
        dataset = load_dataset(ctx.dataset, PRESETS[p.preset]["image_size"])
        config = model_config(p.preset, dataset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)
        vae = build(config)
    if weights is not None:
        vae.load_state_dict(weights)
    vae.to(device).train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=p.learning_rate)
    x_all, y_all = dataset.images.to(device), dataset.labels.to(device)  # (N,C,S,S), (N,)
    N, K, B, Z = len(x_all), dataset.num_classes, p.batch_size, config["z_dim"]
    n_params = sum(q.numel() for q in vae.parameters())
    yield Log(
        f"vae {config['preset']}: {N} images, {K} classes, {n_params} parameters, on {device}"
    )

    run = TrainingRun(ctx, CHECKPOINT_FORMAT, {"vae": vae}, {"vae": optimizer}, config, p)
    yield from run.resume()
    window = LossWindow()
    for step in run.steps():
        gen = run.generator(step)
        idx = torch.randint(0, N, (B,), generator=gen).to(device)  # (B,)
        eps = torch.randn(B, Z, generator=gen).to(device)  # (B, Z)
        recon, kl = losses(vae, x_all[idx], y_all[idx], eps)
        loss = recon + p.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        check_loss(step, loss)
        window.add(recon.item(), kl.item())
        yield Progress(step, p.steps, "training")
        if run.is_due(step, METRIC_EVERY):
            r, k = window.means()
            run.loss = r + p.kl_weight * k
            rate = window.rate(B)
            yield Metric(step, {"loss": run.loss, "recon": r, "kl": k, "samples_per_s": rate})
            window = LossWindow()
        if run.is_due(step, p.checkpoint_every):
            yield run.checkpoint(step)

    vae.eval()
    model = VaeModel(vae, config)
    labels = torch.arange(K).repeat_interleave(2)
    images = model.sample(labels, [p.seed + i for i in range(len(labels))])
    yield grid_output(images, min(2 * K, 10), {"labels": labels.tolist(), "seed": p.seed})
    save_model(vae.cpu(), config, ctx.model_dir)
    yield from run.saved({"final_loss": run.loss})


class VaeModel:
    """A loaded vae; `generate` samples, reconstructs or interpolates."""

    def __init__(self, vae: Vae, config: dict[str, Any]) -> None:
        self.vae, self.config = vae, config
        self.device = next(vae.parameters()).device

    def sample(self, labels: torch.Tensor, seeds: list[int], min_rows: int = 1) -> torch.Tensor:
        """One image per (label, seed), each from its own seed's latent; the decoder call is
        padded to `min_rows` rows so a row's bits do not depend on the batch."""
        z, labels = seeded_latents(seeds, self.vae.z_dim, labels, min_rows)  # (B', Z), (B',)
        with torch.no_grad():
            decoded = self.vae.decode(z.to(self.device), labels.to(self.device))
        return to_images(decoded[: len(seeds)])

    def _means(self, images: list[str], label: int) -> torch.Tensor:
        size, C = self.config["image_size"], self.config["channels"]
        x = torch.stack(
            [decode_image(data, f"params.images.{i}", size, C) for i, data in enumerate(images)]
        )
        y = torch.full((len(images),), label, device=self.device)
        with torch.no_grad():
            mu, _ = self.vae.encode(x.to(self.device), y)
        return mu  # (len(images), Z)

    def _check(self, params: dict[str, Any]) -> tuple[VaeGenerateParams, int, list[int]]:
        p = VaeGenerateParams.model_validate(params)
        check_label(p.label, self.config)
        wanted = {"sample": 0, "reconstruct": 1, "interpolate": 2}[p.mode]
        if len(p.images) != wanted:
            raise InvalidInputError.one(
                "params.images", f"mode {p.mode} takes {wanted} images, got {len(p.images)}"
            )
        seed = job_seed(p.seed)
        return p, seed, image_seeds(seed, p.num_images)

    def _sample_request(self, params: dict[str, Any]) -> tuple[VaeGenerateParams, int, list[int]]:
        """A job of the batch path: only `sample` jobs (the family's batch key) batch."""
        request = self._check(params)
        if request[0].mode != "sample":
            raise InvalidInputError.one("params.mode", "only `sample` jobs batch")
        return request

    def _outputs(
        self, p: VaeGenerateParams, seed: int, seeds: list[int], images: torch.Tensor
    ) -> Iterator[Output]:
        recorded = {**p.model_dump(exclude={"images"}), "seed": seed, "num_inputs": len(p.images)}
        yield from image_outputs(images, recorded, seeds, {"label": p.label, "mode": p.mode})

    def generate(self, params: dict[str, Any], ctx: RunContext) -> Iterator[Event]:
        if params.get("mode", "sample") == "sample":
            yield from run_alone(self.generate_batch, params, ctx)
            return
        p, seed, seeds = self._check(params)
        if ctx.is_canceled():
            raise CanceledError(f"job {ctx.job_id} was canceled")
        y = torch.full((p.num_images,), p.label, device=self.device)
        mu = self._means(p.images, p.label)  # (1 or 2, Z)
        if p.mode == "reconstruct":
            z = mu.expand(p.num_images, -1)
        else:
            w = torch.linspace(0, 1, p.num_images, device=self.device).unsqueeze(1)  # (B, 1)
            z = (1 - w) * mu[0] + w * mu[1]  # (B, Z)
        with torch.no_grad():
            images = to_images(self.vae.decode(z, y))
        yield Progress(1, 1, "generated")
        yield from self._outputs(p, seed, seeds, images)

    def generate_batch(
        self, jobs: list[tuple[dict[str, Any], RunContext]]
    ) -> Iterator[tuple[int | None, Event | BaseException]]:
        """Several `sample` jobs from one call of the decoder (the family's batch key admits
        only those); a job this model refuses, or one already canceled, leaves alone."""
        yield from draw_batch(jobs, self._sample_request, self.sample, self._outputs)


def load(model_dir: Path | None, config: dict[str, Any], device: str) -> VaeModel:
    weights, config = load_model_files(model_dir, config, "vae")
    vae = build(config)
    vae.load_state_dict(weights)
    vae.to(device).eval()
    return VaeModel(vae, config)
