"""The Ray side of the workers: a warm model server per registered model, and a trainer per
training attempt, both streaming core.events back to the caller.

`ModelServer` (workers/server.py) and `Trainer` are plain classes (tests and the GPU bench may
run them without Ray); `start_model_server` and `start_trainer` turn them into Ray actors (the
pool places servers and `workers.routing.get_model_server` finds a warm one). Their
`generate` and `train` methods are generators: Ray streams each yielded event to the caller as
its own ObjectRef, so the caller reads events while the model runs:

    server = get_model_server(model_id, family, model_dir, config)
    for ref in server.generate.remote(job_id, params, attempt=lease_token):
        event = ray.get(ref)   # Progress, Log, Metric, Output, ModelSaved

The runner begins a job on a model server with a plain call instead, which costs both sides
less than a stream: `start` answers with the job's first events (all of them, for a quick job)
and whether it has ended; a job still running is then read with `follow`, a stream of the rest
(workers/server.py).

An error raised while the model runs comes out of the `ray.get` of the next ref (or answer) as a
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
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import ray
from ray.actor import ActorHandle
from ray.exceptions import ActorAlreadyExistsError

from core.errors import InvalidInputError
from core.events import Event, Log, ModelSaved
from core.logs import configure_logging
from core.settings import Settings
from core.states import JobKind
from workers.batching import job_error
from workers.families.base import GPU_MEMORY_RESOURCE, DatasetRef, Family, TrainContext
from workers.preemption import CheckpointStop
from workers.registry import get_family
from workers.server import ModelServer as BaseModelServer
from workers.server import ServingOptions, device_name, placement_event, ray_placement
from workers.staging import Staging, store_errors

log = logging.getLogger(__name__)

NAMESPACE = "genq"
SERVER_MAX_CONCURRENCY = 32
# How long starting a named actor waits for a dead one's name to be released (named_actor).
ACTOR_NAME_RELEASE_S = 30.0

_T = TypeVar("_T")


def _guarded(events: Iterator[Event], job_id: str) -> Iterator[Event]:
    """Pass events through; turn what the caller could not unpickle or act on into genq
    errors (workers/batching.py:job_error). CanceledError and genq errors pass unchanged."""
    try:
        yield from events
    except Exception as exc:
        raise job_error(exc, job_id) from None


class Trainer:
    """One training attempt of one job; killing the actor frees what it held."""

    def __init__(self, family: str, attempt: str = "") -> None:
        configure_actor_logging("trainer")
        self.family = get_family(family)
        # The attempt (its lease token) this trainer belongs to: a cancel or preemption that
        # names another attempt of the job is ignored.
        self.attempt = attempt
        self.device = device_name()
        self._canceled = threading.Event()
        self._preempt = CheckpointStop()

    def train(
        self, job_id: str, kind: str, params: dict[str, Any], ctx: dict[str, Any]
    ) -> Iterator[Event]:
        """`ctx` from the runner: artifact_url (the store), dataset {name, kind, path: its key
        or None}, model_dir_rel (the key the model is stored under) and for a fine-tune
        parent_model_path (the parent's Model.path) and parent_config. Without artifact_url
        (tests and benchmarks that drive a trainer directly): checkpoint_dir, model_dir,
        dataset path and parent_model_dir are absolute local paths, used as they are."""
        if self.family.params_for(JobKind(kind)) is None:
            raise InvalidInputError.one("kind", f"the {self.family.name} family cannot {kind}")
        about = {**ctx.get("log_context", {}), "job_id": job_id}
        log.info("training attempt started (%s, %s)", self.family.name, kind, extra=about)
        implementation = self.family.load_implementation()
        placement = placement_event()
        if placement is not None:
            yield placement
        if "artifact_url" not in ctx:
            train_ctx = self._local_ctx(job_id, ctx)
            self._preempt.folder = train_ctx.checkpoint_dir
            events = self._preempt.until_checkpoint(implementation.train(params, train_ctx), job_id)
            yield from _guarded(events, job_id)
            return
        yield from _guarded(self._staged(implementation, job_id, params, ctx), job_id)
        log.info("training attempt done", extra=about)

    def _local_ctx(self, job_id: str, ctx: dict[str, Any]) -> TrainContext:
        dataset = ctx.get("dataset")
        parent = ctx.get("parent_model_dir")
        return TrainContext(
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
            parent_model_path=parent,
            parent_config=dict(ctx.get("parent_config") or {}),
        )

    def _staged(
        self, implementation: Any, job_id: str, params: dict[str, Any], ctx: dict[str, Any]
    ) -> Iterator[Event]:
        """Training on any machine: the data set, the parent model and the latest checkpoint
        come from the store; each new checkpoint and the model go back to it."""
        with store_errors():
            staging = Staging.for_url(ctx["artifact_url"])
            sync = staging.checkpoints(job_id)
            pulled = sync.pull()
            dataset = ctx.get("dataset")
            data_path = staging.folder(dataset["path"]) if dataset and dataset["path"] else None
            parent = ctx.get("parent_model_path")
            parent_dir = staging.model_folder(parent) if parent else None
            model_dir = staging.model_dir(job_id)
        if pulled is not None:
            yield Log(
                f"resuming from checkpoint v{pulled.version} downloaded from the artifact store"
                f" ({pulled.size_bytes} bytes)"
            )
        train_ctx = TrainContext(
            job_id=job_id,
            device=self.device,
            is_canceled=self._canceled.is_set,
            dataset=(
                DatasetRef(name=dataset["name"], kind=dataset["kind"], path=data_path)
                if dataset
                else None
            ),
            checkpoint_dir=sync.local_dir,
            model_dir=model_dir,
            model_dir_rel=ctx["model_dir_rel"],
            parent_model_dir=parent_dir,
            parent_model_path=parent,
            parent_config=dict(ctx.get("parent_config") or {}),
        )
        # A preemption stops it after the next checkpoint has gone to the store.
        self._preempt.folder = sync.local_dir
        for event in self._preempt.until_checkpoint(
            implementation.train(params, train_ctx), job_id
        ):
            with store_errors():
                sync.push_if_changed()
                if isinstance(event, ModelSaved):
                    saved = staging.put_model(model_dir, event.path)
            if isinstance(event, ModelSaved):
                yield Log(
                    f"stored the model: {len(saved.files)} files, {saved.size_bytes} bytes",
                    level="debug",
                )
            yield event
        staging.clean(job_id)

    def _is_mine(self, attempt: str) -> bool:
        if attempt and attempt != self.attempt:
            log.warning("ignoring a request of attempt %s: this trainer runs %s",
                        attempt, self.attempt or "an unnamed attempt")  # fmt: skip
            return False
        return True

    def cancel(self, attempt: str = "") -> bool:
        """Stop at the next step; False (and nothing stops) when `attempt` is not this
        trainer's."""
        if not self._is_mine(attempt):
            return False
        self._canceled.set()
        return True

    def preempt(self, attempt: str = "") -> bool:
        """Stop at the next checkpoint (workers/preemption.py); False when `attempt` is not
        this trainer's."""
        if not self._is_mine(attempt):
            return False
        self._preempt.request()
        return True

    def ping(self) -> int:
        """Liveness, answered beside `train` (scheduler/stall.py). Returns this process's id."""
        return os.getpid()

    def info(self) -> dict[str, Any]:
        return {
            "family": self.family.name,
            "device": self.device,
            "resources": ray_placement().get("resources", {}),
            "pid": os.getpid(),  # fault tests kill this process, and no other
        }


class ModelServer(BaseModelServer):
    """The Ray actor of a model server: it unloads by killing itself when idle. (Named as its
    base so that its process still shows as `ray::ModelServer`; bench/soak.py looks for it.)"""

    def __init__(
        self,
        family: str,
        model_dir: str | None,
        config: dict[str, Any],
        options: ServingOptions | None = None,
    ) -> None:
        configure_actor_logging("model-server")
        super().__init__(family, model_dir, config, options, on_idle=self._unload)

    def _unload(self) -> None:
        # no_restart: the pool starts a fresh one when the model is next wanted.
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


def configure_actor_logging(process: str) -> None:
    """Inside a Ray actor, log as every genq process does (GENQ_LOG_FORMAT, GENQ_LOG_LEVEL of
    this node: stack/children.py passes them to Ray), to the actor's stderr, which Ray keeps in
    its session's logs folder (worker-*.err). Outside an actor (a test or a benchmark driving the
    class directly) the caller's logging is left alone. A Ray actor is an entry point, so it
    reads its own node's settings."""
    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return
    try:
        settings = Settings()
    except ValueError:  # a bad GENQ_* on this node must not stop the model: Ray's logging stays
        log.exception("the log settings of this node are invalid; logging as Ray does")
        return
    configure_logging(settings, process=process, node=ray.util.get_node_ip_address())


_ServerActor = ray.remote(ModelServer)
_TrainerActor = ray.remote(Trainer)


def num_gpus_for(family: Family) -> float:
    """The family's GPU share where the cluster has GPUs; none where it has not."""
    return family.resources.num_gpus if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def model_server_name(model_id: str, replica: int = 1) -> str:
    """The Ray name of a model's server: `model-<id>` for its first replica, `model-<id>@<n>`
    for the n-th (scheduler/snapshot.py reads the model id back)."""
    return f"model-{model_id}" if replica == 1 else f"model-{model_id}@{replica}"


def start_model_server(
    name: str,
    family: Family,
    model_dir: str | None,
    config: dict[str, Any],
    options: ServingOptions,
    scheduling_strategy: Any = None,
) -> ActorHandle:
    """Start (or find, by name) a server (replica) of a model; it loads in the background.
    Detached: it outlives its caller, so the next job on the model pays no load time."""

    def create() -> ActorHandle:
        return _ServerActor.options(
            name=name,
            namespace=NAMESPACE,
            lifetime="detached",
            max_concurrency=SERVER_MAX_CONCURRENCY,
            num_cpus=family.resources.num_cpus,
            num_gpus=num_gpus_for(family),
            scheduling_strategy=scheduling_strategy,
        ).remote(family.name, model_dir, config, options)

    return named_actor(name, create)


def trainer_resources(
    family: Family, num_gpus: float | None = None, gpu_memory_gb: float | None = None
) -> dict[str, Any]:
    """Ray placement options for a trainer: the job's own `num_gpus` (else the family's), only
    where the cluster has GPUs; its `gpu_memory_gb` as the custom resource nodes declare. A
    memory request no node declares could never be placed, so it is refused here rather than
    left pending."""
    cluster = ray.cluster_resources()
    wanted = family.resources.num_gpus if num_gpus is None else num_gpus
    options: dict[str, Any] = {
        "num_cpus": family.resources.num_cpus,
        "num_gpus": wanted if cluster.get("GPU", 0) > 0 else 0.0,
    }
    if gpu_memory_gb:
        if cluster.get(GPU_MEMORY_RESOURCE, 0) < gpu_memory_gb:
            raise InvalidInputError.one(
                "resources.gpu_memory_gb",
                f"no node of the cluster declares {gpu_memory_gb:g} GB of GPU memory "
                f"(Ray resource {GPU_MEMORY_RESOURCE!r}: "
                f"{cluster.get(GPU_MEMORY_RESOURCE, 0):g} in all)",
            )
        options["resources"] = {GPU_MEMORY_RESOURCE: gpu_memory_gb}
    return options


def start_trainer(
    job_id: str,
    family: Family,
    *,
    num_gpus: float | None = None,
    gpu_memory_gb: float | None = None,
    attempt: str = "",
) -> ActorHandle:
    """A new trainer for one attempt of a training job (`attempt`: its lease token, which
    every cancel or preemption sent to it names); kill it (ray.kill) to stop it hard.
    A trainer left over from an earlier attempt of the job is killed first. Ray starts it on a
    node where the job's GPUs and GPU memory fit (see trainer_resources)."""
    name = f"trainer-{job_id}"
    placement = trainer_resources(family, num_gpus, gpu_memory_gb)

    def create() -> ActorHandle:
        return _TrainerActor.options(
            name=name,
            namespace=NAMESPACE,
            max_concurrency=4,  # train, cancel or preempt, and a liveness ping
            **placement,
        ).remote(family.name, attempt)

    return named_actor(name, create, replace=True)


def named_actor(
    name: str, create: Callable[[], ActorHandle], *, replace: bool = False
) -> ActorHandle:
    """The live actor of this namespace called `name`, else a new one made by `create` (which
    names it so). `replace`: an actor already called so is killed (a trainer left over from an
    earlier attempt) and a new one made in any case.

    The name of an actor that just died (killed, or its process gone) can stay taken for a
    moment after its death has been seen, while Ray's control store finishes recording it, and
    `get_actor` may already say there is no such actor meanwhile: creating it then raises
    ActorAlreadyExistsError (Ray's own `get_if_exists` then gives up with a ValueError). So
    the look and the creation are tried again until the name is released (at most
    ACTOR_NAME_RELEASE_S)."""

    def look_or_create() -> ActorHandle:
        with contextlib.suppress(ValueError):  # ValueError: no such actor
            found = ray.get_actor(name, namespace=NAMESPACE)
            if not replace:
                return found
            ray.kill(found)
        return create()

    return until_released(
        look_or_create,
        ActorAlreadyExistsError,
        f"the actor name {name} is still held by a dead actor; trying again",
    )


def until_released(attempt: Callable[[], _T], errors: type[Exception], retrying: str) -> _T:
    """`attempt()`, tried again every 50 ms while it raises `errors`, for at most
    ACTOR_NAME_RELEASE_S (then the error goes up): Ray's control store lags an actor's death
    by a moment, during which its name stays taken or a lookup still finds the dead actor.
    `retrying`: the line logged for each new try."""
    deadline = time.monotonic() + ACTOR_NAME_RELEASE_S
    while True:
        try:
            return attempt()
        except errors:
            if time.monotonic() >= deadline:
                raise
            log.info(retrying)
            time.sleep(0.05)
