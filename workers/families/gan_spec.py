"""The `gan` family: a class-conditional DCGAN-style generator and projection discriminator
trained adversarially on labelled images such as the built-in `digits`."""

from __future__ import annotations

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


class GanFinetuneParams(BaseModel):
    """Continue training a registered gan on a data set with the same number of classes."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(2000, ge=1, le=1_000_000, description="Steps (one D and one G update).")
    batch_size: int = Field(64, ge=2, le=1024)
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    seed: TrainSeed = 0
    checkpoint_every: CheckpointEvery = 200


class GanTrainParams(GanFinetuneParams):
    preset: Preset = "default"


class GanGenerateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: int = Field(0, ge=0, le=999, description="Class to generate (a digit for `digits`).")
    num_images: int = Field(4, ge=1, le=256)
    seed: ImageSeed = None


def batch_key(p: GanGenerateParams) -> str:
    """One call of the generator draws any labels and seeds: every job can share a batch."""
    return "sample"


FAMILY = Family(
    name="gan",
    description="Class-conditional DCGAN (hinge loss, spectral norm) on small labelled images.",
    implementation="workers.families.gan",
    generate_params=GanGenerateParams,
    train_params=GanTrainParams,
    finetune_params=GanFinetuneParams,
    dataset_kinds=("images",),
    resources=Resources(num_gpus=0.25, num_cpus=1.0, gpu_memory_gb=1.0),
    scaling=Scaling(max_replicas=2, target_jobs_per_replica=16.0),
    max_batch_size=256,
    batch_key=batch_key,
    openai=OpenAIShape.LABELLED_IMAGES,
)
