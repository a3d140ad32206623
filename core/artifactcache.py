"""A machine's own copies of stored folders (models, data sets, pretrained folders): a trainer
or a model server on a GPU machine downloads what it needs from object storage into this cache
before it loads, because no two machines share a disk.

The cache lives under GENQ_CACHE_DIR (default `$GENQ_VAR_DIR/cache`), one folder per store
and key: `<root>/objects/<store digest>/<key>`. Two processes that want the same folder at once
(two actors of one node) take a lock file in turn: the first downloads into a temporary sibling
and renames it into place, the second finds it complete. A cached folder is reused while the
store's manifest of it is unchanged (trained models never change; a pretrained folder put in
the bucket by hand is compared by its listing). With a local store there is nothing to copy:
`folder` returns the stored folder itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from core.artifacts import ArtifactStore, Manifest, StoredFile, split_model_url

log = logging.getLogger(__name__)

# The manifest a cached folder was downloaded from (not part of the folder's own files).
SOURCE_NAME = ".genq-source.json"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between the processes of this machine (released if one dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _comparable(manifest: Manifest) -> str:
    """What must match for a cached copy to be current: names, sizes, known SHA-256s."""
    return Manifest(
        {n: StoredFile("", f.size_bytes, f.sha256) for n, f in manifest.files.items()},
        manifest.version,
    ).to_json()


class FolderCache:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def path_of(self, store: ArtifactStore, prefix: str) -> Path:
        """Where the copy of `prefix` of `store` lives (whether or not it is there yet)."""
        return self.root / "objects" / _digest(store.url) / prefix

    def folder(self, store: ArtifactStore, prefix: str) -> Path:
        """A local folder holding what `store` has under `prefix`: the stored folder itself
        for a local store, else a checked copy in this cache (downloaded if missing or
        outdated). FileNotFoundError when nothing is stored there."""
        local = store.local_path(prefix)
        if local is not None:
            if not local.is_dir():
                raise FileNotFoundError(f"no folder {local}")
            return local
        dest = self.path_of(store, prefix)
        with file_lock(self.root / "locks" / f"{_digest(store.url + '/' + prefix)}.lock"):
            manifest = store.read_manifest(prefix) or store.scan_folder(prefix)
            wanted = _comparable(manifest)
            source = dest / SOURCE_NAME
            if source.is_file() and source.read_text() == wanted:
                return dest
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
            try:
                store.fetch_folder(prefix, tmp, manifest)
                (tmp / SOURCE_NAME).write_text(wanted)
                if dest.exists():
                    shutil.rmtree(dest)
                tmp.rename(dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            log.info("cached %s/%s (%d bytes)", store.url, prefix, manifest.size_bytes)
        return dest

    def model_folder(self, store: ArtifactStore, path: str) -> Path:
        """A registered model's folder on this machine. `path` is what Model.path holds: a
        key in the artifact store (trained models), an `s3://bucket/folder` URL (a pretrained
        folder in object storage), or an absolute local path (a pretrained folder on this
        machine, which every machine that serves it must have)."""
        if path.startswith("s3://"):
            url, prefix = split_model_url(path)
            return self.folder(ArtifactStore.from_url(url), prefix)
        if Path(path).is_absolute():
            return Path(path)
        return self.folder(store, path)
