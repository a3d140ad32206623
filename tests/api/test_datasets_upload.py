"""`POST /v1/datasets` against SQLite and PostgreSQL with a real Redis (DB 3): a valid image
zip and a valid text file are stored and train (the workers' code, on the stored folders);
traversal paths, symlinks, zip bombs, pixel bombs, too many entries, oversize uploads and bad
text are refused with the documented status, and leave no folder, no file and no row."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from core.events import ModelSaved
from tests.support.api import (
    Keys,
    assert_problem,
    bearer,
)
from tests.support.datasets import MAX_BYTES, UPLOAD_SETTINGS, nothing_left, png, upload, zip_of
from workers.families import charlm, gan
from workers.families.base import DatasetRef, TrainContext


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return UPLOAD_SETTINGS


def train_ctx(root: Path, ref: DatasetRef) -> TrainContext:
    return TrainContext(
        job_id="job",
        device="cpu",
        dataset=ref,
        checkpoint_dir=root / "checkpoints",
        model_dir=root / "model",
        model_dir_rel="model",
    )


def test_an_image_zip_is_stored_by_class_and_trains(client, keys: Keys, settings, tmp_path):
    entries = {
        f"{cls}/{i}.png": png(color=c) for cls, c in (("cats", 30), ("dogs", 220)) for i in range(3)
    }
    entries["__MACOSX/._cats"] = b"resource fork"
    response = upload(client, keys.acme, zip_of(entries), "images")
    assert response.status_code == 201, response.get_data(as_text=True)
    body = response.get_json()
    assert (body["name"], body["kind"], body["num_items"]) == ("mine", "images", 6)
    assert body["meta"]["classes"] == {"cats": 3, "dogs": 3}
    folder = settings.artifacts / "datasets" / body["id"]
    assert sorted(p.name for p in folder.iterdir()) == ["cats", "dogs", "genq-manifest.json"]
    files = {f for f in folder.rglob("*") if f.is_file() and f.name != "genq-manifest.json"}
    assert body["size_bytes"] == sum(f.stat().st_size for f in files)
    # The manifest records each stored file's size and SHA-256.
    manifest = json.loads((folder / "genq-manifest.json").read_text())["files"]
    assert {folder / name for name in manifest} == files
    for name, entry in manifest.items():
        data = (folder / name).read_bytes()
        assert entry["size_bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    listed = client.get("/v1/datasets", headers=bearer(keys.acme)).get_json()["items"]
    assert "mine" in [d["name"] for d in listed]
    # A second upload under the same name is a conflict, and leaves the first alone.
    assert_problem(upload(client, keys.acme, zip_of(entries), "images"), 409)
    assert len(list((settings.artifacts / "datasets").iterdir())) == 1

    ref = DatasetRef("mine", "images", folder)
    params = {"preset": "tiny", "steps": 2, "batch_size": 4}
    events = list(gan.train(params, train_ctx(tmp_path / "run", ref)))
    assert isinstance(events[-1], ModelSaved)
    assert events[-1].config["class_names"] == ["cats", "dogs"]


def test_a_text_file_is_stored_and_trains(client, keys: Keys, settings, tmp_path):
    text = "Ünïcode text, repeated. " * 40
    response = upload(client, keys.acme, text.encode(), "text", name="poems")
    assert response.status_code == 201, response.get_data(as_text=True)
    body = response.get_json()
    assert body["kind"] == "text" and body["num_items"] == len(text)
    folder = settings.artifacts / "datasets" / body["id"]
    assert (folder / "text.txt").read_text() == text

    ref = DatasetRef("poems", "text", folder)
    params = {"preset": "tiny", "steps": 2, "batch_size": 4}
    events = list(charlm.train(params, train_ctx(tmp_path / "run", ref)))
    assert isinstance(events[-1], ModelSaved)


@pytest.mark.parametrize(
    "entries, symlink",
    [
        ({"../evil.png": png()}, None),
        ({"cats/../../evil.png": png()}, None),
        ({"/abs/evil.png": png()}, None),
        ({"cats\\..\\evil.png": png()}, None),
        ({"C:/evil.png": png()}, None),
        ({"cats/ok.png": png()}, "cats/link.png"),
        ({"loose.png": png()}, None),
        ({"cats/ok.png": png(), "cats/notes.txt": b"hi"}, None),
        ({"cats/ok.png": png(), "cats/broken.png": b"not a png"}, None),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "backslash", "drive", "symlink", "no-class",
         "not-an-image", "broken-image"],
)  # fmt: skip
def test_unsafe_or_bad_archives_are_422_and_leave_nothing(
    client, keys: Keys, settings, database, tmp_path, entries, symlink
):
    problem = assert_problem(upload(client, keys.acme, zip_of(entries, symlink), "images"), 422)
    assert problem["errors"][0]["field"] == "file"
    nothing_left(settings, database)
    assert not list(tmp_path.rglob("evil.png"))


def test_bombs_and_oversize_uploads_are_refused(client, keys: Keys, settings, database):
    # A zip bomb: 2 MB of zeros compress to a few KB, but unpack past the 1 MB limit.
    bomb = zip_of({"cats/a.png": png(), "cats/b.png": b"\0" * 2_000_000})
    assert len(bomb) < MAX_BYTES
    assert (
        "unpacks to more than"
        in assert_problem(upload(client, keys.acme, bomb, "images"), 413)["detail"]
    )
    nothing_left(settings, database)

    many = zip_of({f"cats/{i}.png": png() for i in range(21)})
    assert "entries" in assert_problem(upload(client, keys.acme, many, "images"), 413)["detail"]
    nothing_left(settings, database)

    # A pixel bomb: a 2000x2000 image is a small file but 4 million pixels.
    huge = zip_of({"cats/huge.png": png(size=(2000, 2000))})
    assert len(huge) < MAX_BYTES
    problem = assert_problem(upload(client, keys.acme, huge, "images"), 422)
    assert "pixels" in problem["errors"][0]["message"]
    nothing_left(settings, database)

    assert_problem(upload(client, keys.acme, b"x" * (MAX_BYTES + 1), "text"), 413)
    nothing_left(settings, database)


def test_bad_fields_and_text_are_422(client, keys: Keys, settings, database):
    problem = assert_problem(upload(client, keys.acme, b"\xff\xfe bad", "text"), 422)
    assert problem["errors"][0]["field"] == "file"
    problem = assert_problem(upload(client, keys.acme, b"text", "audio"), 422)
    assert problem["errors"][0]["field"] == "kind"
    problem = assert_problem(upload(client, keys.acme, b"text", "text", name="../up"), 422)
    assert problem["errors"][0]["field"] == "name"
    problem = assert_problem(upload(client, keys.acme, b"not a zip", "images"), 422)
    assert problem["errors"][0]["field"] == "file"
    nothing_left(settings, database)
