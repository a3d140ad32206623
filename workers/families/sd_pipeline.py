"""The `diffusers` family's implementation: a Stable Diffusion (1.x / 2.x / XL) pipeline loaded
from a folder on disk and run for text-to-image jobs.

Loading takes the pipeline class that `model_index.json` names (only the classes in
`sd_spec.PIPELINES`) and safetensors weights only (`use_safetensors=True`: diffusers refuses a
folder whose weights are pickles). On CUDA the weights are fp16 (the XL VAE, which overflows
in fp16, is upcast by the pipeline itself through its `force_upcast` config); on a CPU fp32.

A job may pick a named sampler: a scheduler of that class is built `from_config` of the one the
pipeline was saved with (so the noise schedule of the model is kept) for that job only. Image
i is drawn from a CPU generator seeded with seed + i, so it is the same on any device and can
be redrawn alone. The pipeline runs in a helper thread while this generator streams a Progress
event per denoising step (diffusers' `callback_on_step_end`); a canceled job stops at the next
step. Each image is a PNG carrying the parameters and its seed in text chunks.
"""

from __future__ import annotations

import json
import queue
import secrets
import threading
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import torch

from core.errors import ModelError
from core.events import Event, Log, Output, Progress
from workers.families.base import CanceledError, RunContext
from workers.families.pictures import png_bytes
from workers.families.sd_spec import PIPELINES, SCHEDULERS, SEED_MAX, SdGenerateParams, check_layout

_DONE = object()


def dtype_for(device: str) -> torch.dtype:
    return torch.float16 if device.startswith("cuda") else torch.float32


def load_pipeline(path: Path, device: str) -> Any:
    """The pipeline of the folder, on `device`, in the right precision; ModelError if it does
    not load."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        layout = check_layout(path)
    except Exception as exc:
        raise ModelError(str(getattr(exc, "detail", exc))) from None
    cls = getattr(diffusers, layout["pipeline"])
    try:
        pipe = cls.from_pretrained(
            str(path), dtype=dtype_for(device), use_safetensors=True, local_files_only=True
        )
    except Exception as exc:
        raise ModelError(f"the pipeline does not load: {type(exc).__name__}: {exc}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class SdModel:
    """A loaded pipeline; `generate` runs one job. Jobs take turns (a lock): a job's sampler
    is set on the shared pipeline for its duration."""

    def __init__(self, pipe: Any, config: dict[str, Any], device: str) -> None:
        self.pipe, self.config, self.device = pipe, config, device
        self.default_scheduler = pipe.scheduler
        self.layout = PIPELINES[type(pipe).__name__]
        self._lock = threading.Lock()

    def native_size(self) -> int:
        return int(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)

    def scheduler_for(self, name: str) -> Any:
        if name == "default":
            return self.default_scheduler
        import diffusers

        class_name, extra = SCHEDULERS[name]
        return getattr(diffusers, class_name).from_config(self.default_scheduler.config, **extra)

    def generate(self, params: dict[str, Any], ctx: RunContext) -> Iterator[Event]:
        p = SdGenerateParams.model_validate(params)
        seed = p.seed if p.seed is not None else secrets.randbelow(SEED_MAX + 1)
        seeds = [(seed + i) % (SEED_MAX + 1) for i in range(p.num_images)]
        width = p.width or self.native_size()
        height = p.height or self.native_size()
        yield Log(f"{self.layout} pipeline: {width}x{height}, {p.steps} steps, on {self.device}")
        events: queue.Queue[Any] = queue.Queue()
        with self._lock:
            self.pipe.scheduler = self.scheduler_for(p.scheduler)
            try:
                images = yield from self._run(p, seeds, width, height, ctx, events)
            finally:
                self.pipe.scheduler = self.default_scheduler
        recorded = json.dumps(
            {**p.model_dump(), "seed": seed, "width": width, "height": height}, sort_keys=True
        )
        for i, image in enumerate(images):
            text = {"genq:params": recorded, "genq:seed": str(seeds[i])}
            yield Output(
                name=f"image-{i}.png",
                kind="image",
                content_type="image/png",
                data=png_bytes(image, text),
                meta={"seed": seeds[i], "index": i, "width": width, "height": height},
            )

    def _run(
        self,
        p: SdGenerateParams,
        seeds: list[int],
        width: int,
        height: int,
        ctx: RunContext,
        events: queue.Queue[Any],
    ) -> Generator[Event, None, list[Any]]:
        """Run the pipeline in a thread, yielding its per-step progress; returns the images."""
        result: dict[str, Any] = {}

        def on_step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> Any:
            # The scheduler may take more model calls than steps (PNDM warms up).
            total = int(getattr(pipe, "num_timesteps", 0) or p.steps)
            events.put(Progress(step + 1, total, "denoising"))
            if ctx.is_canceled():
                raise CanceledError(f"job {ctx.job_id} was canceled")
            return kwargs

        def work() -> None:
            try:
                out = self.pipe(
                    prompt=p.prompt,
                    negative_prompt=p.negative_prompt or None,
                    num_inference_steps=p.steps,
                    guidance_scale=p.guidance,
                    width=width,
                    height=height,
                    num_images_per_prompt=p.num_images,
                    generator=[torch.Generator().manual_seed(s) for s in seeds],
                    callback_on_step_end=on_step_end,
                    output_type="pil",
                )
                result["images"] = out.images
            except BaseException as exc:  # noqa: BLE001 - re-raised in the job's thread
                result["error"] = exc
            finally:
                events.put(_DONE)

        thread = threading.Thread(target=work, name=f"sd-{ctx.job_id}", daemon=True)
        thread.start()
        while (item := events.get()) is not _DONE:
            yield item
        thread.join()
        if "error" in result:
            raise result["error"]
        images: list[Any] = result["images"]
        return images


def load(model_dir: Path | None, config: dict[str, Any], device: str) -> SdModel:
    if model_dir is None:
        raise ModelError("a diffusers model needs its pipeline folder")
    return SdModel(load_pipeline(Path(model_dir), device), config, device)
