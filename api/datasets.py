"""`POST /v1/datasets`: upload a data set — a zip of images (one folder per class) or a text
file — for training jobs to name.

The request is `multipart/form-data` with `name`, `kind` (`images` or `text`) and `file`.
Every limit answers before anything is kept: an upload over GENQ_DATASET_MAX_BYTES is 413; a
zip with more entries than GENQ_DATASET_MAX_ENTRIES or more unpacked bytes than
GENQ_DATASET_MAX_UNPACKED_BYTES (counted while unpacking, not trusted from the zip's headers)
is 413; an entry with an absolute path, `..`, a backslash, a drive letter or a symlink, a file
outside a class folder, a file that is not an image, or an image over GENQ_DATASET_MAX_PIXELS
pixels or that does not decode is 422 naming `file` and the entry. Text must be UTF-8. The
upload is unpacked into a temporary folder inside `datasets/` and renamed into place only when
all of it passed, and the row is added in the same request; on any refusal the folder is
removed, so nothing is left behind and nothing lands outside the data set's own folder.
Preprocessing (resize, normalise, tokenise) happens in the training job.
"""

from __future__ import annotations

import io
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import IO, Any

from flask import Blueprint, Response, jsonify, request
from sqlalchemy import select

from api.app import genq
from api.auth import principal
from api.payloads import dataset_payload
from core.artifacts import check_name
from core.errors import ConflictError, InvalidInputError, PayloadTooLargeError
from core.ids import new_id
from core.settings import Settings
from core.tables import Dataset

bp = Blueprint("datasets", __name__, url_prefix="/v1")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
# What zip tools add on their own; skipped rather than refused.
IGNORED_PARTS = ("__MACOSX", ".DS_Store")
TEXT_FILE = "text.txt"  # workers.datasets reads this name
CHUNK_BYTES = 1024 * 1024
DATASET_NAME_MAX = 128  # Dataset.name's length


def _entry_path(info: zipfile.ZipInfo) -> PurePosixPath | None:
    """The entry's relative path, None for one to skip, or 422 for an unsafe one."""
    name = info.filename
    path = PurePosixPath(name)
    unsafe = (
        name.startswith("/")
        or "\\" in name
        or ":" in name
        or any(part in ("..", "") for part in PurePosixPath(name.rstrip("/")).parts)
    )
    if unsafe:
        raise InvalidInputError.one("file", f"unsafe path in the archive: {name!r}")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise InvalidInputError.one("file", f"symlinks are not allowed: {name!r}")
    if any(part in IGNORED_PARTS for part in path.parts) or info.is_dir():
        return None
    if len(path.parts) < 2:
        raise InvalidInputError.one("file", f"{name!r} is not inside a class folder")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise InvalidInputError.one(
            "file", f"{name!r} is not an image ({', '.join(IMAGE_SUFFIXES)})"
        )
    for part in path.parts:
        check_name(part, "file")
    return path


def _check_image(data: bytes, name: str, settings: Settings) -> None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
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


def _unpack_images(upload: IO[bytes], folder: Path, settings: Settings) -> dict[str, Any]:
    try:
        archive = zipfile.ZipFile(upload)
    except zipfile.BadZipFile as exc:
        raise InvalidInputError.one("file", "an images data set is a zip archive") from exc
    with archive:
        entries = archive.infolist()
        if len(entries) > settings.dataset_max_entries:
            raise PayloadTooLargeError(
                f"the archive has {len(entries)} entries, more than {settings.dataset_max_entries}"
            )
        unpacked, counts = 0, dict[str, int]()
        for info in entries:
            path = _entry_path(info)
            if path is None:
                continue
            chunks = []
            with archive.open(info) as source:
                # Count what actually comes out: a zip's declared sizes may lie.
                while chunk := source.read(CHUNK_BYTES):
                    unpacked += len(chunk)
                    if unpacked > settings.dataset_max_unpacked_bytes:
                        raise PayloadTooLargeError(
                            "the archive unpacks to more than "
                            f"{settings.dataset_max_unpacked_bytes} bytes"
                        )
                    chunks.append(chunk)
            data = b"".join(chunks)
            _check_image(data, info.filename, settings)
            target = folder.joinpath(*path.parts)
            if not target.resolve().is_relative_to(folder.resolve()):
                raise InvalidInputError.one("file", f"unsafe path: {info.filename!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            counts[path.parts[0]] = counts.get(path.parts[0], 0) + 1
    if not counts:
        raise InvalidInputError.one("file", "no images in class folders")
    return {"classes": dict(sorted(counts.items())), "num_items": sum(counts.values())}


def _store_text(upload: IO[bytes], folder: Path) -> dict[str, Any]:
    data = upload.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError.one("file", f"text must be UTF-8: {exc}") from exc
    if "\x00" in text:  # a model trained on it would write NUL into events PostgreSQL refuses
        raise InvalidInputError.one("file", "the text holds NUL characters (U+0000)")
    if not text.strip():
        raise InvalidInputError.one("file", "the text is empty")
    (folder / TEXT_FILE).write_bytes(data)
    return {"chars": len(text), "num_items": len(text)}


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
    if kind not in ("images", "text"):
        raise InvalidInputError.one("kind", "must be images or text")
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
