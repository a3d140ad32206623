"""Data sets a training job reads: the built-in `digits` and `pydocs`, and uploaded image
folders and text files.

Both come out as one `ImageDataset`: every image in memory as a float32 tensor (N, C, H, W)
scaled to [-1, 1] (what a diffusion model trains on), integer labels (N,) and the class names
the labels index. The data sets genq trains on are small, so holding them in memory keeps the
training loop a plain tensor index.

`digits` is scikit-learn's copy of the UCI hand-written digits (1797 images, 8x8, values
0-16); it ships inside the package, so nothing is downloaded. An uploaded data set is a folder
with one sub-folder per class (`cats/1.png`, `dogs/7.jpg`); its images are cropped to a centred
square and resized. Pillow's decompression-bomb limit applies to every file.

Text data sets come out as raw UTF-8 bytes (the byte-level language model reads bytes).
`pydocs` is the docstrings of the Python standard library's top-level modules, read with `ast`
from the interpreter's own source files (nothing imported, nothing downloaded), so every
machine with the same Python has the same corpus. An uploaded text data set is a folder
holding `text.txt`.
"""

from __future__ import annotations

import ast
import functools
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from core.datasetref import DatasetRef
from core.errors import InvalidInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MAX_IMAGES = 100_000
MAX_CLASSES = 1000
PYDOCS_MAX_BYTES = 4_000_000  # the corpus is cut here: enough text, bounded memory
TEXT_FILE = "text.txt"
CAPTIONS_FILE = "captions.jsonl"
# Held decoded in memory for a LoRA run: a few dozen is typical, this many is the most.
MAX_CAPTIONED = 10_000


@dataclass(frozen=True)
class ImageDataset:
    images: torch.Tensor  # (N, C, H, W) float32 in [-1, 1]
    labels: torch.Tensor  # (N,) int64, indexes class_names
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])


