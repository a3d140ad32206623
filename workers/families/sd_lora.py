"""LoRA fine-tuning for the `diffusers` family (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models"), with diffusers' and peft's own LoRA support.

The pipeline's VAE, text encoder and UNet are frozen; peft low-rank adapters are added to the
UNet's attention projections (`unet.add_adapter(LoraConfig)`) and trained with the usual
denoising objective (Ho et al. 2020): an image's latent is noised at a random timestep and the
UNet, conditioned on its caption, predicts the noise (or the velocity, for a v-prediction
model). Captions are encoded and images encoded to latent distributions once, up front.

Checkpoints hold only the adapter weights and the optimizer state (`checkpoints.save_checkpoint`)
so a restarted trainer resumes from the last one; step s draws its images, timesteps and
noise from a generator seeded with (seed, s), so a resumed run trains exactly like an
uninterrupted one. The saved version holds only the adapter, in diffusers' LoRA format
(`pytorch_lora_weights.safetensors`, written by `save_lora_weights`), and `genq.json` naming
the base folder: it is served by its base model's servers (sd_pipeline.py), which load it with
`load_lora_weights`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from core.errors import InvalidInputError, ModelError
from core.events import Event, Log, Metric, Progress
from workers.datasets import load_captioned
from workers.families.base import TrainContext
from workers.families.checkpoints import CONFIG_NAME, AdapterWeights, new_folder
from workers.families.sd_adapters import ADAPTER_FILE, is_adapter_folder
from workers.families.sd_loading import load_pipeline
from workers.families.sd_spec import LORA_KIND, SdFinetuneParams, check_layout
from workers.families.training import LossWindow, TrainingRun, check_loss

CHECKPOINT_FORMAT = "genq-sd-lora-checkpoint/1"
METRIC_EVERY = 10
ENCODE_BATCH = 8


def encode_captions(pipe: Any, texts: list[str], device: str) -> torch.Tensor:
    """Each caption through the frozen text encoder, as the pipeline encodes a prompt:
    (N, T, D)."""
    tokenizer = pipe.tokenizer
    ids = tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), ENCODE_BATCH):
            out.append(pipe.text_encoder(ids[start : start + ENCODE_BATCH].to(device))[0])
    return torch.cat(out)


def encode_images(pipe: Any, images: torch.Tensor, device: str) -> torch.Tensor:
    """Each image's latent distribution from the frozen VAE: (N, 2 * latent channels, h, w)
    (mean and log-variance)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(images), ENCODE_BATCH):
            x = images[start : start + ENCODE_BATCH].to(device)
            out.append(pipe.vae.encode(x).latent_dist.parameters)
    return torch.cat(out)


