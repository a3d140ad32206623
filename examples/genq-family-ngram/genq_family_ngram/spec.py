"""The `ngram` family's spec: what genq's API imports (no torch). A byte-level n-gram language
model (an MLP over the last `context` bytes), trained on a text data set in seconds on a CPU;
generation streams text, and several generate jobs on one model run as one batch."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from workers.families.base import Family, Resources, Scaling

SEED_MAX = 2**32 - 1


class NgramTrainParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    context: int = Field(4, ge=1, le=16, description="Bytes the model sees before the next.")
    embedding: int = Field(16, ge=2, le=256, description="Size of each byte's embedding.")
    hidden: int = Field(128, ge=8, le=4096, description="Width of the hidden layer.")
    steps: int = Field(300, ge=1, le=100_000, description="Optimizer steps.")
    batch_size: int = Field(64, ge=1, le=4096)
    learning_rate: float = Field(3e-3, gt=0, le=1.0)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    checkpoint_every: int = Field(
        100, ge=1, le=100_000, description="Steps between checkpoints (resume points)."
    )


class NgramGenerateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field("", max_length=10_000, description="Text the output continues.")
    max_tokens: int = Field(100, ge=1, le=4096, description="Bytes to generate.")
    temperature: float = Field(
        1.0, ge=0, le=10, description="Softmax temperature; 0 always takes the likeliest byte."
    )
    seed: int | None = Field(
        None, ge=0, le=SEED_MAX, description="Same seed, same text. Unset: a random seed."
    )


def batch_key(p: NgramGenerateParams) -> str:
    """Any two generate jobs of one model can share a batch: prompts, lengths, temperatures
    and seeds are per row."""
    return "ngram"


FAMILY = Family(
    name="ngram",
    description="Byte-level n-gram MLP language model (Bengio et al. 2003) trained on a text"
    " data set; an example plug-in family.",
    implementation="genq_family_ngram.model",
    generate_params=NgramGenerateParams,
    train_params=NgramTrainParams,
    dataset_kinds=("text",),
    resources=Resources(num_gpus=0.0, num_cpus=0.5),
    scaling=Scaling(max_replicas=1, target_jobs_per_replica=8.0),
    max_batch_size=8,
    batch_key=batch_key,
    # The genq family interface this was written for (workers.families.base.GENQ_FAMILY_API
    # then); a genq with another one reports the family instead of loading it.
    api_version=1,
)
