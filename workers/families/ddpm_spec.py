"""The `ddpm` family: a class-conditional denoising diffusion model (a diffusers UNet2DModel
with a DDPM noise schedule) trained on labelled images such as the built-in `digits`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from workers.families.base import (
    CheckpointEvery,
    Family,
    ImageSeed,
    OpenAIShape,
    Preset,
    Resources,
    Scaling,
    TrainSeed,
)


class DdpmFinetuneParams(BaseModel):
    """Continue training a registered ddpm on another image data set (the same classes)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(3000, ge=1, le=1_000_000, description="Optimizer steps.")
    batch_size: int = Field(64, ge=1, le=1024)
    learning_rate: float = Field(1e-3, gt=0, le=1.0)
    seed: TrainSeed = 0
    label_dropout: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Share of training examples shown without their label (the null class):"
        " what classifier-free guidance needs at generation.",
    )
    checkpoint_every: CheckpointEvery = 200
    sample_steps: int = Field(
        50,
        ge=0,
        le=1000,
        description="Denoising steps of the sample grid (one image per class) drawn when"
        " training ends; 0 draws none.",
    )


class DdpmTrainParams(DdpmFinetuneParams):
    preset: Preset = "default"


class DdpmGenerateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: int = Field(0, ge=0, le=999, description="Class to generate (a digit for `digits`).")
    num_images: int = Field(4, ge=1, le=64)
    steps: int = Field(50, ge=1, le=1000, description="Denoising steps.")
    sampler: Literal["ddpm", "ddim"] = Field(
        "ddpm", description="`ddim` is deterministic given the seed and good in few steps."
    )
    guidance_scale: float = Field(
        1.0,
        ge=0,
        le=30,
        description="Classifier-free guidance: 1 follows the label as trained, above 1 more"
        " strongly, 0 ignores it. Needs a model trained with label_dropout > 0.",
    )
    seed: ImageSeed = None


def batch_key(p: DdpmGenerateParams) -> tuple[int, str, float]:
    """Jobs denoise together when they take the same steps with the same sampler and guidance;
    label, seed and num_images are per job."""
    return (p.steps, p.sampler, p.guidance_scale)


FAMILY = Family(
    name="ddpm",
    description="Class-conditional denoising diffusion (DDPM) on small labelled images.",
    implementation="workers.families.ddpm",
    generate_params=DdpmGenerateParams,
    train_params=DdpmTrainParams,
    finetune_params=DdpmFinetuneParams,
    dataset_kinds=("images",),
    resources=Resources(num_gpus=0.25, num_cpus=1.0, gpu_memory_gb=2.0),
    scaling=Scaling(max_replicas=2, target_jobs_per_replica=16.0),
    max_batch_size=64,
    batch_key=batch_key,
    openai=OpenAIShape.LABELLED_IMAGES,
)
