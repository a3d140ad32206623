"""Image tensors to and from PNG files, shared by the image families (ddpm, gan, vae, and
diffusers for its outputs).

Generated images leave a model as (B, C, H, W) float tensors in [-1, 1]; this module turns
them into PNG bytes (with the generation parameters in PNG text chunks), image outputs and
sample grids, and turns an image a user sent (base64 PNG/JPEG in the job's params) into the
tensor a model takes: a centred square crop, resized, in [-1, 1].

It also holds what the labelled-image models share (gan, vae, ddpm): the label check, the
class name an output reports, and the batch path of the models that draw any labels and
seeds in one call of their network (gan, vae), from one latent per seed.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from pydantic import ValidationError

from core.errors import InvalidInputError
from core.events import Output, Progress
from workers.families.base import BatchItem, CanceledError, RunContext

GRID_CELL_PX = 32  # grid cells are upscaled (nearest) to at least this many pixels


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """(H, W, C) uint8 -> a grayscale or RGB image."""
    array = pixels.numpy()
    return Image.fromarray(array[:, :, 0], "L") if array.shape[2] == 1 else Image.fromarray(array)


def png_bytes(image: Image.Image, text: dict[str, str] | None = None) -> bytes:
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def grid_png(images: torch.Tensor, columns: int) -> bytes:
    """(B, C, H, W) in [-1, 1] -> one PNG, `columns` images a row, small images upscaled."""
    B, C, H, W = images.shape
    rows = -(-B // columns)
    scale = max(1, -(-GRID_CELL_PX // H))
    pixels = to_uint8(images)  # (B, H, W, C)
    canvas = torch.zeros((rows * H, columns * W, C), dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, columns)
        canvas[r * H : (r + 1) * H, c * W : (c + 1) * W] = pixels[i]
    grid = to_pil(canvas)
    return png_bytes(
        grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    )


def grid_output(images: torch.Tensor, columns: int, meta: dict[str, Any]) -> Output:
    """The end-of-training look at a model: its samples as one grid (`grid_png`)."""
    return Output(
        name="samples.png",
        kind="grid",
        content_type="image/png",
        data=grid_png(images, columns),
        meta=meta,
    )


def image_output(
    index: int, image: Image.Image, params_text: str, seed: int, meta: dict[str, Any]
) -> Output:
    """Image `index` of a job as a PNG output. Its text chunks hold the job's params (JSON) and
    the image's own seed; its meta the seed, what the family adds (`meta`), the index and the
    size."""
    return Output(
        name=f"image-{index}.png",
        kind="image",
        content_type="image/png",
        data=png_bytes(image, {"genq:params": params_text, "genq:seed": str(seed)}),
        meta={"seed": seed, **meta, "index": index, "width": image.width, "height": image.height},
    )


def image_outputs(
    images: torch.Tensor, recorded: dict[str, Any], seeds: list[int], meta: dict[str, Any]
) -> Iterator[Output]:
    """A job's (B, C, H, W) images in [-1, 1] as PNG outputs (`image_output`), `recorded` the
    params they were made with."""
    params_text = json.dumps(recorded, sort_keys=True)
    for i, pixels in enumerate(to_uint8(images)):
        yield image_output(i, to_pil(pixels), params_text, seeds[i], meta)


def square(image: Image.Image) -> Image.Image:
    """The centred square crop: resizing a non-square image would squash it."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def decode_image(data: str, field: str, size: int, channels: int) -> torch.Tensor:
    """A base64 PNG/JPEG from a job's params -> (C, size, size) in [-1, 1]. Pillow's
    decompression-bomb limit applies; anything undecodable is refused naming `field`."""
    try:
        raw = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(raw)) as opened:
            opened.load()
            image = opened.convert("L" if channels == 1 else "RGB")
    except (binascii.Error, ValueError, OSError, Image.DecompressionBombError) as exc:
        raise InvalidInputError.one(field, f"not a base64 PNG or JPEG image: {exc}") from exc
    small = square(image).resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(small, dtype=np.uint8).reshape(size, size, channels)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


# -- labelled-image models --------------------------------------------------------------------


def check_label(label: int, config: dict[str, Any]) -> None:
    """Refuses, naming `params.label`, a class the model was not trained on."""
    K = config["num_classes"]
    if label >= K:
        raise InvalidInputError.one("params.label", f"this model knows labels 0 to {K - 1}")


def class_name(label: int, config: dict[str, Any]) -> str:
    """The name of class `label` in the model's training data (its number if unnamed)."""
    names = config.get("class_names") or []
    return names[label] if label < len(names) else str(label)


def seeded_latents(
    seeds: list[int], z_dim: int, labels: torch.Tensor, min_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One N(0, I) latent per seed from that seed's own generator, (B, Z), and the labels (B,),
    both padded with zero rows up to `min_rows` rows, where the kernels give every row the
    same bits whatever the batch (workers/batching.py)."""
    z = torch.cat(
        [torch.randn(1, z_dim, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )  # (B, Z)
    rows = len(seeds)
    if rows < min_rows:
        z = torch.cat([z, z.new_zeros((min_rows - rows, z_dim))])
        labels = torch.cat([labels, labels.new_zeros(min_rows - rows)])
    return z, labels


# A job's validated params (with `label` and `num_images`), its seed and its images' seeds.
LabelledRequest = tuple[Any, int, list[int]]


def draw_batch(
    jobs: list[tuple[dict[str, Any], RunContext]],
    request: Callable[[dict[str, Any]], LabelledRequest],
    sample: Callable[[torch.Tensor, list[int], int], torch.Tensor],
    outputs: Callable[[Any, int, list[int], torch.Tensor], Iterator[Output]],
) -> Iterator[BatchItem]:
    """The batch path of a model that draws any labels and seeds in one call: `request`
    validates a job's params (raising InvalidInputError or ValidationError for one it
    refuses), one `sample(labels, seeds, min_rows)` draws every job's images, and `outputs`
    turns a job's own into Output events. A job refused, or canceled before the call, fails
    alone."""
    requests: dict[int, LabelledRequest] = {}
    for index, (params, ctx) in enumerate(jobs):
        if ctx.is_canceled():
            yield index, CanceledError(f"job {ctx.job_id} was canceled")
            continue
        try:
            requests[index] = request(params)
        except (InvalidInputError, ValidationError) as exc:
            yield index, exc
    if not requests:
        return
    order = sorted(requests)
    labels = torch.cat(
        [torch.full((requests[i][0].num_images,), requests[i][0].label) for i in order]
    )
    seeds = [s for i in order for s in requests[i][2]]
    images = sample(labels, seeds, jobs[order[0]][1].min_rows)  # (B, C, S, S)
    yield None, Progress(1, 1, "generated")
    start = 0
    for i in order:
        p, seed, job_seeds = requests[i]
        mine = images[start : start + len(job_seeds)]
        start += len(job_seeds)
        for output in outputs(p, seed, job_seeds, mine):
            yield i, output
