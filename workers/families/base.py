"""The family interface, version `GENQ_FAMILY_API`: what every model family provides, built in
or installed as a plug-in, and what the actors hand to its implementation.

A family's spec module builds one `Family` (no torch: the API process imports it) and names it
in the `genq.families` entry point group (workers/registry.py discovers them); its
implementation module (named by `Family.implementation`, imported only inside a worker) defines

    load(model_dir: Path | None, config: dict, device: str) -> a loaded model with
        .generate(params: dict, ctx: RunContext) -> Iterator[Event]
    train(params: dict, ctx: TrainContext) -> Iterator[Event]      (families that train)

A family that batches across jobs (its spec sets `max_batch_size` > 1 and `batch_key`) also
gives its loaded model

    generate_batch(jobs: list[tuple[dict, RunContext]]) -> Iterator[tuple[int | None, item]]

which runs every job's samples as one batch and yields `(index, event)` for job `index` (None:
every job of the batch that is still running) or `(index, exception)` when that one job fails
or is canceled (the batch goes on for the others). Each job's outputs must be exactly those it
would get alone with its seed (workers/batching.py says how that is kept).

`params` arrive already validated against the family's spec (the API checked them); the
implementation parses them again with the same pydantic class to get typed values. A family
whose params name input files (`Family.input_fields`) gets their bytes in `RunContext.inputs`;
a job on a version served by its base's server (config `served_by_base`) names that version in
`RunContext.adapter`.

The interface version changes when any of the above changes incompatibly (a field removed or
its meaning changed, a new required function); a family declares the version it was written
for in `Family.api_version`, and one declaring another version is reported, not loaded.
workers/familytest.py holds the checks and contract tests every family passes.

This module also holds what several families share without torch (their specs import it):
seeds, and the parameter fields their specs have in common.
"""

from __future__ import annotations

import importlib
import secrets
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field

# DatasetRef is defined in core so that workers.datasets, which the families import, needs
# nothing of this package; families and plug-ins keep importing it from here.
from core.datasetref import DatasetRef
from core.events import Event, Progress
from core.states import JobKind

# The version of the family interface this genq implements (the docstring above).
GENQ_FAMILY_API = 1

# The Ray custom resource, in GB, through which nodes declare their GPU memory and training
# jobs reserve it (`ray start --resources='{"gpu_memory_gb": 141}'`).
GPU_MEMORY_RESOURCE = "gpu_memory_gb"

# The largest seed a job may name, in every built-in family's spec.
SEED_MAX = 2**32 - 1


@dataclass(frozen=True)
class Resources:
    """What one model server or trainer of the family needs. GPUs are requested only where
    the cluster has them; a fraction lets several small models share one GPU."""

    num_gpus: float = 0.0
    num_cpus: float = 1.0
    gpu_memory_gb: float = 0.0


@dataclass(frozen=True)
class Scaling:
    """The default replica policy of the family's models (core/scaling.py); an admin may
    override it per model. One replica of a family that batches takes many jobs at once."""

    min_replicas: int = 0
    max_replicas: int = 1
    target_jobs_per_replica: float = 4.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_jobs_per_replica": self.target_jobs_per_replica,
        }


class OpenAIShape(StrEnum):
    """How the OpenAI-compatible API (/openai/v1, api/openai_compat/) reaches a family's models."""

    IMAGES = "images"  # images/generations: the prompt and a size
    LABELLED_IMAGES = "labelled-images"  # images/generations: the prompt names a class
    CHAT = "chat"  # chat and completions: messages through the model's chat template
    TEXT = "text"  # chat and completions: a prompt (a chat is sent as plain text)


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    implementation: str  # module path of the torch implementation
    generate_params: type[BaseModel] | None = None
    train_params: type[BaseModel] | None = None
    finetune_params: type[BaseModel] | None = None
    # Data set kinds a training job of this family accepts (images, text).
    dataset_kinds: tuple[str, ...] = ()
    resources: Resources = field(default_factory=Resources)
    scaling: Scaling = field(default_factory=Scaling)
    # Checks validated params against one registered model's config (what its folder can do,
    # e.g. whether its tokenizer has a chat template) at submit; raises InvalidInputError.
    check_model_params: Callable[[JobKind, dict[str, Any], dict[str, Any]], None] | None = None
    # Cross-job batching: the most sample rows (images) one batched run may hold, 1 = none.
    max_batch_size: int = 1
    # The parameters that must match for two generate jobs to share a batch (size, steps,
    # guidance, sampler...; seed, label and count may differ), from the validated params;
    # None for a job that cannot batch. Unset: the family never batches.
    batch_key: Callable[[Any], Hashable | None] | None = None
    # Params that name an input file by id (an upload, an output artifact, a data set item):
    # the API checks the id at submit, the runner sends the bytes in RunContext.inputs.
    input_fields: tuple[str, ...] = ()
    # Families whose models are folders an admin registers (POST /v1/models): checks the
    # folder's layout without loading it (no torch) and returns what goes into the model's
    # config; raises InvalidInputError naming `path` for what it refuses.
    check_layout: Callable[[Path], dict[str, Any]] | None = None
    # Whether and how /openai/v1 serves the family's models; None: it does not.
    openai: OpenAIShape | None = None
    # The interface version the family was written for: a plug-in sets it to the
    # GENQ_FAMILY_API it was built against.
    api_version: int = GENQ_FAMILY_API

    @property
    def is_batching(self) -> bool:
        return self.max_batch_size > 1 and self.batch_key is not None

    def params_for(self, kind: JobKind) -> type[BaseModel] | None:
        return {
            JobKind.GENERATE: self.generate_params,
            JobKind.TRAIN: self.train_params,
            JobKind.FINETUNE: self.finetune_params,
        }[kind]

    def load_implementation(self) -> ModuleType:
        return importlib.import_module(self.implementation)


