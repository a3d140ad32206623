"""`POST /v1/datasets`: upload a data set — a zip of images (one folder per class), a zip of
captioned images, or a text file — for training jobs to name.

The request is `multipart/form-data` with `name`, `kind` (`images`, `captioned_images` or
`text`) and `file`. A `captioned_images` zip holds images (in any folders) and their captions:
a `captions.jsonl` at its root (`{"file": "a/b.png", "text": "..."}` per line) or a `.txt`
beside each image (`b.png` -> `b.txt`); every image needs a non-empty caption, and a caption
for a file that is not in the zip is refused.
Every limit answers before anything is kept: an upload over GENQ_DATASET_MAX_BYTES is 413; a
zip is unpacked by core/archives.py, which streams each entry to disk and answers 413 for more
entries than GENQ_DATASET_MAX_ENTRIES, an entry over GENQ_DATASET_MAX_ENTRY_BYTES or a total
over GENQ_DATASET_MAX_UNPACKED_BYTES (counted as written, not trusted from the zip's headers),
and 422 naming `file` and the entry for an unsafe, too long or duplicate path, a symlink, an
encrypted or malformed entry or an unknown compression method. A file outside a class folder,
a file that is not an image, or an image over GENQ_DATASET_MAX_PIXELS pixels or that does not
decode is 422 too. Text must be UTF-8. The
upload is unpacked into a temporary folder inside `datasets/` and renamed into place only when
all of it passed, and the row is added in the same request; on any refusal the folder is
removed, so nothing is left behind and nothing lands outside the data set's own folder.
Preprocessing (resize, normalise, tokenise) happens in the training job.
"""

from __future__ import annotations

import codecs
import json
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import IO, Any

from flask import Blueprint, Response, jsonify, request
from sqlalchemy import select

from api.auth import principal
from api.payloads import dataset_payload
from api.state import genq
from core.archives import ArchiveLimits, extract_zip
from core.artifacts import check_name
from core.errors import ConflictError, InvalidInputError
from core.ids import new_id
from core.settings import Settings
from core.tables import Dataset

bp = Blueprint("datasets", __name__, url_prefix="/v1")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
# What zip tools add on their own; skipped rather than refused.
IGNORED_PARTS = ("__MACOSX", ".DS_Store")
TEXT_FILE = "text.txt"  # workers.datasets reads this name
CAPTIONS_FILE = "captions.jsonl"  # and this one
CAPTION_MAX_CHARS = 4000
KINDS = ("images", "captioned_images", "text")
CHUNK_BYTES = 1024 * 1024
DATASET_NAME_MAX = 128  # Dataset.name's length


def _skip_entry(path: PurePosixPath, info: zipfile.ZipInfo) -> bool:
    """What zip tools add on their own is skipped rather than refused."""
    return any(part in IGNORED_PARTS for part in path.parts)


def _check_entry(path: PurePosixPath) -> None:
    """A data set entry is an image inside a class folder, with portable names."""
    name = str(path)
    if len(path.parts) < 2:
        raise InvalidInputError.one("file", f"{name!r} is not inside a class folder")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise InvalidInputError.one(
            "file", f"{name!r} is not an image ({', '.join(IMAGE_SUFFIXES)})"
        )
    for part in path.parts:
        check_name(part, "file")


def _check_captioned_entry(path: PurePosixPath) -> None:
    """An image, its `.txt` caption, or `captions.jsonl` at the root, with portable names."""
    name = str(path)
    if name != CAPTIONS_FILE and path.suffix.lower() not in (*IMAGE_SUFFIXES, ".txt"):
        raise InvalidInputError.one(
            "file", f"{name!r} is not an image, a .txt caption or {CAPTIONS_FILE}"
        )
    for part in path.parts:
        check_name(part, "file")


