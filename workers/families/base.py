"""What every model family provides, and what the actors hand to its implementation.

A family's spec module builds one `Family`; its implementation module (named by
`Family.implementation`, imported only inside a worker) defines

    load(model_dir: Path | None, config: dict, device: str) -> a loaded model with
        .generate(params: dict, ctx: RunContext) -> Iterator[Event]
    train(params: dict, ctx: TrainContext) -> Iterator[Event]      (families that train)

`params` arrive already validated against the family's spec (the API checked them); the
implementation parses them again with the same pydantic class to get typed values.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel

from core.states import JobKind


@dataclass(frozen=True)
class Resources:
    """What one model server or trainer of the family needs. GPUs are requested only where
    the cluster has them; a fraction lets several small models share one GPU."""

    num_gpus: float = 0.0
    num_cpus: float = 1.0
    gpu_memory_gb: float = 0.0


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


@dataclass
class DatasetRef:
    name: str
    kind: str  # images | text
    path: Path | None  # None for a built-in data set


@dataclass
class TrainContext(RunContext):
    """A training job: its data set, where to checkpoint, where to save the final model."""

    dataset: DatasetRef | None = None
    checkpoint_dir: Path = Path()
    # Absolute folder to save the model into, and the same relative to the artifact root
    # (what the ModelSaved event reports).
    model_dir: Path = Path()
    model_dir_rel: str = ""
    # For finetune: the registered model it starts from.
    parent_model_dir: Path | None = None
    parent_config: dict[str, Any] = field(default_factory=dict)


class CanceledError(Exception):
    """Raised inside an implementation's loop when its job's cancel was requested."""
