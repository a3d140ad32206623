"""The `charlm` family: a small GPT-style transformer over bytes, trained on a text data set
(the built-in `pydocs` or an uploaded text file); generation streams its text token by token."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from workers.families.base import (
    CheckpointEvery,
    Family,
    OpenAIShape,
    Preset,
    Resources,
    Scaling,
    StopStrings,
    TextSeed,
    TopP,
    TrainSeed,
)


class CharlmFinetuneParams(BaseModel):
    """Continue training a registered charlm on another text."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(2000, ge=1, le=1_000_000, description="Optimizer steps.")
    batch_size: int = Field(32, ge=1, le=1024)
    learning_rate: float = Field(2e-3, gt=0, le=1.0)
    seed: TrainSeed = 0
    checkpoint_every: CheckpointEvery = 200


class CharlmTrainParams(CharlmFinetuneParams):
    preset: Preset = "default"


class CharlmGenerateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field("", max_length=100_000, description="Text the output continues.")
    max_tokens: int = Field(200, ge=1, le=8192, description="Bytes to generate.")
    temperature: float = Field(
        1.0, ge=0, le=10, description="Softmax temperature; 0 always takes the likeliest byte."
    )
    top_k: int = Field(0, ge=0, le=256, description="Sample among the k likeliest; 0: all.")
    top_p: TopP = 1.0
    stop: StopStrings = Field(default_factory=list)
    seed: TextSeed = None


def batch_key(p: CharlmGenerateParams) -> str:
    """Every generate job of a model can share its batch: sampling, seed, stop strings and
    lengths are per row (charlm.py)."""
    return "text"


FAMILY = Family(
    name="charlm",
    description="GPT-style byte-level language model trained on a text data set.",
    implementation="workers.families.charlm",
    generate_params=CharlmGenerateParams,
    train_params=CharlmTrainParams,
    finetune_params=CharlmFinetuneParams,
    dataset_kinds=("text",),
    resources=Resources(num_gpus=0.25, num_cpus=1.0, gpu_memory_gb=1.0),
    scaling=Scaling(max_replicas=2, target_jobs_per_replica=8.0),
    openai=OpenAIShape.TEXT,
    # Rows (jobs) decoded together by one forward pass; GENQ_BATCH_MAX_ROWS may lower it.
    max_batch_size=64,
    batch_key=batch_key,
)
