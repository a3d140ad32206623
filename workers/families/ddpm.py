"""The `ddpm` family: class-conditional denoising diffusion on small labelled images.

Denoising Diffusion Probabilistic Models, Ho, Jain & Abbeel 2020 (arXiv:2006.11239). Training
(their Algorithm 1): take a clean image x0, a random timestep t and Gaussian noise eps; make
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; train the network to predict eps from (x_t, t)
with a mean squared error. Sampling (Algorithm 2): start from pure noise x_T and step
backwards, each step removing the predicted noise and adding a little fresh noise. The class
label enters the network as an embedding added to the timestep embedding, so one network
draws any class. The network is diffusers' `UNet2DModel`; the noise schedule and the reverse
step are diffusers' `DDPMScheduler` with the cosine schedule (Nichol & Dhariwal 2021), which
behaves for any number of training timesteps, and "trailing" timestep spacing, so that few
sampling steps still start from pure noise.

The network's presets and config, the schedulers and the sampling loop are in
ddpm_denoising.py; this module trains the network and serves the loaded model.

Checkpoints (checkpoints.py) are one safetensors file holding the network weights, the AdamW
state and (in its metadata) the step: a restarted job continues where the last one stopped, and
because each step's randomness is derived from (seed, step) a resumed run takes exactly the
steps the uninterrupted run would have taken. Nothing here is ever pickled.

Shapes: B batch, C image channels, H = W = image_size, K classes, N data set images.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from pydantic import ValidationError

from core.errors import InvalidInputError, ModelError
from core.events import Event, Log, Metric, ModelSaved, Output, Progress
from workers.datasets import ImageDataset, load_dataset
from workers.families.base import CanceledError, RunContext, TrainContext, run_alone
from workers.families.checkpoints import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    load_checkpoint,
    new_folder,
    save_checkpoint,
)
from workers.families.ddpm_denoising import (
    PRESETS,
    DenoiseJob,
    build_scheduler,
    denoise,
    denoise_jobs,
    model_config,
)
from workers.families.ddpm_spec import (
    SEED_MAX,
    DdpmFinetuneParams,
    DdpmGenerateParams,
    DdpmTrainParams,
)
from workers.families.pictures import grid_png, png_bytes, to_pil, to_uint8

# /2: the layout of checkpoints.py (optimizer state under `optim-optim.`, its param groups by
# optimizer name); a /1 checkpoint left by an older genq is refused with a ModelError.
CHECKPOINT_FORMAT = "genq-ddpm-checkpoint/2"
METRIC_EVERY = 20  # steps between Metric events


def step_generator(seed: int, step: int) -> torch.Generator:
    """The randomness of one training step, from (seed, step) alone, so a resumed run draws
    what the uninterrupted one would have. step < 2**20 (the spec's bound), seed < 2**32."""
    return torch.Generator().manual_seed(seed * 2**20 + step)


# -- training ---------------------------------------------------------------------------------


def _build_for_training(
    params: DdpmFinetuneParams, ctx: TrainContext
) -> tuple[UNet2DModel, dict[str, Any], ImageDataset]:
    """A fresh seeded network for `train`, or the parent's weights for a fine-tune."""
    if ctx.parent_model_dir is not None:
        config = dict(ctx.parent_config)
        dataset = load_dataset(ctx.dataset, config["image_size"], config["channels"])
        if dataset.num_classes != config["num_classes"]:
            raise InvalidInputError.one(
                "dataset",
                f"has {dataset.num_classes} classes, the model has {config['num_classes']}",
            )
        config["class_names"] = list(dataset.class_names)
        unet = UNet2DModel.from_pretrained(
            ctx.parent_model_dir, use_safetensors=True, low_cpu_mem_usage=False
        )
        return unet, config, dataset
    assert isinstance(params, DdpmTrainParams)
    dataset = load_dataset(ctx.dataset, PRESETS[params.preset]["image_size"])
    config = model_config(params.preset, dataset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        unet = UNet2DModel(**config["unet"])
    return unet, config, dataset


def _save_model(unet: UNet2DModel, config: dict[str, Any], model_dir: Path) -> None:
    """diffusers' own folder (save_pretrained, which `load` reads back) and genq.json."""
    with new_folder(model_dir) as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))