def load_digits(size: int = 16) -> ImageDataset:
    """scikit-learn's 8x8 digits, upscaled (bilinear) to size x size, in [-1, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1)  # (N, 1, 8, 8), 0..16
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    images = (x / 16.0 * 2.0 - 1.0).clamp(-1.0, 1.0).contiguous()  # (N, 1, size, size)
    labels = torch.from_numpy(bunch.target.astype(np.int64))  # (N,)
    return ImageDataset(images, labels, [str(d) for d in range(10)])


def _square(image: Image.Image) -> Image.Image:
    """The centred square crop: resizing a non-square image would squash it."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def load_image_folder(path: Path, size: int = 16, channels: int | None = None) -> ImageDataset:
    """A folder of class sub-folders of images. `channels` 1 (grayscale) or 3 (RGB); None:
    grayscale when every image is, RGB otherwise."""
    if channels not in (None, 1, 3):
        raise InvalidInputError.one("dataset", "channels must be 1 or 3")
    if not path.is_dir():
        raise InvalidInputError.one("dataset", "the data set folder is missing")
    class_dirs = sorted(
        (d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")),
        key=lambda d: d.name,
    )
    files: list[tuple[Path, int]] = []
    for label, class_dir in enumerate(class_dirs):
        for f in sorted(class_dir.rglob("*")):
            if f.is_file() and not f.is_symlink() and f.suffix.lower() in IMAGE_SUFFIXES:
                files.append((f, label))
    if not files:
        raise InvalidInputError.one("dataset", "no images in class sub-folders")
    if len(class_dirs) > MAX_CLASSES:
        raise InvalidInputError.one("dataset", f"more than {MAX_CLASSES} classes")
    if len(files) > MAX_IMAGES:
        raise InvalidInputError.one("dataset", f"more than {MAX_IMAGES} images")

    decoded: list[Image.Image] = []
    for f, _ in files:
        try:
            with Image.open(f) as image:
                image.load()
                decoded.append(image.copy())
        except (OSError, Image.DecompressionBombError) as exc:
            raise InvalidInputError.one("dataset", f"{f.relative_to(path)}: {exc}") from exc
    if channels is None:
        is_gray = all(im.mode in ("1", "L", "LA", "I", "I;16", "F") for im in decoded)
        channels = 1 if is_gray else 3
    mode = "L" if channels == 1 else "RGB"

    arrays = []
    for image in decoded:
        if image.mode in ("RGBA", "LA", "P"):
            # Transparent pixels become white, not whatever colour hides under alpha 0.
            rgba = image.convert("RGBA")
            image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image.alpha_composite(rgba)
        square = _square(image.convert(mode)).resize((size, size), Image.Resampling.BILINEAR)
        arrays.append(np.asarray(square, dtype=np.uint8).reshape(size, size, channels))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (N, C, size, size) uint8
    images = (x.float() / 127.5 - 1.0).contiguous()
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ImageDataset(images, labels, [d.name for d in class_dirs])


def load_dataset(ref: DatasetRef | None, size: int, channels: int | None = None) -> ImageDataset:
    """The data set a training job names; None or a built-in name without a path is built in."""
    if ref is None or (ref.path is None and ref.name == "digits"):
        if channels not in (None, 1):
            raise InvalidInputError.one("dataset", "digits is grayscale (1 channel)")
        return load_digits(size)
    if ref.kind != "images":
        raise InvalidInputError.one("dataset", f"expected an images data set, got {ref.kind}")
    if ref.path is None:
        raise InvalidInputError.one("dataset", f"no built-in data set {ref.name!r}")
    return load_image_folder(Path(ref.path), size, channels)


@functools.cache  # parsing the stdlib takes seconds; a worker trains on it many times
def pydocs_corpus(max_bytes: int = PYDOCS_MAX_BYTES) -> bytes:
    """The docstrings of the standard library's top-level modules, in file-name order:
    module, class and function docstrings, each followed by a blank line."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts: list[bytes] = []
    size = 0
    for source in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(source.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # test fixtures in the stdlib folder that are not valid Python
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    chunk = (doc.strip() + "\n\n").encode("utf-8")
                    parts.append(chunk)
                    size += len(chunk)
                    if size >= max_bytes:
                        return b"".join(parts)[:max_bytes]
    return b"".join(parts)


def load_text(ref: DatasetRef | None) -> bytes:
    """The text a language-model training job names: `pydocs` (the default) or an upload."""
    if ref is None or (ref.path is None and ref.name == "pydocs"):
        return pydocs_corpus()
    if ref.kind != "text":
        raise InvalidInputError.one("dataset", f"expected a text data set, got {ref.kind}")
    if ref.path is None:
        raise InvalidInputError.one("dataset", f"no built-in data set {ref.name!r}")
    path = Path(ref.path)
    text_file = path / TEXT_FILE if path.is_dir() else path
    if not text_file.is_file():
        raise InvalidInputError.one("dataset", "the data set's text file is missing")
    data = text_file.read_bytes()
    if not data:
        raise InvalidInputError.one("dataset", "the text is empty")
    return data


def load_captioned(ref: DatasetRef | None, size: int) -> tuple[torch.Tensor, list[str]]:
    """A captioned-images data set (its `captions.jsonl`, written at upload): images centre-
    cropped and resized to size x size, RGB in [-1, 1] (N, 3, size, size), and their captions."""
    if ref is None or ref.path is None:
        raise InvalidInputError.one("dataset", "a captioned_images data set is required")
    if ref.kind != "captioned_images":
        raise InvalidInputError.one("dataset", f"expected captioned_images, got {ref.kind}")
    root = Path(ref.path)
    captions_file = root / CAPTIONS_FILE
    if not captions_file.is_file():
        raise InvalidInputError.one("dataset", f"the data set has no {CAPTIONS_FILE}")
    arrays, texts = [], []
    for line in captions_file.read_text("utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if len(texts) >= MAX_CAPTIONED:
            raise InvalidInputError.one("dataset", f"more than {MAX_CAPTIONED} images")
        file = root / row["file"]
        try:
            with Image.open(file) as image:
                rgb = _square(image.convert("RGB")).resize((size, size), Image.Resampling.BICUBIC)
        except (OSError, Image.DecompressionBombError) as exc:
            raise InvalidInputError.one("dataset", f"{row['file']}: {exc}") from exc
        arrays.append(np.asarray(rgb, dtype=np.uint8))
        texts.append(str(row["text"]))
    if not texts:
        raise InvalidInputError.one("dataset", "the data set has no captioned images")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (N, 3, size, size) uint8
    return (x.float() / 127.5 - 1.0).contiguous(), texts
