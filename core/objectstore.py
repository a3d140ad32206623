"""The two backends of the artifact store: a folder on this machine, and a bucket in
S3-compatible object storage (AWS S3, MinIO, Ceph, ...). core/artifacts.py lays genq's files
out on top of them; nothing else talks to a backend directly.

Both keep the same contract, which tests/core/test_objectstore.py checks on each:

- a key is a relative POSIX path (`outputs/t1/j1/image-0.png`) without `..`, `.` or empty parts;
- `put_bytes` / `put_file` store an object whole, and return its size and SHA-256; a reader
  never sees half of one (local: a temporary file and a rename; S3: a PUT, or a multipart
  upload, becomes visible only when complete);
- `open` is a stream (read it in chunks, close it), FileNotFoundError when there is no object;
- `list(prefix)` yields `(key, size_bytes)` of every object under a folder-like prefix;
- `delete` / `delete_prefix` remove objects (a missing one is no error);
- `presigned_url` is a short-lived GET URL for S3, None for a local folder (which is served by
  the API itself), and `local_path` the other way round.

The S3 backend reads its endpoint, region and credentials the way every AWS tool does
(AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, a profile or
an instance role), so each machine brings its own. boto3 is imported only when one is opened.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class StoredFile:
    path: str  # the key, relative to the store's root
    size_bytes: int
    sha256: str


def check_key(key: str) -> str:
    """`key` if it is a safe relative POSIX path; ValueError otherwise."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"not a store key: {key!r}")
    return key


def file_digest(path: Path) -> tuple[int, str]:
    """(size, SHA-256 hex) of a local file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


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


def copy_atomic(source: Path, path: Path) -> None:
    """Copy a file to `path` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_temporary(name: str) -> bool:
    """A write in progress (write_atomic's temporary file, a folder being swapped in)."""
    return name.startswith(".")


class ObjectStore:
    """The interface both backends implement (see the module docstring)."""

    url: str

    def put_bytes(self, key: str, data: bytes) -> StoredFile:
        raise NotImplementedError

    def put_file(self, key: str, source: Path) -> StoredFile:
        raise NotImplementedError

    def open(self, key: str) -> BinaryIO:
        raise NotImplementedError

    def open_range(self, key: str, start: int, end: int) -> BinaryIO:
        """A stream of the object from byte `start`; at least up to byte `end` (inclusive),
        maybe further: the caller reads no more than it asked for."""
        raise NotImplementedError

    def get_file(self, key: str, dest: Path) -> None:
        """Download one object to `dest` (atomically: a temporary file, then a rename)."""
        raise NotImplementedError

    def size(self, key: str) -> int | None:
        """The object's size, None when there is none."""
        raise NotImplementedError

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> None:
        for key, _ in list(self.list(prefix)):
            self.delete(key)

    def presigned_url(
        self, key: str, expires_s: int, *, filename: str | None = None, content_type: str = ""
    ) -> str | None:
        return None

    def local_path(self, key: str) -> Path | None:
        return None


class LocalStore(ObjectStore):
    """Objects as files under one folder of this machine."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.url = self.root.as_uri()

    def path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"path escapes the artifact root: {key!r}")
        return path

    def put_bytes(self, key: str, data: bytes) -> StoredFile:
        write_atomic(self.path(key), data)
        return StoredFile(key, len(data), hashlib.sha256(data).hexdigest())

    def put_file(self, key: str, source: Path) -> StoredFile:
        path = self.path(key)
        if path != source.resolve():
            copy_atomic(source, path)
        return StoredFile(key, *file_digest(path))

    def open(self, key: str) -> BinaryIO:
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(key)
        return open(path, "rb")

    def open_range(self, key: str, start: int, end: int) -> BinaryIO:
        f = self.open(key)
        f.seek(start)
        return f

    def get_file(self, key: str, dest: Path) -> None:
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(key)
        copy_atomic(path, dest)

    def size(self, key: str) -> int | None:
        path = self.path(key)
        return path.stat().st_size if path.is_file() else None

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        folder = self.path(prefix.rstrip("/"))
        if not folder.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not is_temporary(d))
            for name in sorted(filenames):
                if is_temporary(name):
                    continue
                path = Path(dirpath) / name
                yield path.relative_to(self.root).as_posix(), path.stat().st_size

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.path(prefix.rstrip("/")), ignore_errors=True)

    def local_path(self, key: str) -> Path:
        return self.path(key)


class S3Store(ObjectStore):
    """Objects in one bucket under an optional prefix: `s3://bucket/prefix`."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"not an s3://bucket/prefix URL: {url!r}")
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        with self._lock:  # one client per store; boto3 clients are thread-safe once made
            if self._client is None:
                import boto3
                from botocore.config import Config

                self._client = boto3.client(
                    "s3", config=Config(retries={"max_attempts": 5, "mode": "standard"})
                )
            return self._client

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_bytes(self, key: str, data: bytes) -> StoredFile:
        sha256 = hashlib.sha256(data).hexdigest()
        self.client.put_object(
            Bucket=self.bucket, Key=self._key(key), Body=data, Metadata={"sha256": sha256}
        )
        return StoredFile(key, len(data), sha256)

    def put_file(self, key: str, source: Path) -> StoredFile:
        size, sha256 = file_digest(source)
        # upload_file switches to a multipart upload for big files; either way the object
        # appears only once it is complete.
        self.client.upload_file(
            str(source), self.bucket, self._key(key), ExtraArgs={"Metadata": {"sha256": sha256}}
        )
        return StoredFile(key, size, sha256)

    def open(self, key: str) -> BinaryIO:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(key) from None
        return response["Body"]  # type: ignore[no-any-return]

    def open_range(self, key: str, start: int, end: int) -> BinaryIO:
        try:
            response = self.client.get_object(
                Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{end}"
            )
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(key) from None
        return response["Body"]  # type: ignore[no-any-return]

    def get_file(self, key: str, dest: Path) -> None:
        from botocore.exceptions import ClientError

        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        os.close(fd)
        try:
            self.client.download_file(self.bucket, self._key(key), tmp)
            os.replace(tmp, dest)
        except ClientError as exc:
            Path(tmp).unlink(missing_ok=True)
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                raise FileNotFoundError(key) from None
            raise
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def size(self, key: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return None
            raise
        return int(head["ContentLength"])

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        folder = self._key(prefix.rstrip("/")) + "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=folder):
            for item in page.get("Contents", []):
                yield item["Key"][strip:], int(item["Size"])

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> None:
        keys = [self._key(key) for key, _ in self.list(prefix)]
        for start in range(0, len(keys), 1000):  # the most one DeleteObjects takes
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})

    def presigned_url(
        self, key: str, expires_s: int, *, filename: str | None = None, content_type: str = ""
    ) -> str:
        params: dict[str, str] = {"Bucket": self.bucket, "Key": self._key(key)}
        if content_type:
            params["ResponseContentType"] = content_type
        if filename:
            params["ResponseContentDisposition"] = f'inline; filename="{filename}"'
        return str(
            self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_s)
        )


def open_store(url: str) -> ObjectStore:
    """The backend of a store URL: `s3://bucket/prefix`, or `file:///abs/folder` (or a plain
    absolute path) for a local folder."""
    if url.startswith("s3://"):
        return S3Store(url)
    if url.startswith("file://"):
        return LocalStore(Path(unquote(urlsplit(url).path)))
    if PurePosixPath(url).is_absolute():
        return LocalStore(Path(url))
    raise ValueError(f"not an artifact store URL: {url!r}")
