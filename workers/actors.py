"""The Ray side of the workers: a warm model server per registered model, and a trainer per
training attempt, both streaming core.events back to the caller.

`ModelServer` and `Trainer` are plain classes (tests may run them without Ray);
`get_model_server` and `start_trainer` turn them into Ray actors. Their `generate` and `train`
methods are generators: Ray streams each yielded event to the caller as its own ObjectRef, so
the caller reads events while the model runs:

    server = get_model_server(model_id, family, model_dir, config)
    for ref in server.generate.remote(job_id, params):
        event = ray.get(ref)   # Progress, Log, Metric, Output, ModelSaved

An error raised while the model runs comes out of the `ray.get` of the next ref as a
`ray.exceptions.RayTaskError` that is also an instance of the original class, so the caller
can `except CanceledError` / `except InvalidInputError` / `except ModelError` (the original
object, with its fields, is `exc.cause`). Anything that is neither a genq error nor a
cancellation is turned into a ModelError inside the actor, because the caller (a Celery
process without torch) may not be able to unpickle a torch or diffusers exception. A model
that fails to load kills its actor: the caller sees `ray.exceptions.ActorDiedError`.

Nothing here calls `ray.init`: the process that uses these functions is a Ray driver already.
torch is imported only inside the actors.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ray
from pydantic import ValidationError
from ray.actor import ActorHandle

from core.errors import GenqError, InvalidInputError, ModelError, TransientError
from core.events import Event
from core.states import JobKind
from workers.families.base import CanceledError, DatasetRef, Family, RunContext, TrainContext
from workers.registry import get_family

log = logging.getLogger(__name__)

NAMESPACE = "genq"
SERVER_MAX_CONCURRENCY = 32
# A cancel for a job this server has not seen (yet) is remembered this long.
CANCEL_TTL_S = 600.0
LOCK_POLL_S = 0.05


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _gpu_info(device: str) -> dict[str, Any] | None:
    """What this actor's GPU reports (for the dashboard), or None on a CPU. Utilisation needs
    NVML (the nvidia-ml-py package); without it that field is None rather than a guess."""
    if device != "cuda":
        return None
    import torch

    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    try:
        utilization: int | None = int(torch.cuda.utilization(index))
    except Exception:  # no NVML
        utilization = None
    return {
        "index": index,
        "name": props.name,
        "memory_allocated_bytes": int(torch.cuda.memory_allocated(index)),
        "memory_reserved_bytes": int(torch.cuda.memory_reserved(index)),
        "memory_total_bytes": int(props.total_memory),
        "utilization_percent": utilization,
    }


def _guarded(events: Iterator[Event], job_id: str) -> Iterator[Event]:
    """Pass events through; turn what the caller could not unpickle or act on into genq
    errors. CanceledError and genq errors pass unchanged."""
    try:
        yield from events
    except (GenqError, CanceledError):
        raise
    except ValidationError as exc:
        errors = [
            {"field": ".".join(["params", *map(str, e["loc"])]), "message": e["msg"]}
            for e in exc.errors()
        ]
        raise InvalidInputError(errors) from None
    except Exception as exc:
        log.exception("job_id=%s: the model raised", job_id)
        if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA)
            raise TransientError(f"out of accelerator memory: {exc}") from None
        raise ModelError(f"{type(exc).__name__}: {exc}") from None


def _assigned_resources() -> dict[str, float]:
    if not ray.is_initialized():
        return {}
    return dict(ray.get_runtime_context().get_assigned_resources())


class ModelServer:
    """One model, loaded once and kept warm. Jobs run one at a time (a lock) for now; a
    job waiting for the lock can still be canceled."""

    def __init__(self, family: str, model_dir: str | None, config: dict[str, Any]) -> None:
        self.family = get_family(family)
        self.device = _device()
        started = time.perf_counter()
        implementation = self.family.load_implementation()
        self.model = implementation.load(
            Path(model_dir) if model_dir else None, config, self.device
        )
        self.load_s = time.perf_counter() - started
        self.jobs_served = 0
        self._lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._canceled: dict[str, float] = {}  # job_id -> when cancel was asked
        self._active: set[str] = set()
        log.info("loaded %s model on %s in %.2f s", family, self.device, self.load_s)

    def _is_canceled(self, job_id: str) -> Callable[[], bool]:
        return lambda: job_id in self._canceled

    def generate(self, job_id: str, params: dict[str, Any]) -> Iterator[Event]:
        is_canceled = self._is_canceled(job_id)
        ctx = RunContext(job_id=job_id, device=self.device, is_canceled=is_canceled)
        with self._state_lock:
            self._active.add(job_id)
        try:
            while not self._lock.acquire(timeout=LOCK_POLL_S):
                if is_canceled():
                    raise CanceledError(f"job {job_id} was canceled")
            try:
                yield from _guarded(self.model.generate(params, ctx), job_id)
                self.jobs_served += 1
            finally:
                self._lock.release()
        finally:
            with self._state_lock:
                self._active.discard(job_id)
                self._canceled.pop(job_id, None)

    def cancel(self, job_id: str) -> bool:
        """Ask a job to stop; True if it is running or waiting here now. A cancel for a job
        that has not arrived yet is kept for CANCEL_TTL_S, so a cancel that overtakes its
        generate call still works."""
        now = time.monotonic()
        with self._state_lock:
            for stale in [j for j, at in self._canceled.items() if now - at > CANCEL_TTL_S]:
                if stale not in self._active:
                    del self._canceled[stale]
            self._canceled[job_id] = now
            return job_id in self._active

    def info(self) -> dict[str, Any]:
        return {
            "family": self.family.name,
            "device": self.device,
            "load_s": self.load_s,
            "jobs_served": self.jobs_served,
            "active_jobs": sorted(self._active),
            "resources": _assigned_resources(),
            "gpu": _gpu_info(self.device),
        }


class Trainer:
    """One training attempt of one job; killing the actor frees what it held."""

    def __init__(self, family: str) -> None:
        self.family = get_family(family)
        self.device = _device()
        self._canceled = threading.Event()

    def train(
        self, job_id: str, kind: str, params: dict[str, Any], ctx: dict[str, Any]
    ) -> Iterator[Event]:
        """`ctx`: dataset {name, kind, path}, checkpoint_dir, model_dir, model_dir_rel and for
        a fine-tune parent_model_dir and parent_config; paths absolute, as strings."""
        if self.family.params_for(JobKind(kind)) is None:
            raise InvalidInputError.one("kind", f"the {self.family.name} family cannot {kind}")
        dataset = ctx.get("dataset")
        parent = ctx.get("parent_model_dir")
        train_ctx = TrainContext(
            job_id=job_id,
            device=self.device,
            is_canceled=self._canceled.is_set,
            dataset=(
                DatasetRef(
                    name=dataset["name"],
                    kind=dataset["kind"],
                    path=Path(dataset["path"]) if dataset.get("path") else None,
                )
                if dataset
                else None
            ),
            checkpoint_dir=Path(ctx["checkpoint_dir"]),
            model_dir=Path(ctx["model_dir"]),
            model_dir_rel=ctx["model_dir_rel"],
            parent_model_dir=Path(parent) if parent else None,
            parent_config=dict(ctx.get("parent_config") or {}),
        )
        implementation = self.family.load_implementation()
        yield from _guarded(implementation.train(params, train_ctx), job_id)

    def cancel(self) -> None:
        self._canceled.set()

    def info(self) -> dict[str, Any]:
        return {
            "family": self.family.name,
            "device": self.device,
            "resources": _assigned_resources(),
        }


_ServerActor = ray.remote(ModelServer)
_TrainerActor = ray.remote(Trainer)


def _num_gpus(family: Family) -> float:
    """The family's GPU share where the cluster has GPUs; none where it has not."""
    return family.resources.num_gpus if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def model_server_name(model_id: str) -> str:
    return f"model-{model_id}"


def get_model_server(
    model_id: str, family: Family, model_dir: str | None, config: dict[str, Any]
) -> ActorHandle:
    """The warm server of a registered model, started (and loading) if it does not exist.
    Detached: it outlives the caller, so the next job on the model pays no load time."""
    return _ServerActor.options(
        name=model_server_name(model_id),
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        max_concurrency=SERVER_MAX_CONCURRENCY,
        num_cpus=family.resources.num_cpus,
        num_gpus=_num_gpus(family),
    ).remote(family.name, model_dir, config)


def start_trainer(job_id: str, family: Family) -> ActorHandle:
    """A new trainer for one attempt of a training job; kill it (ray.kill) to stop it hard.
    A trainer left over from an earlier attempt of the job is killed first."""
    name = f"trainer-{job_id}"
    with contextlib.suppress(ValueError):  # ValueError: no such actor
        ray.kill(ray.get_actor(name, namespace=NAMESPACE))
    return _TrainerActor.options(
        name=name,
        namespace=NAMESPACE,
        max_concurrency=2,  # train and cancel
        num_cpus=family.resources.num_cpus,
        num_gpus=_num_gpus(family),
    ).remote(family.name)
