"""The artifact store's contract (core/artifacts.py, core/objectstore.py), on both backends: a
local folder and a real S3-compatible server process (moto_server, tests/conftest.py). Also
the node-local folder cache filled by two processes at once, and a training job's checkpoint
versions (workers/staging.py)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from pathlib import Path

import pytest
import requests
from pydantic import ValidationError

from core.artifactcache import FolderCache
from core.artifacts import MANIFEST_NAME, ArtifactStore
from core.settings import Settings
from workers.staging import CheckpointSync


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return ArtifactStore(tmp_path / "artifacts")
    return ArtifactStore.from_url(str(request.getfixturevalue("s3_url")))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_objects_put_read_list_and_delete(store: ArtifactStore, tmp_path: Path) -> None:
    stored = store.put_bytes("outputs/t/j/a.txt", b"hello")
    assert (stored.path, stored.size_bytes, stored.sha256) == (
        "outputs/t/j/a.txt",
        5,
        sha(b"hello"),
    )
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * 40_000)  # 10 MB: a multipart upload on S3
    from_file = store.put_file("outputs/t/j/big.bin", big)
    assert from_file.size_bytes == big.stat().st_size and from_file.sha256 == sha(big.read_bytes())
    with store.open("outputs/t/j/a.txt") as f:
        assert f.read() == b"hello"
    with store.open_range("outputs/t/j/big.bin", 256, 511) as f:
        assert f.read(256) == bytes(range(256))
    assert store.size("outputs/t/j/big.bin") == big.stat().st_size
    assert store.size("outputs/t/j/none") is None
    store.put_bytes("outputs/t/other/b.txt", b"b")
    assert dict(store.list("outputs/t/j")) == {
        "outputs/t/j/a.txt": 5,
        "outputs/t/j/big.bin": big.stat().st_size,
    }
    assert list(store.list("outputs/nothing")) == []
    # Overwriting replaces whole.
    store.put_bytes("outputs/t/j/a.txt", b"second")
    with store.open("outputs/t/j/a.txt") as f:
        assert f.read() == b"second"
    store.delete("outputs/t/j/a.txt")
    store.delete("outputs/t/j/a.txt")  # a missing one is no error
    with pytest.raises(FileNotFoundError):
        store.open("outputs/t/j/a.txt")
    store.delete_prefix("outputs/t")
    assert list(store.list("outputs")) == []


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a", "a/.."])
def test_keys_that_could_escape_are_refused(store: ArtifactStore, key: str) -> None:
    with pytest.raises(ValueError):
        store.put_bytes(key, b"x")


def test_presigned_url_on_s3_and_local_path_on_a_folder(store: ArtifactStore) -> None:
    store.put_bytes("outputs/t/j/p.png", b"\x89PNG-ish")
    url = store.presigned_url("outputs/t/j/p.png", 60, filename="p.png", content_type="image/png")
    if store.is_local:
        assert url is None
        assert store.local_path("outputs/t/j/p.png") == store.root / "outputs/t/j/p.png"
    else:
        assert url is not None and "Signature" in url and "Expires=" in url
        response = requests.get(url, timeout=10)
        assert response.status_code == 200 and response.content == b"\x89PNG-ish"
        assert response.headers["Content-Type"] == "image/png"
        assert store.local_path("outputs/t/j/p.png") is None
        # The signature covers the key: another key with it is refused.
        forged = url.replace("p.png?", "q.png?", 1)
        assert requests.get(forged, timeout=10).status_code == 403


def make_folder(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"family": "x"}')
    (root / "sub" / "weights.bin").write_bytes(b"\x00\x01" * 5000)
    return root


def test_a_folder_is_stored_with_its_manifest_and_fetched_checked(
    store: ArtifactStore, tmp_path: Path
) -> None:
    source = make_folder(tmp_path / "model")
    manifest = store.put_folder(source, "models/j1")
    assert set(manifest.files) == {"config.json", "sub/weights.bin"}
    weights = manifest.files["sub/weights.bin"]
    assert weights.size_bytes == 10_000 and weights.sha256 == sha(b"\x00\x01" * 5000)
    assert store.read_manifest("models/j1") == manifest
    assert store.read_manifest("models/none") is None

    dest = tmp_path / "fetched"
    store.fetch_folder("models/j1", dest)
    assert (dest / "sub" / "weights.bin").read_bytes() == b"\x00\x01" * 5000
    assert json.loads((dest / MANIFEST_NAME).read_text())["files"]["config.json"]["sha256"]

    # A stored file that no longer matches its manifest is refused, not used.
    store.put_bytes("models/j1/sub/weights.bin", b"tampered")
    with pytest.raises(OSError, match="does not match"):
        store.fetch_folder("models/j1", tmp_path / "again")


def _fill(args: tuple[str, str, str]) -> str:
    url, cache_root, prefix = args
    folder = FolderCache(Path(cache_root)).folder(ArtifactStore.from_url(url), prefix)
    return (folder / "sub" / "weights.bin").read_bytes().hex()[:16]


def test_the_node_cache_is_filled_once_by_processes_racing_for_it(
    s3_url: str, tmp_path: Path
) -> None:
    store = ArtifactStore.from_url(s3_url)
    store.put_folder(make_folder(tmp_path / "model"), "models/j2")
    cache_root = tmp_path / "cache"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.map(_fill, [(s3_url, str(cache_root), "models/j2")] * 4)
    assert len(set(results)) == 1
    cache = FolderCache(cache_root)
    copy = cache.path_of(store, "models/j2")
    assert sorted(p.name for p in copy.parent.iterdir()) == ["j2"]  # no half-made siblings
    # Served from the cache while the store's manifest is unchanged: the cached file stays
    # the same file (not downloaded again).
    inode = (copy / "sub" / "weights.bin").stat().st_ino
    assert cache.folder(store, "models/j2") == copy
    assert (copy / "sub" / "weights.bin").stat().st_ino == inode
    # A local store is its own cache: nothing is copied.
    local = ArtifactStore(tmp_path / "local")
    local.put_folder(make_folder(tmp_path / "m2"), "models/j3")
    assert cache.folder(local, "models/j3") == local.root / "models/j3"


def test_checkpoints_go_up_as_versions_and_come_back_on_another_machine(
    s3_url: str, tmp_path: Path
) -> None:
    store = ArtifactStore.from_url(s3_url)
    first = CheckpointSync(store, "checkpoints/j9", tmp_path / "node-a")
    assert first.pull() is None  # nothing stored yet
    (first.local_dir / "checkpoint.safetensors").write_bytes(b"step-5")
    assert first.push_if_changed() is not None
    assert first.push_if_changed() is None  # unchanged: no upload
    (first.local_dir / "checkpoint.safetensors").write_bytes(b"step-10!")
    manifest = first.push_if_changed()
    assert manifest is not None and manifest.version == 2
    keys = [key for key, _ in store.list("checkpoints/j9")]
    # The older version is gone once the new one is current.
    assert sorted(keys) == [
        "checkpoints/j9/genq-manifest.json",
        "checkpoints/j9/v2/checkpoint.safetensors",
    ]

    other = CheckpointSync(store, "checkpoints/j9", tmp_path / "node-b")
    (tmp_path / "node-b").mkdir()
    (tmp_path / "node-b" / "stale.bin").write_bytes(b"left over")
    pulled = other.pull()
    assert pulled is not None and pulled.version == 2
    assert sorted(p.name for p in other.local_dir.iterdir()) == ["checkpoint.safetensors"]
    assert (other.local_dir / "checkpoint.safetensors").read_bytes() == b"step-10!"


@pytest.mark.parametrize("url", ["http://bucket/x", "s3://", "s3://UPPER/x", "bucket/prefix"])
def test_an_artifact_url_that_is_not_s3_is_refused_at_start(url: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(_env_file=None, artifact_url=url)  # type: ignore[call-arg]
    assert refused.value.errors()[0]["loc"] == ("artifact_url",)


def test_settings_default_to_the_local_folder(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, var_dir=tmp_path)  # type: ignore[call-arg]
    store = ArtifactStore.from_settings(settings)
    assert store.is_local and store.root == (tmp_path / "artifacts").resolve()
    assert settings.cache_path == (tmp_path / "cache").resolve()
    s3 = Settings(_env_file=None, var_dir=tmp_path, artifact_url="s3://my-bucket/genq/")  # type: ignore[call-arg]
    assert ArtifactStore.from_settings(s3).url == "s3://my-bucket/genq"
