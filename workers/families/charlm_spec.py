"""The `charlm` family: a small GPT-style transformer over bytes, trained on a text data set
(the built-in `pydocs` or an uploaded text file); generation streams its text token by token."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from workers.families.base import Family, OpenAIShape, Resources, Scaling

SEED_MAX = 2**32 - 1


class CharlmFinetuneParams(BaseModel):
    """Continue training a registered charlm on another text."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(2000, ge=1, le=1_000_000, description="Optimizer steps.")
    batch_size: int = Field(32, ge=1, le=1024)
    learning_rate: float = Field(2e-3, gt=0, le=1.0)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    checkpoint_every: int = Field(
        200, ge=1, le=1_000_000, description="Steps between checkpoints (resume points)."
    )


class CharlmTrainParams(CharlmFinetuneParams):
    preset: Literal["tiny", "default"] = Field(
        "default", description="Network size: `tiny` trains in seconds (for tests)."
    )


class CharlmGenerateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field("", max_length=100_000, description="Text the output continues.")
    max_tokens: int = Field(200, ge=1, le=8192, description="Bytes to generate.")
    temperature: float = Field(
        1.0, ge=0, le=10, description="Softmax temperature; 0 always takes the likeliest byte."
    )
    top_k: int = Field(0, ge=0, le=256, description="Sample among the k likeliest; 0: all.")
    top_p: float = Field(
        1.0, gt=0, le=1, description="Sample among the likeliest whose probability sums to p."
    )
    stop: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="Generation ends before the first of these strings (not included).",
    )
    seed: int | None = Field(
        None, ge=0, le=SEED_MAX, description="Same seed, same text. Unset: a random seed."
    )

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: list[str]) -> list[str]:
        if any(not s or len(s) > 256 for s in stop):
            raise ValueError("each stop string has 1-256 characters")
        return stop


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
