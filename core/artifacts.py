"""The artifact store: job outputs, checkpoints, trained models and uploaded data sets under one
root folder (local disk, or a shared mount on a cluster).

Files are addressed by ids from SQL, never by a client-given path; every write goes to a
temporary file first and is renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from core.errors import InvalidInputError

# A name that is also one safe path component (no "..", no separators); in the OpenAPI document.
NAME_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,254}$"
_SAFE_NAME = re.compile(NAME_PATTERN)


def check_name(name: str, field: str = "name") -> str:
    """A single path component made of safe characters, or InvalidInputError."""
    if not _SAFE_NAME.fullmatch(name):  # (match would let a trailing newline through)
        raise InvalidInputError.one(field, "must be 1-255 letters, digits, '.', '_' or '-'")
    return name


@dataclass(frozen=True)
class StoredFile:
    path: str  # relative to the root
    size_bytes: int
    sha256: str


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def resolve(self, relative: str) -> Path:
        """The absolute path of a stored relative path; refuses anything outside the root."""
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"path escapes the artifact root: {relative!r}")
        return path

    def model_folder(self, path: str) -> Path:
        """A registered model's folder: an absolute path is a pretrained folder an admin
        registered where it lies (POST /v1/models); a relative one is under the root."""
        if Path(path).is_absolute():
            return Path(path)
        return self.resolve(path)

    def output_path(self, tenant_id: str, job_id: str, name: str) -> str:
        return f"outputs/{tenant_id}/{job_id}/{check_name(name)}"

    def write_output(self, tenant_id: str, job_id: str, name: str, data: bytes) -> StoredFile:
        relative = self.output_path(tenant_id, job_id, name)
        write_atomic(self.resolve(relative), data)
        return StoredFile(relative, len(data), hashlib.sha256(data).hexdigest())

    def checkpoint_dir(self, job_id: str) -> Path:
        """Where a training job keeps its checkpoints; stable across attempts so it resumes."""
        return self.resolve(f"checkpoints/{job_id}")

    def model_dir(self, job_id: str) -> str:
        """Relative folder that a training job saves its final model into."""
        return f"models/{job_id}"

    def dataset_dir(self, dataset_id: str) -> str:
        return f"datasets/{dataset_id}"