def save_version(pipe: Any, unet: Any, config: dict[str, Any], model_dir: Path) -> int:
    """The adapter (diffusers' LoRA format) and genq.json into a new folder (swapped into
    place: checkpoints.new_folder); returns the adapter's size in bytes."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    with new_folder(model_dir) as tmp:
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        type(pipe).save_lora_weights(
            str(tmp), unet_lora_layers=layers, weight_name=ADAPTER_FILE, safe_serialization=True
        )
        size_bytes = (tmp / ADAPTER_FILE).stat().st_size
        config = {**config, "adapter_bytes": size_bytes}
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    return size_bytes


def train(params: dict[str, Any], ctx: TrainContext) -> Iterator[Event]:
    from peft import LoraConfig

    if ctx.parent_model_dir is None:
        raise InvalidInputError.one("kind", "a diffusers model is fine-tuned, not trained")
    p = SdFinetuneParams.model_validate(params)
    parent_dir = Path(ctx.parent_model_dir)
    if is_adapter_folder(parent_dir):
        raise InvalidInputError.one("model", "a LoRA version: fine-tune its base model instead")
    try:
        layout = check_layout(parent_dir)
    except InvalidInputError as exc:
        raise ModelError(exc.detail) from None
    if layout["layout"] != "sd":
        raise InvalidInputError.one("model", "LoRA fine-tuning takes a 1.x/2.x layout, not XL")
    # As registered (a store key, an s3:// URL or an absolute path): valid on every machine.
    base_path = ctx.parent_model_path or str(parent_dir)
    # fp32 throughout: the adapters train in full precision, and so does the frozen base.
    pipe = load_pipeline(parent_dir, "cpu", dtype=torch.float32).to(ctx.device)
    native = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    size = p.resolution or native
    if size % pipe.vae_scale_factor:
        raise InvalidInputError.one(
            "params.resolution", f"must be a multiple of {pipe.vae_scale_factor} for this model"
        )
    images, texts = load_captioned(ctx.dataset, size)
    unet, vae = pipe.unet, pipe.vae
    for module in (unet, vae, pipe.text_encoder):
        module.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)  # the adapters' initialisation
        unet.add_adapter(
            LoraConfig(
                r=p.rank,
                lora_alpha=p.alpha,
                init_lora_weights="gaussian",
                target_modules=list(p.target_modules),
            )
        )
    trainable = [q for q in unet.parameters() if q.requires_grad]
    if not trainable:
        raise InvalidInputError.one("params.target_modules", "no such layers in this UNet")
    optimizer = torch.optim.AdamW(trainable, lr=p.learning_rate, weight_decay=1e-2)
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction = str(noise_scheduler.config.prediction_type)
    if prediction not in ("epsilon", "v_prediction"):
        raise ModelError(f"cannot fine-tune a {prediction}-prediction model")
    T = int(noise_scheduler.config.num_train_timesteps)
    lora = {"rank": p.rank, "alpha": p.alpha, "target_modules": sorted(p.target_modules)}
    config = {
        "family": "diffusers",
        "kind": LORA_KIND,
        # Generate jobs on this version run on its parent's servers (scheduler/runner.py).
        "served_by_base": True,
        "base_path": base_path,
        "pipeline": layout["pipeline"],
        "layout": layout["layout"],
        "lora": lora,
        "resolution": size,
    }
    yield Log(
        f"LoRA on the UNet: {sum(q.numel() for q in trainable)} trainable parameters,"
        f" {len(texts)} captioned images at {size}x{size}, on {ctx.device}"
    )
    prompts = encode_captions(pipe, texts, ctx.device)
    latent_params = encode_images(pipe, images, ctx.device)
    scaling = float(vae.config.scaling_factor)

    modules: dict[str, Any] = {"adapter": AdapterWeights(unet)}
    run = TrainingRun(ctx, CHECKPOINT_FORMAT, modules, {"adapter": optimizer}, config, p)
    yield from run.resume()
    unet.train()
    B, N = p.batch_size, len(texts)
    window = LossWindow()
    for step in run.steps():
        gen = run.generator(step)
        rows = torch.randint(0, N, (B,), generator=gen)
        mean, logvar = latent_params[rows].chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        eps = torch.randn(mean.shape, generator=gen).to(ctx.device)
        latents = (mean + std * eps) * scaling  # (B, 4, h, w)
        noise = torch.randn(latents.shape, generator=gen).to(ctx.device)
        timesteps = torch.randint(0, T, (B,), generator=gen).to(ctx.device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        if prediction == "epsilon":
            target = noise
        else:
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        predicted = unet(noisy, timesteps, prompts[rows]).sample
        loss = F.mse_loss(predicted.float(), target.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        check_loss(step, loss)
        window.add(loss.item())
        yield Progress(step, p.steps, "fine-tuning")
        if run.is_due(step, METRIC_EVERY):
            (run.loss,) = window.means()
            yield Metric(step, {"loss": run.loss, "images_per_s": window.rate(B)})
            window = LossWindow()
        if run.is_due(step, p.checkpoint_every):
            yield run.checkpoint(step)

    unet.eval()
    size_bytes = save_version(pipe, unet, config, ctx.model_dir)
    yield from run.saved(
        {"final_loss": run.loss, "adapter_bytes": size_bytes},
        f"the adapter ({size_bytes} bytes)",
        {**config, "adapter_bytes": size_bytes},
    )