@dataclass
class RunContext:
    """Handed to an implementation for one job."""

    job_id: str
    device: str
    # True once the job's cancel was requested; long loops check it between steps.
    is_canceled: Callable[[], bool] = lambda: False
    # Model calls with fewer sample rows are padded up to this many, so that a sample's result
    # does not depend on how many others it was computed with (workers/batching.py).
    min_rows: int = 1
    # A job on an adapter version served by its base's server: {"id": the version's model
    # id, "dir": its folder on this machine}; None on the model itself.
    adapter: dict[str, str] | None = None
    # Input files the job's params name (`Family.input_fields`), as bytes, by param name.
    inputs: dict[str, bytes] = field(default_factory=dict)


@dataclass
class TrainContext(RunContext):
    """A training job: its data set, where to checkpoint, where to save the final model."""

    dataset: DatasetRef | None = None
    checkpoint_dir: Path = Path()
    # Local folder to save the model into, and its key in the artifact store (what the
    # ModelSaved event reports; the trainer stores the folder there).
    model_dir: Path = Path()
    model_dir_rel: str = ""
    # For finetune: the registered model it starts from (its folder on this machine, and
    # its Model.path: a store key, an s3:// URL or an absolute path, valid on every machine).
    parent_model_dir: Path | None = None
    parent_model_path: str | None = None
    parent_config: dict[str, Any] = field(default_factory=dict)


class CanceledError(Exception):
    """Raised inside an implementation's loop when its job's cancel was requested."""


class PreemptedError(CanceledError):
    """A training attempt stopped at a checkpoint to make room for another job
    (workers/preemption.py); it resumes from that checkpoint in its next attempt."""


class TokenProgress:
    """A language model's progress while it generates: tokens made of `max_tokens`, as a
    Progress event at most every `interval_s` (a Ray message and a SQL write per token would
    cost more than the token), and always the last one, whose total is what was made (a job
    that stopped early at a stop string or end of text is complete)."""

    def __init__(self, max_tokens: int, interval_s: float = 0.1) -> None:
        self.max_tokens = max_tokens
        self.interval_s = interval_s
        self.sent_at = time.monotonic()

    def after(self, made: int) -> Progress | None:
        """The event to send once `made` tokens are done, or None if one went out just now."""
        now = time.monotonic()
        if made >= self.max_tokens or now - self.sent_at < self.interval_s:
            return None
        self.sent_at = now
        return Progress(made, self.max_tokens, "tokens")

    def done(self, made: int) -> Progress:
        return Progress(made, made, "tokens")


BatchItem = tuple[int | None, Event | BaseException]


def run_alone(
    generate_batch: Callable[[list[tuple[dict[str, Any], RunContext]]], Iterator[BatchItem]],
    params: dict[str, Any],
    ctx: RunContext,
) -> Iterator[Event]:
    """One job through its family's batch path, as a batch of one: the same code, so the same
    bytes, as in any batch it could have shared. A job's error is raised, not yielded."""
    for _, item in generate_batch([(params, ctx)]):
        if isinstance(item, BaseException):
            raise item
        yield item


def job_seed(seed: int | None) -> int:
    """The seed a job named, or a random one when it named none (its outputs record it)."""
    return seed if seed is not None else secrets.randbelow(SEED_MAX + 1)


def image_seeds(seed: int, count: int) -> list[int]:
    """Image i of a job uses seed + i (past SEED_MAX it wraps), so generating it alone with
    that seed gives the same image."""
    return [(seed + i) % (SEED_MAX + 1) for i in range(count)]


# -- parameter fields that several specs share ------------------------------------------------
# Same name, bounds and text in each family that has them; each spec sets its own default
# (`checkpoint_every: CheckpointEvery = 200`), and its schema is what it was with the field
# written out.

TrainSeed = Annotated[int, Field(ge=0, le=SEED_MAX)]
CheckpointEvery = Annotated[
    int, Field(ge=1, le=1_000_000, description="Steps between checkpoints (resume points).")
]
Preset = Annotated[
    Literal["tiny", "default"],
    Field(description="Network size: `tiny` trains in seconds (for tests)."),
]
ImageSeed = Annotated[
    int | None,
    Field(ge=0, le=SEED_MAX, description="Same seed, same images. Unset: a random seed."),
]
TextSeed = Annotated[
    int | None,
    Field(ge=0, le=SEED_MAX, description="Same seed, same text. Unset: a random seed."),
]
TopP = Annotated[
    float,
    Field(gt=0, le=1, description="Sample among the likeliest whose probability sums to p."),
]


def _stop_strings(stop: list[str]) -> list[str]:
    if any(not s or len(s) > 256 for s in stop):
        raise ValueError("each stop string has 1-256 characters")
    return stop


StopStrings = Annotated[
    list[str],
    Field(
        max_length=16,
        description="Generation ends before the first of these strings (not included).",
    ),
    AfterValidator(_stop_strings),
]
