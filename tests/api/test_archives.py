"""Hostile archives (core/archives.py through POST /v1/datasets): each malformed shape is a
422 naming `file` and what is wrong, duplicates are refused, nothing is left behind, and a real
API process (gunicorn via `genq api`) unpacking a zip with a 1 GB entry keeps its memory flat.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.api import (
    Keys,
    assert_problem,
)
from tests.support.datasets import UPLOAD_SETTINGS, nothing_left, png, upload, zip_of
from tests.support.stackproc import ROOT, descendants, free_port


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return UPLOAD_SETTINGS


LOCAL = b"PK\x03\x04"
CENTRAL = b"PK\x01\x02"


def patch_headers(data: bytes, local: Callable[[bytearray, int], None],
                  central: Callable[[bytearray, int], None]) -> bytes:  # fmt: skip
    """Apply `local` at each local file header and `central` at each central directory one."""
    out = bytearray(data)
    at = out.find(LOCAL)
    while at >= 0:
        local(out, at)
        at = out.find(LOCAL, at + 4)
    at = out.find(CENTRAL)
    while at >= 0:
        central(out, at)
        at = out.find(CENTRAL, at + 4)
    return bytes(out)


def set_u16(offset: int, value: int) -> Callable[[bytearray, int], None]:
    def apply(buf: bytearray, at: int) -> None:
        buf[at + offset : at + offset + 2] = struct.pack("<H", value)

    return apply


def stored_zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buf.getvalue()


def header_name_differs() -> bytes:
    data = bytearray(zip_of({"cats/a.png": png()}))
    first = data.find(b"cats/a.png")  # the local header's copy comes first
    data[first : first + 10] = b"cats/b.png"
    return bytes(data)


def bad_crc() -> bytes:
    image = png()
    data = bytearray(stored_zip({"cats/a.png": image}))
    at = data.find(image) + len(image) - 5  # inside the stored data, past the PNG header
    data[at] ^= 0xFF
    return bytes(data)


def corrupt_deflate() -> bytes:
    data = bytearray(zip_of({"cats/a.png": png(size=(64, 64))}))
    start = data.find(b"cats/a.png") + len(b"cats/a.png")  # local header's name, then data
    data[start : start + 8] = b"\xff" * 8  # BTYPE 11: a block type deflate does not have
    return bytes(data)


def encrypted() -> bytes:
    return patch_headers(zip_of({"cats/a.png": png()}), set_u16(6, 1), set_u16(8, 1))


def unknown_method() -> bytes:
    return patch_headers(zip_of({"cats/a.png": png()}), set_u16(8, 99), set_u16(10, 99))


def duplicate_names() -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns "Duplicate name", and writes it
        with zipfile.ZipFile(buf, "w") as archive:
            archive.writestr("cats/a.png", png(color=1))
            archive.writestr("cats/a.png", png(color=2))
    return buf.getvalue()


CASES: list[tuple[str, Callable[[], bytes], str]] = [
    ("path-max", lambda: zip_of({"cats/" + "a/" * 2100 + "x.png": png()}), "longer than"),
    ("name-max", lambda: zip_of({"cats/" + "a" * 300 + ".png": png()}), "255 bytes"),
    ("header-name", header_name_differs, "malformed entry"),
    ("bad-crc", bad_crc, "Bad CRC-32"),
    ("corrupt-deflate", corrupt_deflate, "corrupt compressed data"),
    ("encrypted", encrypted, "encrypted"),
    ("unknown-method", unknown_method, "compression method 99"),
    ("duplicate", duplicate_names, "duplicate entry name"),
    (
        "file-and-folder",
        lambda: zip_of({"cats/a.png": png(), "cats/a.png/b.png": png()}),
        "both a file and a folder",
    ),  # fmt: skip
    ("truncated", lambda: zip_of({"cats/a.png": png()})[:-30], "not a readable zip"),
]


@pytest.mark.parametrize("make, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_archives_are_422_naming_what_is_wrong(
    client,
    keys: Keys,
    settings,
    database,
    make: Callable[[], bytes],
    expected: str,
) -> None:
    problem = assert_problem(upload(client, keys.acme, make(), "images"), 422)
    assert problem["errors"][0]["field"] == "file"
    assert expected in problem["errors"][0]["message"], problem
    nothing_left(settings, database)


def test_an_entry_over_its_cap_is_413_and_leaves_nothing(client, keys: Keys, settings, database):
    settings.dataset_max_entry_bytes = 100_000
    bomb = zip_of({"cats/a.png": png(), "cats/b.png": b"\0" * 150_000})
    problem = assert_problem(upload(client, keys.acme, bomb, "images"), 413)
    assert "'cats/b.png' unpacks to more than 100000 bytes" in problem["detail"]
    nothing_left(settings, database)


# -- memory of a real API process --------------------------------------------------------------

GIB = 1024**3


def one_gigabyte_entry_zip(path: Path) -> None:
    """A zip of about 1 MB whose one entry unpacks to 1 GiB of zeros (made in a stream)."""
    chunk = b"\0" * (1024 * 1024)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:  # noqa: SIM117
        with archive.open("cats/bomb.png", "w", force_zip64=True) as entry:
            for _ in range(GIB // len(chunk)):
                entry.write(chunk)


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


@pytest.fixture
def api_process(tmp_path: Path, redis_db_url: str) -> Iterator[dict[str, Any]]:
    """`genq migrate` then `genq api` (gunicorn, one worker) in their own session."""
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GENQ_")},
        "GENQ_VAR_DIR": str(tmp_path / "var"),
        "GENQ_REDIS_URL": redis_db_url,
        "GENQ_PORT": str(port),
        "GENQ_API_WORKERS": "1",
        "GENQ_API_THREADS": "4",
        # The whole entry may be unpacked: 300 MB per entry would be held in memory by an
        # extraction that buffers entries, and only written to disk by one that streams.
        "GENQ_DATASET_MAX_ENTRY_BYTES": str(300 * 1024 * 1024),
        "GENQ_DATASET_MAX_UNPACKED_BYTES": str(2 * GIB),
    }
    migrate = subprocess.run(
        [sys.executable, "-m", "stack.cli", "migrate"], env=env, cwd=ROOT, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert migrate.returncode == 0, migrate.stderr
    key = migrate.stdout.split("admin key (shown once):")[1].split()[0]
    log = open(tmp_path / "api.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "stack.cli", "api"], env=env, cwd=ROOT, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                if requests.get(url + "/v1/health", timeout=5).status_code in (200, 503):
                    break
            # Not listening yet, or (on a loaded machine) too slow to answer the first probe.
            except (requests.ConnectionError, requests.Timeout):
                pass
            assert process.poll() is None, (tmp_path / "api.log").read_text()
            assert time.monotonic() < deadline, "the API did not start"
            time.sleep(0.2)
        workers = descendants(process.pid)
        assert len(workers) == 1, workers
        yield {"url": url, "key": key, "worker": workers.pop(), "var": tmp_path / "var"}
    finally:
        os.killpg(process.pid, 15)
        process.wait(30)
        log.close()


@pytest.mark.stack
def test_a_zip_bomb_costs_a_real_api_process_no_memory(api_process, tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.zip"
    one_gigabyte_entry_zip(bomb)
    assert bomb.stat().st_size < 2 * 1024 * 1024
    worker = api_process["worker"]
    before_kb = status_kb(worker, "VmHWM")
    with open(bomb, "rb") as f:
        response = requests.post(
            api_process["url"] + "/v1/datasets",
            headers={"Authorization": f"Bearer {api_process['key']}"},
            data={"name": "bomb", "kind": "images"},
            files={"file": ("bomb.zip", f)},
            timeout=300,
        )
    assert response.status_code == 413, response.text
    assert "unpacks to more than 314572800 bytes" in response.json()["detail"]
    peak_kb = status_kb(worker, "VmHWM")
    grew_mb = (peak_kb - before_kb) / 1024
    print(f"API worker peak RSS {before_kb / 1024:.0f} MB -> {peak_kb / 1024:.0f} MB")
    # A buffered entry would add at least the 300 MB that were unpacked.
    assert grew_mb < 64, f"the API worker's peak RSS grew by {grew_mb:.0f} MB"
    datasets = api_process["var"] / "artifacts" / "datasets"
    assert not datasets.exists() or list(datasets.iterdir()) == []
