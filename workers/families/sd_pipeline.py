"""The `diffusers` family's implementation: a Stable Diffusion (1.x / 2.x / XL) pipeline loaded
from a folder on disk and run for text-to-image, image-to-image and inpainting jobs, with or
without a LoRA adapter; fine-tuning with LoRA lives in `sd_lora`.

Loading takes the pipeline class that `model_index.json` names (only the classes in
`sd_spec.PIPELINES`) and safetensors weights only (`use_safetensors=True`: diffusers refuses a
folder whose weights are pickles). On CUDA the weights are fp16 (the XL VAE, which overflows
in fp16, is upcast by the pipeline itself through its `force_upcast` config); on a CPU fp32.

A job may pick a named sampler: a scheduler of that class is built `from_config` of the one the
pipeline was saved with (so the noise schedule of the model is kept) for that job only. Image
i is drawn from a CPU generator seeded with seed + i, so it is the same on any device and can
be redrawn alone. The pipeline runs in a helper thread while this generator streams a Progress
event per denoising step (diffusers' `callback_on_step_end`); a canceled job stops at the next
step. Each image is a PNG carrying the parameters and its seed in text chunks. Asked for
(`preview_every`), the first image of a job is decoded every N steps into a small PNG output.

Image-to-image and inpainting reuse the loaded components (`AutoPipelineFor*.from_pipe`: no
second copy of the weights). `strength` 0 noises nothing and runs no step, so the input is
returned as it is; an inpainted image keeps the input's pixels outside the mask (the VAE's
round trip would otherwise blur them).

Adapters. A LoRA version is served by its base model's server: the job's RunContext names the
adapter (its folder), which is loaded into the pipeline once (`load_lora_weights`, kept under
its model id, the least recently used dropped past MAX_ADAPTERS) and switched per call
(`set_adapters`); a job on the base model disables them. One pipeline call runs one adapter,
so the server's batch key keeps jobs of different adapters apart: they run back to back on
the same warm base, which is never reloaded.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from core.errors import InvalidInputError, ModelError
from core.events import Event, Log, Output, Progress
from workers.families.base import CanceledError, RunContext, image_seeds, job_seed, run_alone
from workers.families.checkpoints import CONFIG_NAME
from workers.families.pictures import image_output, png_bytes
from workers.families.sd_adapters import ADAPTER_FILE, AdapterCache
from workers.families.sd_loading import load_pipeline
from workers.families.sd_lora import train  # noqa: F401 - the family's `train`
from workers.families.sd_spec import PIPELINES, SCHEDULERS, SdGenerateParams
from workers.staging import local_model_folder

_DONE = object()
PREVIEW_MAX_SIDE = 128


def read_input(data: bytes, field: str, mode: str) -> Any:
    """An input picture's bytes as a PIL image in `mode` (RGB, or L for a mask); 422 naming
    `field` for what does not decode (Pillow's pixel limit applies)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode in ("RGBA", "LA", "P") and mode == "RGB":
                rgba = image.convert("RGBA")
                flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                flat.alpha_composite(rgba)
                return flat.convert("RGB")
            return image.convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInputError.one(field, f"not a readable image: {exc}") from None


class SdModel:
    """A loaded pipeline; `generate` runs one job, `generate_batch` several with the same
    steps, guidance, size, sampler and adapter. Calls take turns (a lock): a job's sampler and
    adapter are set on the shared pipeline for its duration."""

    def __init__(
        self,
        pipe: Any,
        config: dict[str, Any],
        device: str,
        pinned_adapter: dict[str, str] | None = None,
    ) -> None:
        self.pipe, self.config, self.device = pipe, config, device
        self.default_scheduler = pipe.scheduler
        self.layout = PIPELINES[type(pipe).__name__]
        self.adapters = AdapterCache(pipe, pinned_adapter)
        self._modes: dict[str, Any] = {"text2img": pipe}
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

    def pipeline_for(self, mode: str) -> Any:
        """The pipeline of a mode, sharing the loaded components (no weights copied)."""
        if mode not in self._modes:
            import diffusers

            auto = {
                "img2img": diffusers.AutoPipelineForImage2Image,
                "inpaint": diffusers.AutoPipelineForInpainting,
            }[mode]
            made = auto.from_pipe(self.pipe)
            made.set_progress_bar_config(disable=True)
            self._modes[mode] = made
        return self._modes[mode]

    def generate(self, params: dict[str, Any], ctx: RunContext) -> Iterator[Event]:
        yield from run_alone(self.generate_batch, params, ctx)

    def generate_batch(
        self, jobs: list[tuple[dict[str, Any], RunContext]]
    ) -> Iterator[tuple[int | None, Event | BaseException]]:
        """Several jobs in one pipeline call (they share steps, guidance, size, sampler and
        adapter: the batch key). Each job's prompt is encoded on its own, as it would be alone,
        and each image has its own generator; the call is padded to `min_rows` images (the
        padding is drawn and thrown away) so an image's bits do not depend on the batch. A job
        canceled mid-way is answered at once; its rows finish with the batch, unseen. Jobs
        with an input image (which never share a batch key) run one after another."""
        requests: dict[int, Request] = {}
        for index, (params, ctx) in enumerate(jobs):
            try:
                p = SdGenerateParams.model_validate(params)
                inputs = self._inputs(p, ctx)
            except (ValidationError, InvalidInputError) as exc:
                yield index, exc
                continue
            seed = job_seed(p.seed)
            requests[index] = Request(p, ctx, seed, image_seeds(seed, p.num_images), inputs)
        text_jobs = sorted(i for i, r in requests.items() if r.p.mode == "text2img")
        groups = [text_jobs] if text_jobs else []
        groups += [[i] for i in sorted(requests) if requests[i].p.mode != "text2img"]
        for order in groups:
            yield from self._generate_group(requests, order)

    def _inputs(self, p: SdGenerateParams, ctx: RunContext) -> dict[str, Any]:
        """The job's input pictures, decoded and sized: RGB `image`, binary L `mask`."""
        found: dict[str, Any] = {}
        for field in ("image", "mask"):
            if getattr(p, field) is None:
                continue
            data = ctx.inputs.get(field)
            if data is None:
                raise InvalidInputError.one(f"params.{field}", "the input picture was not sent")
            found[field] = read_input(data, f"params.{field}", "RGB" if field == "image" else "L")
        if "image" not in found:
            return found
        w, h = found["image"].size
        width = p.width or max(16, w - w % 8)
        height = p.height or max(16, h - h % 8)
        from PIL import Image

        found["image"] = found["image"].resize((width, height), Image.Resampling.LANCZOS)
        if "mask" in found:
            mask = found["mask"].resize((width, height), Image.Resampling.NEAREST)
            found["mask"] = mask.point(lambda v: 255 if v >= 128 else 0)
        return found

    def _generate_group(
        self, requests: dict[int, Request], order: list[int]
    ) -> Iterator[tuple[int | None, Event | BaseException]]:
        first = requests[order[0]]
        p0 = first.p
        if "image" in first.inputs:
            width, height = first.inputs["image"].size
        else:
            width = p0.width or self.native_size()
            height = p0.height or self.native_size()
        adapter = f", LoRA {first.ctx.adapter['id']}" if first.ctx.adapter else ""
        about = (
            f"{self.layout} {p0.mode}: {width}x{height}, {p0.steps} steps{adapter},"
            f" on {self.device}"
        )
        for index in order:
            yield index, Log(about)
            p = requests[index].p
            for field, text in (("prompt", p.prompt), ("negative_prompt", p.negative_prompt)):
                if (warning := self.truncation(field, text)) is not None:
                    yield index, warning
        if p0.mode != "text2img" and p0.strength == 0:
            # No noise added and no step to run: the input, as it is.
            images = [first.inputs["image"]] * len(first.seeds)
        else:
            with self._lock:
                self.adapters.use(first.ctx.adapter, p0.lora_scale)
                pipe = self.pipeline_for(p0.mode)
                pipe.scheduler = self.scheduler_for(p0.scheduler)
                try:
                    images = yield from self._run(pipe, requests, order, width, height)
                finally:
                    pipe.scheduler = self.default_scheduler
        if p0.mode == "inpaint":
            from PIL import Image

            # Outside the mask the input's own pixels, not their trip through the VAE.
            images = [
                Image.composite(im, first.inputs["image"], first.inputs["mask"]) for im in images
            ]
        start = 0
        for index in order:
            r = requests[index]
            recorded = json.dumps(
                {**r.p.model_dump(), "seed": r.seed, "width": width, "height": height},
                sort_keys=True,
            )
            for i, image in enumerate(images[start : start + len(r.seeds)]):
                yield index, image_output(i, image, recorded, r.seeds[i], {})
            start += len(r.seeds)

    def _embeddings(self, batch: list[Request], min_rows: int) -> dict[str, torch.Tensor]:
        """Each job's prompt encoded alone (as `pipe(prompt=...)` would), stacked, and padded
        with copies of the last row up to `min_rows` images."""
        first = batch[0].p
        cfg = first.guidance > 1 and self.pipe.unet.config.time_cond_proj_dim is None
        names = ["prompt_embeds", "negative_prompt_embeds"]
        if self.layout == "sdxl":
            names += ["pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        for r in batch:
            encoded = self.pipe.encode_prompt(
                prompt=r.p.prompt,
                device=self.pipe.device,
                num_images_per_prompt=len(r.seeds),
                do_classifier_free_guidance=cfg,
                negative_prompt=r.p.negative_prompt or None,
            )
            for name, tensor in zip(names, encoded, strict=True):
                if tensor is not None:
                    parts[name].append(tensor)
        rows = sum(len(r.seeds) for r in batch)
        stacked = {}
        for name, tensors in parts.items():
            if tensors:
                t = torch.cat(tensors)
                if rows < min_rows:
                    t = torch.cat([t, t[-1:].expand(min_rows - rows, *t.shape[1:])])
                stacked[name] = t
        return stacked

    def _preview(self, pipe: Any, latents: torch.Tensor, step: int) -> Output:
        """The latents of one image decoded into a small PNG."""
        with torch.no_grad():
            vae = pipe.vae
            scaled = latents.to(vae.dtype) / vae.config.scaling_factor
            pixels = vae.decode(scaled, return_dict=False)[0]
            image = pipe.image_processor.postprocess(pixels, output_type="pil")[0]
        image.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE))
        return Output(
            name=f"preview-{step:04d}.png",
            kind="preview",
            content_type="image/png",
            data=png_bytes(image, {"genq:step": str(step)}),
            meta={"step": step, "width": image.width, "height": image.height},
        )

    def _run(
        self, pipe: Any, requests: dict[int, Request], order: list[int], width: int, height: int
    ) -> Generator[tuple[int | None, Event | BaseException], None, list[Any]]:
        """Run the pipeline in a thread, yielding its per-step progress, previews (and the
        cancels of jobs in the batch); returns the images of the batch's real rows."""
        batch = [requests[i] for i in order]
        first = batch[0]
        # Padding keeps a row's bits independent of its batch; an image job never shares one.
        min_rows = first.ctx.min_rows if first.p.mode == "text2img" else 1
        seeds = [s for r in batch for s in r.seeds]
        rows = len(seeds)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        generators += [torch.Generator().manual_seed(0) for _ in range(min_rows - rows)]
        offsets = [sum(len(r.seeds) for r in batch[:k]) for k in range(len(batch))]
        events: queue.Queue[Any] = queue.Queue()
        result: dict[str, Any] = {}
        canceled: set[int] = set()

        def on_step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> Any:
            # The scheduler may take more model calls than steps (PNDM warms up).
            total = int(getattr(pipe, "num_timesteps", 0) or first.p.steps)
            events.put((None, Progress(step + 1, total, "denoising")))
            for position, r in enumerate(batch):
                every = r.p.preview_every
                if every and (step + 1) % every == 0 and position not in canceled:
                    row = offsets[position]
                    preview = self._preview(pipe, kwargs["latents"][row : row + 1], step + 1)
                    events.put((order[position], preview))
                if position not in canceled and r.ctx.is_canceled():
                    canceled.add(position)
                    events.put((order[position], CanceledError(f"job {r.ctx.job_id} was canceled")))
            if len(canceled) == len(batch):
                raise CanceledError("every job of the batch was canceled")
            return kwargs

        call: dict[str, Any] = {}
        if first.p.mode == "text2img":
            call = {"width": width, "height": height}
        else:
            call = {"image": first.inputs["image"], "strength": first.p.strength}
            if first.p.mode == "inpaint":
                call.update(mask_image=first.inputs["mask"], width=width, height=height)

        def work() -> None:
            try:
                out = pipe(
                    **self._embeddings(batch, min_rows),
                    **call,
                    num_inference_steps=first.p.steps,
                    guidance_scale=first.p.guidance,
                    generator=generators,
                    callback_on_step_end=on_step_end,
                    output_type="pil",
                )
                result["images"] = out.images[:rows]
            except BaseException as exc:  # noqa: BLE001 - re-raised in the job's thread
                result["error"] = exc
            finally:
                events.put(_DONE)

        thread = threading.Thread(target=work, name=f"sd-{first.ctx.job_id}", daemon=True)
        thread.start()
        while (item := events.get()) is not _DONE:
            yield item
        thread.join()
        if "error" in result:
            if len(batch) == 1 and isinstance(result["error"], CanceledError):
                raise CanceledError(f"job {first.ctx.job_id} was canceled")
            raise result["error"]
        images: list[Any] = result["images"]
        return images


@dataclass
class Request:
    """One job of a pipeline call: its params, context, seeds and decoded input pictures."""

    p: SdGenerateParams
    ctx: RunContext
    seed: int
    seeds: list[int]
    inputs: dict[str, Any]


def load(model_dir: Path | None, config: dict[str, Any], device: str) -> SdModel:
    """The pipeline of a registered version. A LoRA version's own folder (a server started on
    it rather than on its base) loads its base and serves the adapter by default."""
    if model_dir is None:
        raise ModelError("a diffusers model needs its pipeline folder")
    folder = Path(model_dir)
    if not (folder / ADAPTER_FILE).is_file():
        return SdModel(load_pipeline(folder, device), config, device)
    if not config:
        config = json.loads((folder / CONFIG_NAME).read_text())
    base_path = config.get("base_path")
    if not base_path:
        raise ModelError(f"{folder} is a LoRA adapter without the base_path of its model")
    pipe = load_pipeline(local_model_folder(base_path), device)
    return SdModel(pipe, config, device, pinned_adapter={"id": "pinned", "dir": str(folder)})
