"""Files in and out of the actors: a trainer or model server runs on any machine of the
cluster and shares no disk with the Celery worker that started it, so everything it reads or
writes goes through the artifact store (core/artifacts.py), whose URL the caller passes in
(ServingOptions.artifact_url, the trainer ctx's `artifact_url`). Credentials for object storage
come from the machine's own AWS_* environment; the cache folder from its own GENQ_CACHE_DIR.

- A model server or trainer gets a model folder (`model_folder`) and a data set
  (`folder`) as copies in this machine's cache (core/artifactcache.py).
- A trainer works in `<cache>/work/<job id>/`: before it starts, `CheckpointSync.pull`
  downloads the job's latest checkpoint from the store (deleting any local leftover: the store
  is the truth), and after each event it yields, `push_if_changed` uploads the checkpoint files
  that changed. Each upload is a new version under `checkpoints/<job>/v<N>/`, made current by
  the manifest written after it, so a trainer killed during an upload resumes from the
  previous whole checkpoint. The final model is uploaded (with its manifest) before its
  ModelSaved event goes on to the caller, so a registered model is always in the store.

With a local store (one machine) every folder is the stored one itself and nothing is copied.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from core.artifactcache import FolderCache
from core.artifacts import MANIFEST_NAME, ArtifactStore, Manifest, StoredFile, folder_files
from core.errors import ModelError, TransientError
from core.settings import Settings

log = logging.getLogger(__name__)

_caches: dict[str, Staging] = {}
_current: list[Staging] = []  # the store this actor process was handed last


@contextlib.contextmanager
def store_errors() -> Iterator[None]:
    """The store's failures as job errors: a missing object is the model's (or data set's)
    fault; anything else (the network, the endpoint, a checksum) is worth another attempt."""
    try:
        yield
    except FileNotFoundError as exc:
        raise ModelError(f"not in the artifact store: {exc}") from None
    except Exception as exc:
        if type(exc).__module__.startswith(("botocore", "boto3", "urllib3")) or isinstance(
            exc, OSError
        ):
            raise TransientError(f"artifact store: {type(exc).__name__}: {exc}") from None
        raise


class Staging:
    """One artifact store as seen from this machine: its cache, its work folders."""

    def __init__(self, store: ArtifactStore, cache: FolderCache) -> None:
        self.store = store
        self.cache = cache

    @classmethod
    def for_url(cls, url: str, cache_dir: Path | None = None) -> Staging:
        """The staging of a store URL in this process (one per URL, reused)."""
        key = f"{url}|{cache_dir}"
        if key not in _caches:
            root = cache_dir or Settings().cache_path  # this machine's own setting
            _caches[key] = cls(ArtifactStore.from_url(url), FolderCache(root))
        _current[:] = [_caches[key]]
        return _caches[key]

    def folder(self, prefix: str) -> Path:
        return self.cache.folder(self.store, prefix)

    def model_folder(self, path: str) -> Path:
        return self.cache.model_folder(self.store, path)

    def work_dir(self, job_id: str) -> Path:
        """A training job's local folder: the stored checkpoints folder itself on a local store,
        else a folder in this machine's cache."""
        return self.cache.root / "work" / job_id

    def checkpoints(self, job_id: str) -> CheckpointSync:
        prefix = self.store.checkpoint_prefix(job_id)
        local = self.store.local_path(prefix)
        return CheckpointSync(self.store, prefix, local or self.work_dir(job_id) / "checkpoints")

    def model_dir(self, job_id: str) -> Path:
        """Where a trainer saves its model before `put_model` stores it."""
        local = self.store.local_path(self.store.model_dir(job_id))
        return local or self.work_dir(job_id) / "model"

    def put_model(self, local_dir: Path, prefix: str) -> Manifest:
        """Store a saved model folder (a local store writes its manifest in place)."""
        return self.store.put_folder(local_dir, prefix)

    def clean(self, job_id: str) -> None:
        """Forget a job's work folder (its checkpoints and model are in the store)."""
        if not self.store.is_local:
            shutil.rmtree(self.work_dir(job_id), ignore_errors=True)


def local_model_folder(path: str) -> Path:
    """A model folder named by a Model.path (a LoRA adapter's base_path), on this machine:
    an absolute path as it is, a store key or an s3:// URL through this process's store."""
    if Path(path).is_absolute():
        return Path(path)
    if not _current:
        raise ModelError(f"{path} is in the artifact store, and no store was given")
    with store_errors():
        return _current[0].model_folder(path)


class CheckpointSync:
    """A training job's checkpoint folder on this machine, kept in step with the store."""

    def __init__(self, store: ArtifactStore, prefix: str, local_dir: Path) -> None:
        self.store = store
        self.prefix = prefix
        self.local_dir = local_dir
        self.is_remote = store.local_path(prefix) is None
        self.manifest = Manifest()
        self._seen: dict[str, tuple[int, int, int]] = {}

    def pull(self) -> Manifest | None:
        """Replace the local folder with the store's latest checkpoint; None if there is
        none. (On a local store the folder is the stored one: nothing to do.)"""
        if not self.is_remote:
            self.local_dir.mkdir(parents=True, exist_ok=True)
            return None
        shutil.rmtree(self.local_dir, ignore_errors=True)
        self.local_dir.mkdir(parents=True)
        manifest = self.store.read_manifest(self.prefix)
        if manifest is None or not manifest.files:
            return None
        self.manifest = self.store.fetch_folder(self.prefix, self.local_dir, manifest)
        (self.local_dir / MANIFEST_NAME).unlink()  # ours, not the family's
        self._seen = {name: self._signature(self.local_dir / name) for name in manifest.files}
        return self.manifest

    @staticmethod
    def _signature(path: Path) -> tuple[int, int, int]:
        stat = path.stat()
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def push_if_changed(self) -> Manifest | None:
        """Upload the checkpoint files written since the last push, as a new version; the
        new manifest, or None when nothing changed."""
        if not self.is_remote or not self.local_dir.is_dir():
            return None
        current = {name: path for name, path in folder_files(self.local_dir)}
        signatures = {name: self._signature(path) for name, path in current.items()}
        if signatures == self._seen:
            return None
        version = self.manifest.version + 1
        manifest = Manifest(version=version)
        for name, path in current.items():
            stored = self.store.put_file(f"{self.prefix}/v{version}/{name}", path)
            manifest.files[name] = StoredFile(
                f"v{version}/{name}", stored.size_bytes, stored.sha256
            )
        self.store.put_bytes(f"{self.prefix}/{MANIFEST_NAME}", manifest.to_json().encode())
        old, self.manifest, self._seen = self.manifest, manifest, signatures
        for stored in old.files.values():  # the previous version is no longer current
            self.store.delete(f"{self.prefix}/{stored.path}")
        log.info("checkpoint v%d stored (%d bytes)", version, manifest.size_bytes)
        return manifest
