"""The check of a pretrained model registered with `POST /v1/models`: the `check_model` Celery
task loads the folder with the family's own loading code, in a Ray task (so torch and the
accelerator stay out of the Celery process, and a GPU family gets its GPU), then marks the
model `ready`, or `failed` with the reason.

The API has already checked the folder's layout without torch (sd_spec / causal_lm_spec);
this proves the weights load. A check that finds its model no longer `checking` (checked
twice, or deleted) changes nothing. A failure of Ray itself (no cluster, a dead node) is
retried by Celery a few times before the model is marked failed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import ray
from celery import Celery

from core.artifacts import ArtifactStore
from core.catalog import FAILED, READY, set_model_status
from core.db import Database
from core.errors import GenqError
from core.settings import Settings
from core.tables import Model
from scheduler.broker import CHECK_MODEL_TASK
from scheduler.outcomes import RAY_TRANSIENT
from scheduler.runner import Runner
from workers.registry import get_family
from workers.staging import Staging, store_errors

log = logging.getLogger(__name__)

MAX_RETRIES = 3
RETRY_DELAY_S = 10.0


def load_model(
    family: str, path: str, config: dict[str, Any], artifact_url: str | None = None
) -> dict[str, Any]:
    """Load the model as a model server would (on whichever machine Ray runs this, so its
    folder comes from the artifact store); what the check reports about it."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    folder = Path(path)
    if artifact_url:
        with store_errors():
            folder = Staging.for_url(artifact_url).model_folder(path)
    loaded = get_family(family).load_implementation().load(folder, config, device)
    load_s = time.perf_counter() - started
    modules = [m for m in vars(loaded).values() if isinstance(m, torch.nn.Module)]
    pipe = getattr(loaded, "pipe", None)
    if pipe is not None:
        modules += [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    parameters = sum(p.numel() for m in modules for p in m.parameters())
    return {"device": device, "load_s": round(load_s, 3), "parameters": parameters}


_load_remote = ray.remote(max_retries=0)(load_model)


def check_model(settings: Settings, database: Database, runner: Runner, model_id: str) -> str:
    """Load the model in Ray and record the outcome; returns it (for logs)."""
    with database.transaction() as session:
        model = session.get(Model, model_id)
        if model is None or model.status != "checking":
            return "skipped"
        family = get_family(model.family)
        path = model.path or ""
        config = dict(model.config or {})
    runner.connect_ray()
    num_gpus = family.resources.num_gpus if ray.cluster_resources().get("GPU", 0) > 0 else 0
    ref = _load_remote.options(num_cpus=family.resources.num_cpus, num_gpus=num_gpus).remote(
        family.name, path, config, ArtifactStore.from_settings(settings).url
    )
    try:
        info = ray.get(ref)
        status, detail = READY, None
        log.info("model %s loaded: %s", model_id, info)
    except RAY_TRANSIENT:
        raise  # the task retries
    except Exception as exc:  # noqa: BLE001 - whatever the loading code raised is the reason
        cause = getattr(exc, "cause", None) or exc
        detail = (
            cause.detail if isinstance(cause, GenqError) else f"{type(cause).__name__}: {cause}"
        )
        status, info = FAILED, {}
        log.warning("model %s does not load: %s", model_id, detail)
    with database.transaction() as session:
        if set_model_status(session, model_id, status, detail and detail[:4000]):
            model = session.get(Model, model_id)
            assert model is not None
            model.metrics = {**(model.metrics or {}), **{f"check_{k}": v for k, v in info.items()}}
    return status


def register(app: Celery, settings: Settings, database: Database, runner: Runner) -> None:
    @app.task(
        name=CHECK_MODEL_TASK,
        bind=True,
        acks_late=True,
        ignore_result=True,
        max_retries=MAX_RETRIES,
    )
    def check_model_task(self: Any, model_id: str) -> str:
        try:
            return check_model(settings, database, runner, model_id)
        except RAY_TRANSIENT as exc:
            if self.request.retries >= MAX_RETRIES:
                with database.transaction() as session:
                    set_model_status(session, model_id, FAILED, f"the check could not run: {exc}")
                return FAILED
            raise self.retry(exc=exc, countdown=RETRY_DELAY_S) from exc
