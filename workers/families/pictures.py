"""Image tensors to and from PNG files, shared by the image families (ddpm, gan, vae).

Generated images leave a model as (B, C, H, W) float tensors in [-1, 1]; this module turns
them into PNG bytes (with the generation parameters in PNG text chunks) and sample grids, and
turns an image a user sent (base64 PNG/JPEG in the job's params) into the tensor a model
takes: a centred square crop, resized, in [-1, 1].
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from core.errors import InvalidInputError

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
