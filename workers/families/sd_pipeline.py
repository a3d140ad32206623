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
from pydantic import ValidationError

from core.errors import ModelError
from core.events import Event, Log, Output, Progress
from workers.families.base import CanceledError, RunContext, run_alone
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
    """A loaded pipeline; `generate` runs one job, `generate_batch` several with the same
    steps, guidance, size and sampler. Calls take turns (a lock): a job's sampler is set on the
    shared pipeline for its duration."""

    def __init__(self, pipe: Any, config: dict[str, Any], device: str) -> None:
        self.pipe, self.config, self.device = pipe, config, device
        self.default_scheduler = pipe.scheduler
        self.layout = PIPELINES[type(pipe).__name__]
        self._lock = threading.Lock()

    def native_size(self) -> int:
        return int(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)

    def truncation(self, field: str, text: str) -> Log | None:
        """A warning when the text encoder will read only the start of `text` (CLIP reads 77
        tokens): the job runs, but its owner should know part of the prompt was dropped."""
        tokenizer = self.pipe.tokenizer
        limit = int(tokenizer.model_max_length)
        n = len(tokenizer(text, truncation=False)["input_ids"]) if text else 0
        if n <= limit:
            return None
        return Log(f"{field} is {n} tokens; the text encoder reads the first {limit}", "warning")

    def scheduler_for(self, name: str) -> Any:
        if name == "default":
            return self.default_scheduler
        import diffusers

        class_name, extra = SCHEDULERS[name]
        return getattr(diffusers, class_name).from_config(self.default_scheduler.config, **extra)

    def generate(self, params: dict[str, Any], ctx: RunContext) -> Iterator[Event]:
        yield from run_alone(self.generate_batch, params, ctx)

    def generate_batch(
        self, jobs: list[tuple[dict[str, Any], RunContext]]
    ) -> Iterator[tuple[int | None, Event | BaseException]]:
        """Several jobs in one pipeline call (they share steps, guidance, size and sampler:
        the family's batch key). Each job's prompt is encoded on its own, as it would be alone,
        and each image has its own generator; the call is padded to `min_rows` images (the
        padding is drawn and thrown away) so an image's bits do not depend on the batch. A job
        canceled mid-way is answered at once; its rows finish with the batch, unseen."""
        requests: dict[int, tuple[SdGenerateParams, int, list[int]]] = {}
        for index, (params, _) in enumerate(jobs):
            try:
                p = SdGenerateParams.model_validate(params)
            except ValidationError as exc:
                yield index, exc
                continue
            seed = p.seed if p.seed is not None else secrets.randbelow(SEED_MAX + 1)
            requests[index] = (p, seed, [(seed + i) % (SEED_MAX + 1) for i in range(p.num_images)])
        if not requests:
            return
        order = sorted(requests)
        first = requests[order[0]][0]
        width = first.width or self.native_size()
        height = first.height or self.native_size()
        about = f"{self.layout} pipeline: {width}x{height}, {first.steps} steps, on {self.device}"
        for index in order:
            yield index, Log(about)
            p = requests[index][0]
            for field, text in (("prompt", p.prompt), ("negative_prompt", p.negative_prompt)):
                if (warning := self.truncation(field, text)) is not None:
                    yield index, warning
        batch = [(jobs[i][1], requests[i][0], requests[i][2]) for i in order]
        with self._lock:
            self.pipe.scheduler = self.scheduler_for(first.scheduler)
            try:
                images = yield from self._run(batch, order, width, height)
            finally:
                self.pipe.scheduler = self.default_scheduler
        start = 0
        for index in order:
            p, seed, seeds = requests[index]
            recorded = json.dumps(
                {**p.model_dump(), "seed": seed, "width": width, "height": height}, sort_keys=True
            )
            for i, image in enumerate(images[start : start + len(seeds)]):
                text = {"genq:params": recorded, "genq:seed": str(seeds[i])}
                yield (
                    index,
                    Output(
                        name=f"image-{i}.png",
                        kind="image",
                        content_type="image/png",
                        data=png_bytes(image, text),
                        meta={"seed": seeds[i], "index": i, "width": width, "height": height},
                    ),
                )
            start += len(seeds)

    def _embeddings(
        self, batch: list[tuple[RunContext, SdGenerateParams, list[int]]], min_rows: int
    ) -> dict[str, torch.Tensor]:
        """Each job's prompt encoded alone (as `pipe(prompt=...)` would), stacked, and padded
        with copies of the last row up to `min_rows` images."""
        first = batch[0][1]
        cfg = first.guidance > 1 and self.pipe.unet.config.time_cond_proj_dim is None
        names = ["prompt_embeds", "negative_prompt_embeds"]
        if self.layout == "sdxl":
            names += ["pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        for _, p, seeds in batch:
            encoded = self.pipe.encode_prompt(
                prompt=p.prompt,
                device=self.pipe.device,
                num_images_per_prompt=len(seeds),
                do_classifier_free_guidance=cfg,
                negative_prompt=p.negative_prompt or None,
            )
            for name, tensor in zip(names, encoded, strict=True):
                if tensor is not None:
                    parts[name].append(tensor)
        rows = sum(len(seeds) for _, _, seeds in batch)
        stacked = {}
        for name, tensors in parts.items():
            if tensors:
                t = torch.cat(tensors)
                if rows < min_rows:
                    t = torch.cat([t, t[-1:].expand(min_rows - rows, *t.shape[1:])])
                stacked[name] = t
        return stacked

    def _run(
        self,
        batch: list[tuple[RunContext, SdGenerateParams, list[int]]],
        order: list[int],
        width: int,
        height: int,
    ) -> Generator[tuple[int | None, Event | BaseException], None, list[Any]]:
        """Run the pipeline in a thread, yielding its per-step progress (and the cancels of
        jobs in the batch); returns the images of the batch's real rows."""
        first = batch[0][1]
        min_rows = batch[0][0].min_rows
        seeds = [s for _, _, job_seeds in batch for s in job_seeds]
        rows = len(seeds)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        generators += [torch.Generator().manual_seed(0) for _ in range(min_rows - rows)]
        events: queue.Queue[Any] = queue.Queue()
        result: dict[str, Any] = {}
        canceled: set[int] = set()

        def on_step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> Any:
            # The scheduler may take more model calls than steps (PNDM warms up).
            total = int(getattr(pipe, "num_timesteps", 0) or first.steps)
            events.put((None, Progress(step + 1, total, "denoising")))
            for position, (ctx, _, _) in enumerate(batch):
                if position not in canceled and ctx.is_canceled():
                    canceled.add(position)
                    events.put((order[position], CanceledError(f"job {ctx.job_id} was canceled")))
            if len(canceled) == len(batch):
                raise CanceledError("every job of the batch was canceled")
            return kwargs

        def work() -> None:
            try:
                out = self.pipe(
                    **self._embeddings(batch, min_rows),
                    num_inference_steps=first.steps,
                    guidance_scale=first.guidance,
                    width=width,
                    height=height,
                    generator=generators,
                    callback_on_step_end=on_step_end,
                    output_type="pil",
                )
                result["images"] = out.images[:rows]
            except BaseException as exc:  # noqa: BLE001 - re-raised in the job's thread
                result["error"] = exc
            finally:
                events.put(_DONE)

        thread = threading.Thread(target=work, name=f"sd-{batch[0][0].job_id}", daemon=True)
        thread.start()
        while (item := events.get()) is not _DONE:
            yield item
        thread.join()
        if "error" in result:
            if len(batch) == 1 and isinstance(result["error"], CanceledError):
                raise CanceledError(f"job {batch[0][0].job_id} was canceled")
            raise result["error"]
        images: list[Any] = result["images"]
        return images


def load(model_dir: Path | None, config: dict[str, Any], device: str) -> SdModel:
    if model_dir is None:
        raise ModelError("a diffusers model needs its pipeline folder")
    return SdModel(load_pipeline(Path(model_dir), device), config, device)
