"""The diffusion workflow's API on SQLite and PostgreSQL with a real Redis: captioned-image data
sets (captions.jsonl or .txt files) are checked at upload; `POST /v1/files` takes PNG, JPEG and
WebP input pictures and refuses the rest by their bytes; a generate job names its input by an
uploaded file, an output artifact or a data set item, of its own tenant only; a LoRA version
cannot be fine-tuned again, and a fine-tune needs a captioned data set. Every refusal is
problem+json naming the field."""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

from flask.testing import FlaskClient
from PIL import Image

from core.catalog import register_model
from core.db import Database
from tests.support.api import (
    Keys,
    assert_problem,
    bearer,
    submit,
)


def picture(fmt: str = "PNG", size: tuple[int, int] = (24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buffer, format=fmt)
    return buffer.getvalue()


def zip_of(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def upload_dataset(client: FlaskClient, key: str, data: bytes, name: str = "pics") -> Any:
    form = {"name": name, "kind": "captioned_images", "file": (io.BytesIO(data), "pics.zip")}
    return client.post(
        "/v1/datasets", data=form, headers=bearer(key), content_type="multipart/form-data"
    )


def upload_file(client: FlaskClient, key: str, data: bytes, filename: str = "in.png") -> Any:
    return client.post(
        "/v1/files",
        data={"file": (io.BytesIO(data), filename)},
        headers=bearer(key),
        content_type="multipart/form-data",
    )


def field_of(response: Any, status: int = 422) -> str:
    body = assert_problem(response, status)
    return str(body["errors"][0]["field"])


def sd_models(database: Database, tenant_id: str) -> tuple[str, str]:
    """A registered base pipeline and a LoRA version of it (rows only: nothing runs here)."""
    with database.transaction() as session:
        base = register_model(
            session,
            tenant_id=tenant_id,
            name="sd",
            family="diffusers",
            path="/nowhere/sd",
            config={"layout": "sd", "pipeline": "StableDiffusionPipeline"},
        )
        lora = register_model(
            session,
            tenant_id=tenant_id,
            name="sd-style",
            family="diffusers",
            path="models/lora",
            config={"family": "diffusers", "kind": "lora", "served_by_base": True},
            parent_id=base.id,
        )
        return f"{base.name}:{base.version}", f"{lora.name}:{lora.version}"


def test_captioned_images_upload_with_jsonl_or_txt(client: FlaskClient, keys: Keys) -> None:
    jsonl = "\n".join(
        json.dumps({"file": f, "text": t}) for f, t in (("a.png", "red"), ("d/b.png", "blue"))
    )
    response = upload_dataset(
        client,
        keys.acme,
        zip_of({"a.png": picture(), "d/b.png": picture(), "captions.jsonl": jsonl.encode()}),
    )
    assert response.status_code == 201, response.get_data(as_text=True)
    body = response.get_json()
    assert (body["kind"], body["num_items"]) == ("captioned_images", 2)
    txt = zip_of({"x/a.jpg": picture("JPEG"), "x/a.txt": b"a red square"})
    response = upload_dataset(client, keys.acme, txt, name="pics-txt")
    assert response.status_code == 201, response.get_data(as_text=True)


def test_captioned_images_refusals_name_the_file(client: FlaskClient, keys: Keys) -> None:
    cases = {
        "no caption": {"a.png": picture(), "b.png": picture(), "b.txt": b"blue"},
        "empty caption": {"a.png": picture(), "a.txt": b"   "},
        "caption of nothing": {"a.png": picture(), "a.txt": b"x", "c.txt": b"y"},
        "jsonl names a missing file": {
            "a.png": picture(),
            "captions.jsonl": b'{"file": "a.png", "text": "x"}\n{"file": "z.png", "text": "y"}',
        },
        "jsonl not json": {"a.png": picture(), "captions.jsonl": b"{nope"},
        "not an image": {"a.png": picture(), "a.txt": b"x", "run.sh": b"echo"},
        "no images": {"a.txt": b"x"},
        "broken image": {"a.png": b"\x89PNG not really", "a.txt": b"x"},
    }
    for i, (case, entries) in enumerate(cases.items()):
        response = upload_dataset(client, keys.acme, zip_of(entries), name=f"bad-{i}")
        assert field_of(response) == "file", case


def test_input_files_are_checked_by_their_bytes(client: FlaskClient, keys: Keys) -> None:
    for fmt in ("PNG", "JPEG", "WEBP"):
        response = upload_file(client, keys.acme, picture(fmt), filename=f"x.{fmt.lower()}")
        assert response.status_code == 201, response.get_data(as_text=True)
        body = response.get_json()
        assert body["id"].startswith("file-") and (body["width"], body["height"]) == (24, 16)
        got = client.get(f"/v1/files/{body['id']}", headers=bearer(keys.acme))
        assert got.status_code == 200 and got.get_json()["bytes"] == body["bytes"]
        assert client.get(f"/v1/files/{body['id']}", headers=bearer(keys.globex)).status_code == 404
    assert field_of(upload_file(client, keys.acme, picture("GIF"), "in.png")) == "file"
    assert field_of(upload_file(client, keys.acme, b"<svg/>", "in.png")) == "file"
    assert field_of(upload_file(client, keys.acme, b"", "in.png")) == "file"
    missing = client.post(
        "/v1/files", data={}, headers=bearer(keys.acme), content_type="multipart/form-data"
    )
    assert field_of(missing) == "file"


def test_an_input_over_the_size_limit_is_refused(
    client: FlaskClient, keys: Keys, settings: Any
) -> None:
    big = picture("PNG", (2, 2)) + b"\0" * settings.input_max_bytes
    assert_problem(upload_file(client, keys.acme, big), 413)


def test_generate_names_inputs_of_its_own_tenant(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    base, lora = sd_models(database, keys.acme_tenant)
    mine = upload_file(client, keys.acme, picture()).get_json()["id"]
    theirs = upload_file(client, keys.globex, picture()).get_json()["id"]
    params = {"prompt": "a fox", "image": mine, "strength": 0.5}
    ok = submit(client, keys.acme, {"kind": "generate", "model": base, "params": params})
    assert ok.status_code == 202, ok.get_data(as_text=True)
    on_lora = {**params, "mask": mine, "preview_every": 2, "lora_scale": 0.8}
    ok = submit(client, keys.acme, {"kind": "generate", "model": lora, "params": on_lora})
    assert ok.status_code == 202, ok.get_data(as_text=True)
    jsonl = json.dumps({"file": "a.png", "text": "red"}).encode()
    dataset = upload_dataset(
        client, keys.acme, zip_of({"a.png": picture(), "captions.jsonl": jsonl})
    ).get_json()
    item = {**params, "image": f"{dataset['id']}/a.png"}
    ok = submit(client, keys.acme, {"kind": "generate", "model": base, "params": item})
    assert ok.status_code == 202, ok.get_data(as_text=True)

    def refused(params: dict[str, Any]) -> str:
        body = {"kind": "generate", "model": base, "params": params}
        return field_of(submit(client, keys.acme, body))

    assert refused({**params, "image": theirs}) == "params.image"
    assert refused({**params, "image": "file-000"}) == "params.image"
    assert refused({**params, "image": "0190c5d2-0000-7000-8000-000000000000"}) == "params.image"
    assert refused({**params, "image": f"{dataset['id']}/../a.png"}) == "params.image"
    assert refused({**params, "image": f"{dataset['id']}/captions.jsonl"}) == "params.image"
    assert refused({"prompt": "a fox", "mask": mine}) == "params.mask"
    assert refused({**params, "strength": 2}) == "params.strength"
    assert refused({**params, "strength": 0.2, "steps": 4}) == "params.strength"
    assert refused({**params, "preview_every": 0}) == "params.preview_every"
    assert refused({**params, "scheduler": "karras-magic"}) == "params.scheduler"


def test_finetune_checks(client: FlaskClient, keys: Keys, database: Database) -> None:
    base, lora = sd_models(database, keys.acme_tenant)
    jsonl = json.dumps({"file": "a.png", "text": "red"}).encode()
    upload_dataset(client, keys.acme, zip_of({"a.png": picture(), "captions.jsonl": jsonl}))
    text = client.post(
        "/v1/datasets",
        data={"name": "words", "kind": "text", "file": (io.BytesIO(b"some words"), "t.txt")},
        headers=bearer(keys.acme),
        content_type="multipart/form-data",
    )
    assert text.status_code == 201

    def finetune(model: str, dataset: str, **params: Any) -> Any:
        body = {"kind": "finetune", "model": model, "dataset": dataset, "name": "mine"}
        return submit(client, keys.acme, {**body, "params": params})

    ok = finetune(base, "pics", rank=8, alpha=8, steps=20, resolution=256, checkpoint_every=5)
    assert ok.status_code == 202, ok.get_data(as_text=True)
    assert field_of(finetune(lora, "pics")) == "model"
    assert field_of(finetune(base, "words")) == "dataset"
    assert field_of(finetune(base, "pics", rank=0)) == "params.rank"
    assert field_of(finetune(base, "pics", resolution=100)) == "params.resolution"
    assert field_of(finetune(base, "pics", target_modules=["conv_in"])) == "params.target_modules.0"
