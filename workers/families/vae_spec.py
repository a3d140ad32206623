"""The `vae` family: a class-conditional convolutional variational autoencoder on small
labelled images — samples from the prior, reconstructs an image, or interpolates between two."""

from __future__ import annotations

from typing import Annotated, Literal

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

# A base64 image in params: generous for a small picture, far below the request body limit.
IMAGE_MAX_CHARS = 2_000_000


class VaeFinetuneParams(BaseModel):
    """Continue training a registered vae on a data set with the same number of classes."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(1000, ge=1, le=1_000_000, description="Optimizer steps.")
    batch_size: int = Field(64, ge=1, le=1024)
    learning_rate: float = Field(2e-3, gt=0, le=1.0)
    kl_weight: float = Field(1.0, ge=0, le=100, description="Weight of the KL term (beta).")
    seed: TrainSeed = 0
    checkpoint_every: CheckpointEvery = 200


class VaeTrainParams(VaeFinetuneParams):
    preset: Preset = "default"


class VaeGenerateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["sample", "reconstruct", "interpolate"] = Field(
        "sample",
        description="`sample` draws from the prior; `reconstruct` encodes and decodes `images[0]`;"
        " `interpolate` walks the latent line from `images[0]` to `images[1]`.",
    )
    label: int = Field(0, ge=0, le=999, description="Class the decoder is conditioned on.")
    num_images: int = Field(4, ge=1, le=256, description="Samples, or interpolation points.")
    images: list[Annotated[str, Field(max_length=IMAGE_MAX_CHARS)]] = Field(
        [],
        max_length=2,
        description="Base64 PNG/JPEG images for `reconstruct` (one) and `interpolate` (two).",
    )
    seed: ImageSeed = None


def batch_key(p: VaeGenerateParams) -> str | None:
    """`sample` jobs share one decoder call whatever their labels and seeds; reconstructions
    and interpolations (which encode the job's own images) run alone."""
    return "sample" if p.mode == "sample" else None


FAMILY = Family(
    name="vae",
    description="Class-conditional convolutional VAE on small labelled images.",
    implementation="workers.families.vae",
    generate_params=VaeGenerateParams,
    train_params=VaeTrainParams,
    finetune_params=VaeFinetuneParams,
    dataset_kinds=("images",),
    resources=Resources(num_gpus=0.25, num_cpus=1.0, gpu_memory_gb=1.0),
    scaling=Scaling(max_replicas=2, target_jobs_per_replica=16.0),
    max_batch_size=256,
    batch_key=batch_key,
    openai=OpenAIShape.LABELLED_IMAGES,
)
