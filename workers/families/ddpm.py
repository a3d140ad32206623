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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from pydantic import ValidationError

from core.errors import InvalidInputError, ModelError
from core.events import Event, Log, Metric, Output, Progress
from workers.datasets import ImageDataset, load_dataset
from workers.families.base import RunContext, TrainContext, image_seeds, job_seed, run_alone
from workers.families.checkpoints import CONFIG_NAME, new_folder
from workers.families.ddpm_denoising import (
    PRESETS,
    DenoiseJob,
    build_scheduler,
    denoise,
    denoise_jobs,
    model_config,
)
from workers.families.ddpm_spec import DdpmFinetuneParams, DdpmGenerateParams, DdpmTrainParams
from workers.families.pictures import check_label, class_name, grid_output, image_outputs
from workers.families.training import LossWindow, TrainingRun, check_loss, load_parent_images

# /2: the layout of checkpoints.py (optimizer state under `optim-optim.`, its param groups by
# optimizer name); a /1 checkpoint left by an older genq is refused with a ModelError.
CHECKPOINT_FORMAT = "genq-ddpm-checkpoint/2"
METRIC_EVERY = 20  # steps between Metric events


# -- training ---------------------------------------------------------------------------------


def _build_for_training(
    params: DdpmFinetuneParams, ctx: TrainContext
) -> tuple[UNet2DModel, dict[str, Any], ImageDataset]:
    """A fresh seeded network for `train`, or the parent's weights for a fine-tune."""
    if ctx.parent_model_dir is not None:
        config = dict(ctx.parent_config)
        dataset = load_parent_images(ctx.dataset, config)
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

    run = TrainingRun(ctx, CHECKPOINT_FORMAT, {"model": unet}, {"optim": optimizer}, config, p)
    yield from run.resume()
    window = LossWindow()
    for step in run.steps():
        g = run.generator(step)
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
        window.add(loss.item())
        check_loss(step, loss)
        yield Progress(step, p.steps, "training")

        if run.is_due(step, METRIC_EVERY):
            (run.loss,) = window.means()
            rate = window.rate(p.batch_size)
            yield Metric(step, {"loss": run.loss, "samples_per_s": rate})
            window = LossWindow()
        if run.is_due(step, p.checkpoint_every):
            yield run.checkpoint(step)

    unet.eval()
    if p.sample_steps:
        yield from _sample_grid(unet, config, dataset.num_classes, p, ctx)
    _save_model(unet.cpu(), config, ctx.model_dir)
    yield from run.saved({"final_loss": run.loss})


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
    meta = {"labels": labels.tolist(), "steps": steps, "seed": p.seed}
    yield grid_output(images, min(num_classes, 10), meta)


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
        check_label(p.label, self.config)
        T = self.config["num_train_timesteps"]
        if p.steps > T:
            raise InvalidInputError.one("params.steps", f"this model allows at most {T} steps")
        if p.guidance_scale != 1.0 and self.config.get("null_label") is None:
            raise InvalidInputError.one(
                "params.guidance_scale", "this model was trained without a null label: use 1"
            )
        seed = job_seed(p.seed)
        seeds = image_seeds(seed, p.num_images)
        labels = torch.full((p.num_images,), p.label, dtype=torch.int64)
        return _Request(p, seed, seeds, labels)

    def _outputs(self, request: _Request, images: torch.Tensor) -> Iterator[Output]:
        p = request.params
        meta = {"label": p.label, "class_name": class_name(p.label, self.config)}
        recorded = {**p.model_dump(), "seed": request.seed}
        yield from image_outputs(images, recorded, request.seeds, meta)

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
