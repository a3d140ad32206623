"""The artifact store: job outputs, checkpoints, trained models, LoRA adapters and uploaded data
sets, in a folder on this machine (the default, GENQ_ARTIFACT_ROOT) or in S3-compatible object
storage (GENQ_ARTIFACT_URL=s3://bucket/prefix), through one interface.

    store = ArtifactStore.from_settings(settings)       # or ArtifactStore.from_url(store.url)
    store.url                                           # pass this to actors on other nodes
    store.put_bytes(key, data) / store.put_file(key, path)   -> StoredFile(path, size, sha256)
    store.open(key)                                     # a stream; FileNotFoundError if none
    store.open_range(key, start, end)                   # a stream from byte `start`
    store.size(key), store.delete(key), store.delete_prefix(prefix), store.list(prefix)
    store.presigned_url(key, expires_s, filename=, content_type=)  # S3: a GET URL; local: None
    store.local_path(key)                               # local: the file; S3: None
    store.put_folder(local_dir, prefix, move=False)     -> Manifest (files with size, sha256)
    store.read_manifest(prefix)                         -> Manifest | None
    store.fetch_folder(prefix, dest, manifest)          # download and check every file
    FolderCache(root).folder(store, prefix) -> Path     # (core/artifactcache.py) a node-local
                                                        # copy, or the folder itself when local
    FolderCache(root).model_folder(store, model_path)   # Model.path: key, s3:// URL or abs path
    Staging.for_url(url) (workers/staging.py)           # the actors' side: cache, checkpoints

Trainers and model servers get `store.url` (ServingOptions.artifact_url, the trainer ctx's
`artifact_url`), never a path on the caller's disk; each machine brings its own AWS_* settings
and GENQ_CACHE_DIR.

Keys (relative POSIX paths) are laid out by the methods below:
`outputs/<tenant>/<job>/<attempt's lease token>/<name>`,
`checkpoints/<job>/...`, `models/<job>/...`, `datasets/<id>/...`, `files/<tenant>/<id>.jsonl`
(OpenAI batch input files). Files are addressed by ids
from SQL, never by a client-given path. A reader never sees half an object: the local backend
writes a temporary file and renames it; an S3 PUT is atomic. A folder is complete once its
manifest (`genq-manifest.json`, written last) is there: it lists each file's size and SHA-256,
which fetch_folder checks. Outputs' size and SHA-256 are in the `artifact` table.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from core.errors import InvalidInputError
from core.objectstore import (
    LocalStore,
    ObjectStore,
    StoredFile,
    check_key,
    file_digest,
    is_temporary,
    open_store,
    write_atomic,
)

if TYPE_CHECKING:
    from core.settings import Settings

__all__ = ["ArtifactStore", "Manifest", "StoredFile", "check_name", "write_atomic"]

# A name that is also one safe path component (no "..", no separators); in the OpenAPI document.
NAME_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,254}$"
_SAFE_NAME = re.compile(NAME_PATTERN)
MANIFEST_NAME = "genq-manifest.json"
MANIFEST_FORMAT = "genq-manifest/1"


def check_name(name: str, field: str = "name") -> str:
    """A single path component made of safe characters, or InvalidInputError."""
    if not _SAFE_NAME.fullmatch(name):  # (match would let a trailing newline through)
        raise InvalidInputError.one(field, "must be 1-255 letters, digits, '.', '_' or '-'")
    return name


@dataclass
class Manifest:
    """A stored folder: each file (by its path inside the folder) with the key it is stored
    under relative to the folder (so that the folder reads the same from a store rooted
    elsewhere, e.g. `s3://bucket/folder` registered as a model), its size and SHA-256.
    `version` counts the saves of a folder that changes (a training job's checkpoints); an
    empty sha256 means not known (a folder put in the bucket by hand, listed rather than
    read)."""

    files: dict[str, StoredFile] = field(default_factory=dict)
    version: int = 0

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files.values())

    def to_json(self) -> str:
        files = {
            name: {"key": f.path, "size_bytes": f.size_bytes, "sha256": f.sha256}
            for name, f in sorted(self.files.items())
        }
        body = {"format": MANIFEST_FORMAT, "version": self.version, "files": files}
        return json.dumps(body, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        body = json.loads(text)
        if body.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"not a {MANIFEST_FORMAT} manifest")
        files = {
            name: StoredFile(f["key"], int(f["size_bytes"]), str(f["sha256"]))
            for name, f in body["files"].items()
        }
        return cls(files, int(body.get("version", 0)))


def folder_files(folder: Path) -> Iterator[tuple[str, Path]]:
    """(path inside the folder, file) for every file of a local folder, in a stable order,
    without the manifest and without writes in progress."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not is_temporary(d))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            relative = path.relative_to(folder).as_posix()
            if relative != MANIFEST_NAME and not is_temporary(name):
                yield relative, path


class ArtifactStore:
    def __init__(self, backend: ObjectStore | Path) -> None:
        # A Path: a local store in that folder (what tests and benchmarks build).
        self.backend = LocalStore(backend) if isinstance(backend, Path) else backend

    @classmethod
    def from_settings(cls, settings: Settings) -> ArtifactStore:
        if settings.artifact_url:
            return cls(open_store(settings.artifact_url))
        return cls(LocalStore(settings.artifacts))

    @classmethod
    def from_url(cls, url: str) -> ArtifactStore:
        return cls(open_store(url))

    @property
    def url(self) -> str:
        return self.backend.url

    @property
    def is_local(self) -> bool:
        return isinstance(self.backend, LocalStore)

    @property
    def root(self) -> Path:
        """The local folder of a local store (ValueError for object storage)."""
        if not isinstance(self.backend, LocalStore):
            raise ValueError("the artifact store is not a local folder")
        return self.backend.root

    def resolve(self, relative: str) -> Path:
        """The absolute path of a stored relative path in a local store; refuses anything
        outside the root."""
        if not isinstance(self.backend, LocalStore):
            raise ValueError("the artifact store is not a local folder")
        return self.backend.path(relative)

    # -- objects -----------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes) -> StoredFile:
        return self.backend.put_bytes(key, data)

    def put_file(self, key: str, source: Path) -> StoredFile:
        return self.backend.put_file(key, source)

    def open(self, key: str) -> BinaryIO:
        return self.backend.open(key)

    def open_range(self, key: str, start: int, end: int) -> BinaryIO:
        return self.backend.open_range(key, start, end)

    def size(self, key: str) -> int | None:
        return self.backend.size(key)

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        return self.backend.list(prefix)

    def delete(self, key: str) -> None:
        self.backend.delete(key)

    def delete_prefix(self, prefix: str) -> None:
        self.backend.delete_prefix(prefix)

    def presigned_url(
        self, key: str, expires_s: int, *, filename: str | None = None, content_type: str = ""
    ) -> str | None:
        return self.backend.presigned_url(
            key, expires_s, filename=filename, content_type=content_type
        )

    def local_path(self, key: str) -> Path | None:
        return self.backend.local_path(key)

    # -- folders -----------------------------------------------------------------------------

    def put_folder(self, source: Path, prefix: str, *, move: bool = False) -> Manifest:
        """Store every file of a local folder under `prefix`, then its manifest (last: a
        folder without one is incomplete). `move`: `source` is not needed afterwards (a local
        store renames it into place rather than copying). Files of an earlier save that the
        new one lacks are removed."""
        check_key(prefix)
        source = source.resolve()
        target = self.local_path(prefix)
        manifest = Manifest()
        if target is not None and (source == target or move):
            for relative, path in folder_files(source):
                manifest.files[relative] = StoredFile(relative, *file_digest(path))
            write_atomic(source / MANIFEST_NAME, manifest.to_json().encode())
            if source != target:
                _swap_into_place(source, target)
            return manifest
        if target is not None:  # a copy into a local store: build it beside, then swap
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
            shutil.copytree(source, tmp, dirs_exist_ok=True)
            return self.put_folder(tmp, prefix, move=True)
        old = self.read_manifest(prefix)
        for relative, path in folder_files(source):
            stored = self.put_file(f"{prefix}/{relative}", path)
            manifest.files[relative] = StoredFile(relative, stored.size_bytes, stored.sha256)
        self.put_bytes(f"{prefix}/{MANIFEST_NAME}", manifest.to_json().encode())
        if old is not None:
            for stale in set(old.files) - set(manifest.files):
                self.delete(f"{prefix}/{old.files[stale].path}")
        if move:
            shutil.rmtree(source, ignore_errors=True)
        return manifest

    def read_manifest(self, prefix: str) -> Manifest | None:
        try:
            with self.open(f"{check_key(prefix)}/{MANIFEST_NAME}") as f:
                return Manifest.from_json(f.read())
        except FileNotFoundError:
            return None

    def scan_folder(self, prefix: str) -> Manifest:
        """A manifest listed from the store, for a folder stored without one (sizes only)."""
        files = {
            key[len(prefix) + 1 :]: StoredFile(key[len(prefix) + 1 :], size, "")
            for key, size in self.list(prefix)
            if not is_temporary(key.rsplit("/", 1)[-1])
        }
        return Manifest(files)

    def fetch_folder(self, prefix: str, dest: Path, manifest: Manifest | None = None) -> Manifest:
        """Download a stored folder into `dest` (which should be new and empty), checking each
        file's size and SHA-256 against the manifest; writes the manifest there too (with the
        SHA-256 of files the store did not know). OSError when a file does not match."""
        if manifest is None:
            manifest = self.read_manifest(prefix) or self.scan_folder(prefix)
        if not manifest.files:
            raise FileNotFoundError(f"nothing stored under {prefix}/ in {self.url}")
        checked = Manifest(version=manifest.version)
        for relative, stored in manifest.files.items():
            path = dest / check_key(relative)
            self.backend.get_file(f"{prefix}/{check_key(stored.path)}", path)
            size, sha256 = file_digest(path)
            if size != stored.size_bytes or (stored.sha256 and sha256 != stored.sha256):
                raise OSError(f"{prefix}/{stored.path} in {self.url} does not match its manifest")
            checked.files[relative] = StoredFile(stored.path, size, sha256)
        write_atomic(dest / MANIFEST_NAME, checked.to_json().encode())
        return checked

    # -- where genq keeps what ---------------------------------------------------------------

    def output_path(self, tenant_id: str, job_id: str, name: str, attempt: str = "") -> str:
        """Where an output is stored: under the attempt that wrote it (its lease token), so
        that two attempts of a job never write the same file; the job's outputs are the files
        its artifact rows name, recorded by a fenced write (core/recording.py:record_output)."""
        folder = f"outputs/{tenant_id}/{job_id}"
        if attempt:
            folder = f"{folder}/{check_name(attempt, 'attempt')}"
        return f"{folder}/{check_name(name)}"

    def write_output(
        self, tenant_id: str, job_id: str, name: str, data: bytes, attempt: str = ""
    ) -> StoredFile:
        return self.put_bytes(self.output_path(tenant_id, job_id, name, attempt), data)

    def checkpoint_prefix(self, job_id: str) -> str:
        """Where a training job keeps its checkpoints; stable across attempts so it resumes."""
        return f"checkpoints/{job_id}"

    def model_dir(self, job_id: str) -> str:
        """The folder (key prefix) that a training job saves its final model into."""
        return f"models/{job_id}"

    def dataset_dir(self, dataset_id: str) -> str:
        return f"datasets/{dataset_id}"

    def upload_dir(self) -> Path:
        """A local folder to build an upload in before it is stored: beside the data sets in
        a local store (so that storing it is a rename), a temporary folder otherwise."""
        local = self.local_path("datasets")
        folder = local if local is not None else Path(tempfile.gettempdir()) / "genq-uploads"
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def _swap_into_place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        trash = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(trash)
        source.rename(target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        source.rename(target)


def split_model_url(url: str) -> tuple[str, str]:
    """`s3://bucket/a/b/model` -> (`s3://bucket/a/b`, `model`): a folder registered by its
    object-storage URL, as a store and the folder's key in it."""
    head, _, last = url.rstrip("/").rpartition("/")
    if not last or head in ("s3:", "s3:/") or not head.startswith("s3://"):
        raise ValueError(f"not an s3://bucket/folder URL: {url!r}")
    return head, last