def train(params: dict[str, Any], ctx: TrainContext) -> Iterator[Event]:
    finetune = ctx.parent_model_dir is not None
    p = (DdpmFinetuneParams if finetune else DdpmTrainParams).model_validate(params)
    device = torch.device(ctx.device)
    unet, config, dataset = _build_for_training(p, ctx)
    unet.to(device).train()
    scheduler = build_scheduler(config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=p.learning_rate)
    x_all = dataset.images.to(device)  # (N, C, H, W)
    y_all = dataset.labels.to(device)  # (N,)
    N, T = len(x_all), config["num_train_timesteps"]
    n_params = sum(q.numel() for q in unet.parameters())
    yield Log(
        f"ddpm {config['preset']}: {N} images, {dataset.num_classes} classes, "
        f"{config['image_size']}px, {n_params} parameters, on {device}"
    )

    checkpoint = ctx.checkpoint_dir / CHECKPOINT_NAME
    start, final_loss = 0, float("nan")
    if checkpoint.exists():
        start, final_loss = load_checkpoint(
            checkpoint, CHECKPOINT_FORMAT, {"model": unet}, {"optim": optimizer}, config
        )
        start = min(start, p.steps)
        yield Log(f"resumed from step {start}")

    window_losses: list[float] = []
    window_start = time.perf_counter()
    for step in range(start + 1, p.steps + 1):
        if ctx.is_canceled():
            raise CanceledError(f"job {ctx.job_id} was canceled")
        g = step_generator(p.seed, step)
        idx = torch.randint(0, N, (p.batch_size,), generator=g).to(device)  # (B,)
        t = torch.randint(0, T, (p.batch_size,), generator=g).to(device)  # (B,)
        x0, y = x_all[idx], y_all[idx]  # (B, C, H, W), (B,)
        eps = torch.randn(x0.shape, generator=g).to(device)  # (B, C, H, W)
        if "null_label" in config:
            dropped = torch.rand(p.batch_size, generator=g).to(device) < p.label_dropout  # (B,)
            y = torch.where(dropped, config["null_label"], y)
        xt = scheduler.add_noise(x0, eps, t)  # sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
        loss = F.mse_loss(unet(xt, t, class_labels=y).sample, eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        window_losses.append(loss.item())
        if not torch.isfinite(loss):
            raise ModelError(f"the loss diverged at step {step}; try a lower learning_rate")
        yield Progress(step, p.steps, "training")

        if step % METRIC_EVERY == 0 or step == p.steps:
            elapsed = time.perf_counter() - window_start
            final_loss = sum(window_losses) / len(window_losses)
            rate = len(window_losses) * p.batch_size / max(elapsed, 1e-9)
            yield Metric(step, {"loss": final_loss, "samples_per_s": rate})
            window_losses, window_start = [], time.perf_counter()
        if step % p.checkpoint_every == 0 or step == p.steps:
            save_checkpoint(
                checkpoint,
                CHECKPOINT_FORMAT,
                {"model": unet},
                {"optim": optimizer},
                step,
                config,
                final_loss,
            )
            yield Log(f"checkpoint at step {step}", level="debug")

    unet.eval()
    if p.sample_steps:
        yield from _sample_grid(unet, config, dataset.num_classes, p, ctx)
    _save_model(unet.cpu(), config, ctx.model_dir)
    yield Log(f"saved the model to {ctx.model_dir_rel}")
    yield ModelSaved(
        path=ctx.model_dir_rel,
        config={**config, "seed": p.seed, "steps": p.steps},
        metrics={"final_loss": final_loss},
    )


def _sample_grid(
    unet: UNet2DModel,
    config: dict[str, Any],
    num_classes: int,
    p: DdpmFinetuneParams,
    ctx: TrainContext,
) -> Iterator[Event]:
    """The end-of-training look at the model: one image per class, all with the run's seed."""
    yield Log("drawing one sample per class")
    labels = torch.arange(num_classes)
    images = None
    steps = min(p.sample_steps, config["num_train_timesteps"])
    for item in denoise(unet, build_scheduler(config), labels, [p.seed] * num_classes, steps, ctx):
        if isinstance(item, torch.Tensor):
            images = item
    assert images is not None
    yield Output(
        name="samples.png",
        kind="grid",
        content_type="image/png",
        data=grid_png(images, columns=min(num_classes, 10)),
        meta={"labels": labels.tolist(), "steps": steps, "seed": p.seed},
    )


# -- generation -------------------------------------------------------------------------------


@dataclass
class _Request:
    """A generate job's validated params, with its seeds and labels resolved."""

    params: DdpmGenerateParams
    seed: int
    seeds: list[int]
    labels: torch.Tensor  # (num_images,)


class Ddpm:
    """A loaded model; `generate` draws `num_images` images of one class, `generate_batch`
    draws several jobs' images in one batch (same steps, sampler and guidance)."""

    def __init__(self, unet: UNet2DModel, config: dict[str, Any], device: str) -> None:
        self.unet = unet
        self.config = config
        self.device = device

    def _request(self, params: dict[str, Any]) -> _Request:
        p = DdpmGenerateParams.model_validate(params)
        K, T = self.config["num_classes"], self.config["num_train_timesteps"]
        if p.label >= K:
            raise InvalidInputError.one("params.label", f"this model knows labels 0 to {K - 1}")
        if p.steps > T:
            raise InvalidInputError.one("params.steps", f"this model allows at most {T} steps")
        if p.guidance_scale != 1.0 and self.config.get("null_label") is None:
            raise InvalidInputError.one(
                "params.guidance_scale", "this model was trained without a null label: use 1"
            )
        seed = p.seed if p.seed is not None else secrets.randbelow(SEED_MAX + 1)
        # Image i uses seed + i: generating it alone with that seed gives the same image.
        seeds = [(seed + i) % (SEED_MAX + 1) for i in range(p.num_images)]
        labels = torch.full((p.num_images,), p.label, dtype=torch.int64)
        return _Request(p, seed, seeds, labels)

    def _outputs(self, request: _Request, images: torch.Tensor) -> Iterator[Output]:
        p, seeds = request.params, request.seeds
        recorded = json.dumps({**p.model_dump(), "seed": request.seed}, sort_keys=True)
        size = self.config["image_size"]
        names = self.config.get("class_names") or []
        class_name = names[p.label] if p.label < len(names) else str(p.label)
        for i, pixels in enumerate(to_uint8(images)):
            text = {"genq:params": recorded, "genq:seed": str(seeds[i])}
            yield Output(
                name=f"image-{i}.png",
                kind="image",
                content_type="image/png",
                data=png_bytes(to_pil(pixels), text),
                meta={
                    "seed": seeds[i],
                    "label": p.label,
                    "class_name": class_name,
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
        """Every job's images in one denoising batch. The jobs share steps, sampler and
        guidance (the family's batch key); a job whose params this model refuses fails alone."""
        requests: dict[int, _Request] = {}
        for index, (params, _) in enumerate(jobs):
            try:
                requests[index] = self._request(params)
            except (InvalidInputError, ValidationError) as exc:
                yield index, exc
        if not requests:
            return
        order = sorted(requests)  # position in the denoising batch -> index in `jobs`
        first = requests[order[0]].params
        ctx = jobs[order[0]][1]
        denoising = [DenoiseJob(requests[i].labels, requests[i].seeds, jobs[i][1]) for i in order]
        for position, item in denoise_jobs(
            self.unet,
            build_scheduler(self.config, first.sampler),
            denoising,
            first.steps,
            first.guidance_scale,
            self.config.get("null_label"),
            ctx.min_rows,
        ):
            index = None if position is None else order[position]
            if isinstance(item, torch.Tensor):
                assert index is not None
                for output in self._outputs(requests[index], item):
                    yield index, output
            else:
                yield index, item


def load(model_dir: Path | None, config: dict[str, Any], device: str) -> Ddpm:
    if model_dir is None:
        raise ModelError("a ddpm model needs its folder")
    unet = UNet2DModel.from_pretrained(model_dir, use_safetensors=True, low_cpu_mem_usage=False)
    unet.to(device).eval()
    if not config:  # a model registered without its config: read the copy saved beside it
        config = json.loads((Path(model_dir) / CONFIG_NAME).read_text())
    return Ddpm(unet, config, device)
