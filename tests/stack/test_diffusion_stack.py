"""The diffusion workflow through a real `genq up` (SQLite, embedded Redis, Celery, local Ray,
gunicorn) on the tiny pipeline of tests/support/pretrained_models.py: a captioned-images data set is
uploaded and a LoRA fine-tune registers a version holding only the adapter, its parent
recorded; generating with it runs on the base model's server (the same replica as the base's
jobs) and changes the images; an uploaded input comes back unchanged from image-to-image with
strength 0, an output artifact feeds an inpainting job, and previews arrive as outputs."""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.pretrained_models import build_tiny_sd, captioned_folder
from tests.support.stackproc import StackProcess, running_stack

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diffusion")
    return {"sd": build_tiny_sd(root / "sd"), "pics": captioned_folder(root / "pics")}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    var = tmp_path_factory.mktemp("diffusion-stack") / "var"
    with running_stack(var, {"GENQ_RAY_NUM_CPUS": "8"}, check_leftovers=False) as proc:
        yield proc


def wait_ready(stack: StackProcess, name: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        (model,) = stack.call("GET", f"/v1/models/{name}").json()["items"]
        if model["status"] != "checking":
            assert model["status"] == "ready", model
            return
        assert time.monotonic() < deadline, f"{name} still checking"
        time.sleep(0.3)


def images(stack: StackProcess, job: dict, kind: str = "image") -> list[bytes]:
    return [stack.call("GET", o["url"]).content for o in job["outputs"] if o["kind"] == kind]


def test_lora_fine_tune_generate_and_image_modes(
    stack: StackProcess, folders: dict[str, Path]
) -> None:
    response = stack.call(
        "POST", "/v1/models", json={"name": "sd", "family": "diffusers", "path": str(folders["sd"])}
    )
    assert response.status_code == 202, response.text
    wait_ready(stack, "sd")

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for file in folders["pics"].iterdir():
            archive.write(file, file.name)
    form = {"name": "pics", "kind": "captioned_images"}
    response = stack.call(
        "POST", "/v1/datasets", data=form, files={"file": ("pics.zip", buffer.getvalue())}
    )
    assert response.status_code == 201, response.text

    params = {"rank": 4, "alpha": 8.0, "steps": 6, "learning_rate": 5e-2, "checkpoint_every": 3}
    body = {"kind": "finetune", "model": "sd", "dataset": "pics", "name": "sd-style"}
    tuned = stack.wait(stack.submit({**body, "params": params})["id"], timeout_s=300)
    assert tuned["state"] == "succeeded", tuned
    (version,) = stack.call("GET", "/v1/models/sd-style").json()["items"]
    assert version["lineage"]["parent"] == "sd:1"
    assert 0 < version["metrics"]["adapter_bytes"] < 200_000

    draw = {"prompt": "a red square", "steps": 3, "seed": 4, "preview_every": 1}
    base = stack.wait(stack.submit({"kind": "generate", "model": "sd", "params": draw})["id"])
    styled = stack.wait(
        stack.submit({"kind": "generate", "model": "sd-style", "params": draw})["id"]
    )
    assert base["state"] == styled["state"] == "succeeded", (base, styled)
    assert images(stack, base) != images(stack, styled)
    # One warm base serves both: the adapter's job ran on the base model's replica.
    assert base["placement"]["replica"] == styled["placement"]["replica"]
    # A preview per denoising call (PNDM makes one more call than steps, to warm up).
    assert len(images(stack, styled, "preview")) >= 3

    source = Image.effect_noise((32, 32), 50).convert("RGB")
    png = io.BytesIO()
    source.save(png, format="PNG")
    upload = stack.call("POST", "/v1/files", files={"file": ("in.png", png.getvalue())})
    assert upload.status_code == 201, upload.text
    same = {"prompt": "x", "image": upload.json()["id"], "strength": 0.0, "seed": 1}
    job = stack.wait(stack.submit({"kind": "generate", "model": "sd", "params": same})["id"])
    assert job["state"] == "succeeded", job
    (out,) = images(stack, job)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(out))), np.asarray(source))

    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    mask_png = io.BytesIO()
    mask.save(mask_png, format="PNG")
    mask_id = stack.call("POST", "/v1/files", files={"file": ("m.png", mask_png.getvalue())})
    artifact = [o["id"] for o in styled["outputs"] if o["kind"] == "image"][0]
    inpaint = {"prompt": "x", "image": artifact, "mask": mask_id.json()["id"], "steps": 3}
    job = stack.wait(
        stack.submit({"kind": "generate", "model": "sd-style", "params": inpaint})["id"]
    )
    assert job["state"] == "succeeded", job
    (painted,) = images(stack, job)
    before = np.asarray(Image.open(io.BytesIO(images(stack, styled)[0]))).astype(int)
    after = np.asarray(Image.open(io.BytesIO(painted))).astype(int)
    assert np.abs(before - after)[:, 16:].max() <= 2  # the unmasked half is the input's