def _caption(text: Any, where: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise InvalidInputError.one("file", f"{where}: the caption is empty")
    if len(text) > CAPTION_MAX_CHARS or "\x00" in text:
        raise InvalidInputError.one(
            "file", f"{where}: a caption is at most {CAPTION_MAX_CHARS} characters, without NUL"
        )
    return text.strip()


def _read_captions_jsonl(file: Path, images: set[str]) -> dict[str, str]:
    captions: dict[str, str] = {}
    with open(file, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            where = f"{CAPTIONS_FILE} line {number}"
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except ValueError as exc:
                raise InvalidInputError.one("file", f"{where} is not JSON: {exc}") from None
            if not isinstance(row, dict) or not isinstance(row.get("file"), str):
                raise InvalidInputError.one("file", f'{where}: needs {{"file": ..., "text": ...}}')
            if row["file"] not in images:
                raise InvalidInputError.one("file", f"{where}: no image {row['file']!r} in the zip")
            if row["file"] in captions:
                raise InvalidInputError.one("file", f"{where}: {row['file']!r} is captioned twice")
            captions[row["file"]] = _caption(row.get("text"), where)
    return captions


def _unpack_captioned(upload: IO[bytes], folder: Path, settings: Settings) -> dict[str, Any]:
    entries = extract_zip(
        upload, folder, archive_limits(settings), skip=_skip_entry, check=_check_captioned_entry
    )
    images = {str(e.path): e for e in entries if e.path.suffix.lower() in IMAGE_SUFFIXES}
    texts = {str(e.path): e for e in entries if e.path.suffix.lower() == ".txt"}
    if not images:
        raise InvalidInputError.one("file", "no images in the zip")
    for name, entry in images.items():
        _check_image(entry.file, name, settings)
    if CAPTIONS_FILE in {str(e.path) for e in entries}:
        if texts:
            raise InvalidInputError.one(
                "file", f"give captions either in {CAPTIONS_FILE} or as .txt files, not both"
            )
        captions = _read_captions_jsonl(folder / CAPTIONS_FILE, set(images))
    else:
        captions = {}
        for name, entry in texts.items():
            image = [i for i in images if PurePosixPath(i).with_suffix(".txt") == entry.path]
            if not image:
                raise InvalidInputError.one("file", f"{name!r} captions no image in the zip")
            if len(image) > 1:
                raise InvalidInputError.one("file", f"{name!r} would caption {len(image)} images")
            try:
                text = entry.file.read_text("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidInputError.one("file", f"{name!r} is not UTF-8: {exc}") from None
            captions[image[0]] = _caption(text, name)
    missing = sorted(set(images) - set(captions))
    if missing:
        raise InvalidInputError.one(
            "file", f"{len(missing)} images have no caption, e.g. {missing[0]!r}"
        )
    # One file the trainer reads, whatever form the captions came in.
    rows = [json.dumps({"file": f, "text": captions[f]}) for f in sorted(captions)]
    (folder / CAPTIONS_FILE).write_text("\n".join(rows) + "\n")
    for entry in texts.values():
        entry.file.unlink()
    return {"num_items": len(images)}


def _check_image(file: Path, name: str, settings: Settings) -> None:
    from PIL import Image

    try:
        with Image.open(file) as image:
            width, height = image.size  # from the header: nothing decoded yet
            if width * height > settings.dataset_max_pixels:
                raise InvalidInputError.one(
                    "file",
                    f"{name!r} has {width * height} pixels,"
                    f" more than {settings.dataset_max_pixels}",
                )
            image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInputError.one("file", f"{name!r} is not a readable image: {exc}") from exc


def archive_limits(settings: Settings) -> ArchiveLimits:
    return ArchiveLimits(
        max_entries=settings.dataset_max_entries,
        max_entry_bytes=settings.dataset_max_entry_bytes,
        max_total_bytes=settings.dataset_max_unpacked_bytes,
        max_path_chars=settings.dataset_max_path_chars,
    )


def _unpack_images(upload: IO[bytes], folder: Path, settings: Settings) -> dict[str, Any]:
    entries = extract_zip(
        upload, folder, archive_limits(settings), skip=_skip_entry, check=_check_entry
    )
    counts: dict[str, int] = {}
    for entry in entries:
        _check_image(entry.file, str(entry.path), settings)
        counts[entry.path.parts[0]] = counts.get(entry.path.parts[0], 0) + 1
    if not counts:
        raise InvalidInputError.one("file", "no images in class folders")
    return {"classes": dict(sorted(counts.items())), "num_items": len(entries)}


def _store_text(upload: IO[bytes], folder: Path) -> dict[str, Any]:
    """Streams the text to disk, checking UTF-8 and NUL as it goes (never whole in memory)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    chars, blank = 0, True
    with open(folder / TEXT_FILE, "xb") as out:
        while True:
            chunk = upload.read(CHUNK_BYTES)
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                raise InvalidInputError.one("file", f"text must be UTF-8: {exc}") from exc
            if "\x00" in text:  # a model trained on it would write NUL into events
                raise InvalidInputError.one("file", "the text holds NUL characters (U+0000)")
            chars += len(text)
            blank = blank and not text.strip()
            if not chunk:
                break
            out.write(chunk)
    if blank:
        raise InvalidInputError.one("file", "the text is empty")
    return {"chars": chars, "num_items": chars}


def _form_field(name: str) -> str:
    value = request.form.get(name)
    if not value:
        raise InvalidInputError.one(name, "required")
    return value


@bp.post("/datasets")
def upload_dataset() -> tuple[Response, int]:
    state = genq()
    settings = state.settings
    # The upload limit, not the JSON body limit, applies here; Flask answers 413 above it.
    request.max_content_length = settings.dataset_max_bytes
    name = check_name(_form_field("name"), "name")
    if len(name) > DATASET_NAME_MAX:  # (PostgreSQL refuses a longer one: it was a 500)
        raise InvalidInputError.one("name", f"must be at most {DATASET_NAME_MAX} characters")
    kind = _form_field("kind")
    if kind not in KINDS:
        raise InvalidInputError.one("kind", f"must be one of {', '.join(KINDS)}")
    upload = request.files.get("file")
    if upload is None:
        raise InvalidInputError.one("file", "required (multipart/form-data)")
    tenant_id = principal().tenant_id
    with state.database.transaction() as session:
        taken = session.scalar(
            select(Dataset.id).where(Dataset.tenant_id == tenant_id, Dataset.name == name)
        )
    if taken is not None:
        raise ConflictError(f"a data set named {name!r} exists")

    dataset_id = new_id()
    relative = state.artifacts.dataset_dir(dataset_id)
    # Unpacked and checked on this machine first, then stored whole (a rename into a local
    # store; an upload and its manifest to object storage), then recorded.
    tmp = Path(tempfile.mkdtemp(dir=state.artifacts.upload_dir(), prefix=f".{dataset_id}."))
    stored = False
    try:
        if kind == "images":
            meta = _unpack_images(upload.stream, tmp, settings)
        elif kind == "captioned_images":
            meta = _unpack_captioned(upload.stream, tmp, settings)
        else:
            meta = _store_text(upload.stream, tmp)
        manifest = state.artifacts.put_folder(tmp, relative, move=True)
        stored = True
        with state.database.transaction() as session:
            dataset = Dataset(
                id=dataset_id,
                tenant_id=tenant_id,
                name=name,
                kind=kind,
                path=relative,
                size_bytes=manifest.size_bytes,
                num_items=meta.pop("num_items"),
                meta={**meta, "filename": upload.filename or ""},
            )
            session.add(dataset)
            session.flush()
            payload = dataset_payload(dataset)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if stored:
            state.artifacts.delete_prefix(relative)
        raise
    return jsonify(payload), 201
