"""Helpers of the data set upload tests (tests/api/test_datasets_upload.py and
tests/api/test_archives.py): their settings (small upload limits), archives and pictures to
upload, the upload request, and the check that a refusal left nothing behind."""

from __future__ import annotations

import io
import stat
import zipfile
from typing import Any

from flask.testing import FlaskClient
from PIL import Image
from sqlalchemy import select

from core.db import Database
from core.settings import Settings
from core.tables import SYSTEM_TENANT_ID, Dataset
from tests.support.api import bearer

MAX_BYTES = 200_000


# An upload test's settings (tests/api/conftest.py's `settings_overrides`): upload limits small
# enough that the refusals are cheap to provoke, and rate limits on, as a deployment runs.
UPLOAD_SETTINGS = {
    "rate_limits": True,
    "dataset_max_bytes": MAX_BYTES,
    "dataset_max_entries": 20,
    "dataset_max_unpacked_bytes": 1_000_000,
    "dataset_max_pixels": 1_000_000,
}


def png(size: tuple[int, int] = (12, 10), color: int = 128) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, color).save(buf, format="PNG")
    return buf.getvalue()


def zip_of(entries: dict[str, bytes], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        if symlink is not None:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return buf.getvalue()


def upload(client: FlaskClient, key: str, data: bytes, kind: str, name: str = "mine") -> Any:
    form = {"name": name, "kind": kind, "file": (io.BytesIO(data), "upload.bin")}
    return client.post(
        "/v1/datasets", data=form, headers=bearer(key), content_type="multipart/form-data"
    )


def nothing_left(settings: Settings, database: Database) -> None:
    """No folder or file under datasets/ (not even a temporary one) and no uploaded row."""
    folder = settings.artifacts / "datasets"
    assert not folder.exists() or list(folder.iterdir()) == []
    with database.transaction() as session:
        rows = session.scalars(select(Dataset).where(Dataset.tenant_id != SYSTEM_TENANT_ID))
        assert list(rows) == []
