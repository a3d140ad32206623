"""The `diffusers` and `transformers` families through a real `genq up` (SQLite, embedded
Redis, Celery, local Ray, gunicorn), on tiny pretrained folders built from config
(tests/support/pretrained_models.py): register each with `POST /v1/models`, watch the worker's check
mark it ready (or failed), generate with the real loading code, same seed same bytes, bad
input refused naming the field, and a LoRA fine-tune of the tiny LM registered as the next
version, naming its base, that changes what the model writes."""

from __future__ import annotations

import io
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.support.pretrained_models import build_tiny_lm, build_tiny_sd, build_tiny_sdxl
from tests.support.stackproc import StackProcess, running_stack

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pretrained")
    found = {
        "sd": build_tiny_sd(root / "sd"),
        "sdxl": build_tiny_sdxl(root / "sdxl"),
        "lm": build_tiny_lm(root / "lm"),
        "lm-plain": build_tiny_lm(root / "lm-plain", chat_template=False),
    }
    # Pickled weights only: refused before anything is registered.
    pickled = root / "lm-pickled"
    shutil.copytree(found["lm"], pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    found["lm-pickled"] = pickled
    # The right files, but weights that do not load: only the worker's check can tell.
    broken = root / "sd-broken"
    shutil.copytree(found["sd"], broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    found["sd-broken"] = broken
    return found


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    # Ray counts CPUs as slots: every warm model server holds one, so give it more than the
    # machine's two cores (the tiny models hardly use them).
    var = tmp_path_factory.mktemp("pretrained-stack") / "var"
    with running_stack(var, {"GENQ_RAY_NUM_CPUS": "8"}, check_leftovers=False) as proc:
        yield proc


def register(stack: StackProcess, name: str, family: str, path: Path, **kw: Any) -> dict:
    body = {"name": name, "family": family, "path": str(path), **kw}
    response = stack.call("POST", "/v1/models", json=body)
    assert response.status_code == 202, response.text
    assert response.headers["Location"] == f"/v1/models/{name}"
    return dict(response.json())


def wait_checked(stack: StackProcess, ref: str, timeout_s: float = 180) -> dict:
    name, version = ref.split(":")
    deadline = time.monotonic() + timeout_s
    while True:
        items = stack.call("GET", f"/v1/models/{name}").json()["items"]
        (model,) = [m for m in items if m["version"] == int(version)]
        if model["status"] != "checking":
            return dict(model)
        assert time.monotonic() < deadline, f"{ref} still checking"
        time.sleep(0.3)


def problem_fields(response: Any) -> list[str]:
    assert response.status_code == 422, response.text
    assert response.headers["Content-Type"].startswith("application/problem+json")
    return [e["field"] for e in response.json()["errors"]]


def events_of(stack: StackProcess, job_id: str) -> list[tuple[str, dict]]:
    response = stack.call("GET", f"/v1/jobs/{job_id}/events")
    events, kind = [], ""
    for line in response.text.splitlines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[6:])))
    return events


def downloads(stack: StackProcess, job: dict) -> list[bytes]:
    return [stack.call("GET", o["url"]).content for o in job["outputs"]]


def test_registration_refuses_what_cannot_load(
    stack: StackProcess, folders: dict[str, Path]
) -> None:
    def post(body: dict) -> Any:
        return stack.call("POST", "/v1/models", json=body)

    missing = {"name": "x", "family": "diffusers", "path": str(folders["sd"] / "nope")}
    assert problem_fields(post(missing)) == ["path"]
    wrong_layout = {"name": "x", "family": "diffusers", "path": str(folders["lm"])}
    assert problem_fields(post(wrong_layout)) == ["path"]
    pickled = post({"name": "x", "family": "transformers", "path": str(folders["lm-pickled"])})
    assert problem_fields(pickled) == ["path"]
    assert "pickle" in pickled.json()["detail"]
    unknown = post({"name": "x", "family": "gan", "path": str(folders["sd"])})
    assert problem_fields(unknown) == ["family"]
    escaping = post({"name": "x", "family": "diffusers", "path": "../../etc"})
    assert problem_fields(escaping) == ["path"]
    assert stack.call("GET", "/v1/models/x").status_code == 404

    # The layout passes, the weights do not load: the worker's check marks it failed, and a
    # job on it is a 409 that says why.
    registered = register(stack, "broken", "diffusers", folders["sd-broken"])
    assert registered["status"] == "checking"
    checked = wait_checked(stack, registered["ref"])
    assert checked["status"] == "failed"
    assert "does not load" in checked["status_detail"]
    body = {"kind": "generate", "model": "broken", "params": {"prompt": "a fox"}}
    refused = stack.call("POST", "/v1/jobs", json=body)
    assert refused.status_code == 409, refused.text
    assert refused.json()["model_status"] == "failed"

    # Fixed in place, checked again: ready, and it generates.
    good = folders["sd"] / "unet" / "diffusion_pytorch_model.safetensors"
    shutil.copyfile(good, folders["sd-broken"] / "unet" / good.name)
    again = stack.call("POST", "/v1/models/broken/1/check")
    assert again.status_code == 202, again.text
    assert again.json()["status"] == "checking"
    assert wait_checked(stack, "broken:1")["status"] == "ready"
    job = stack.wait(stack.submit({**body, "params": {"prompt": "a fox", "steps": 2}})["id"])
    assert job["state"] == "succeeded", job
    assert stack.call("POST", "/v1/models/broken/1/check").status_code == 409  # ready now
    assert stack.call("POST", "/v1/models/broken/9/check").status_code == 404


def test_diffusers_generates_the_same_images_for_a_seed(
    stack: StackProcess, folders: dict[str, Path]
) -> None:
    registered = register(stack, "sd", "diffusers", folders["sd"], description="tiny SD")
    assert registered["ref"] == "sd:1"
    model = wait_checked(stack, "sd:1")
    assert model["status"] == "ready", model
    assert model["description"] == "tiny SD"
    assert model["metrics"]["check_parameters"] > 0

    params = {"prompt": "a red fox", "steps": 3, "seed": 7, "num_images": 2, "guidance": 3.0}
    first = stack.wait(stack.submit({"kind": "generate", "model": "sd", "params": params})["id"])
    assert first["state"] == "succeeded", first
    images = downloads(stack, first)
    assert len(images) == 2 and images[0] != images[1]
    png = Image.open(io.BytesIO(images[1]))
    assert png.size == (32, 32)  # the tiny model's native size
    assert png.text["genq:seed"] == "8"  # image i uses seed + i
    assert json.loads(png.text["genq:params"])["prompt"] == "a red fox"
    steps = [d for kind, d in events_of(stack, first["id"]) if kind == "progress"]
    assert steps and steps[-1]["total"] >= 3

    again = stack.wait(stack.submit({"kind": "generate", "model": "sd", "params": params})["id"])
    assert downloads(stack, again) == images
    other = {**params, "scheduler": "euler_a", "width": 48}
    changed = stack.wait(stack.submit({"kind": "generate", "model": "sd", "params": other})["id"])
    assert changed["state"] == "succeeded", changed
    redrawn = downloads(stack, changed)
    assert Image.open(io.BytesIO(redrawn[0])).size == (48, 32)

    bad = {"prompt": "x", "width": 30, "scheduler": "warp", "num_images": 0}
    response = stack.call(
        "POST", "/v1/jobs", json={"kind": "generate", "model": "sd", "params": bad}
    )
    assert sorted(problem_fields(response)) == [
        "params.num_images",
        "params.scheduler",
        "params.width",
    ]


def test_diffusers_xl_layout(stack: StackProcess, folders: dict[str, Path]) -> None:
    register(stack, "sdxl", "diffusers", folders["sdxl"])
    assert wait_checked(stack, "sdxl:1")["status"] == "ready"
    params = {"prompt": "a fox", "negative_prompt": "blurry", "steps": 2, "seed": 1}
    job = stack.wait(stack.submit({"kind": "generate", "model": "sdxl", "params": params})["id"])
    assert job["state"] == "succeeded", job
    (image,) = downloads(stack, job)
    assert Image.open(io.BytesIO(image)).size == (32, 32)


def test_transformers_streams_chats_and_lora_changes_the_output(
    stack: StackProcess, folders: dict[str, Path]
) -> None:
    register(stack, "lm", "transformers", folders["lm"])
    register(stack, "lm-plain", "transformers", folders["lm-plain"])
    assert wait_checked(stack, "lm:1")["status"] == "ready"
    assert wait_checked(stack, "lm-plain:1")["status"] == "ready"

    def generate(model: str, **params: Any) -> dict:
        job = stack.submit({"kind": "generate", "model": model, "params": params})
        return stack.wait(job["id"])

    first = generate("lm:1", prompt="The quick", max_tokens=12, seed=4)
    assert first["state"] == "succeeded", first
    (output,) = first["outputs"]
    text = stack.call("GET", output["url"]).text
    deltas = [d["text"] for kind, d in events_of(stack, first["id"]) if kind == "text_delta"]
    assert deltas and "".join(deltas) == text
    assert output["meta"]["prompt_tokens"] > 0
    assert 0 < output["meta"]["completion_tokens"] <= 12
    again = generate("lm:1", prompt="The quick", max_tokens=12, seed=4)
    assert downloads(stack, again) == [text.encode()]

    chat = [{"role": "user", "content": "say fox"}]
    answered = generate("lm:1", messages=chat, max_tokens=6, seed=1)
    assert answered["state"] == "succeeded", answered
    # What the folder cannot do is refused at submit: it was recorded when it was registered.
    body = {"kind": "generate", "model": "lm-plain", "params": {"messages": chat}}
    no_template = stack.call("POST", "/v1/jobs", json=body)
    assert problem_fields(no_template) == ["params.messages"]
    assert "chat template" in no_template.json()["detail"]
    body = {"kind": "generate", "model": "lm", "params": {"prompt": "x", "max_tokens": 128}}
    too_long = stack.call("POST", "/v1/jobs", json=body)
    assert problem_fields(too_long) == ["params.max_tokens"]  # the context is 128 tokens
    both = {"prompt": "x", "messages": chat, "top_p": 0}
    response = stack.call(
        "POST", "/v1/jobs", json={"kind": "generate", "model": "lm", "params": both}
    )
    assert sorted(problem_fields(response)) == ["params.messages", "params.top_p"]

    text_file = ("The quick brown fox jumps over the lazy dog. " * 120).encode()
    files = {"file": ("fox.txt", text_file, "text/plain")}
    uploaded = stack.call("POST", "/v1/datasets", data={"name": "fox", "kind": "text"}, files=files)
    assert uploaded.status_code == 201, uploaded.text
    lora = {
        "steps": 30,
        "batch_size": 4,
        "seq_len": 16,
        "learning_rate": 0.05,
        "r": 16,
        "alpha": 64,
        "dropout": 0.0,
        "target_modules": ["c_attn", "c_proj", "c_fc"],
        "checkpoint_every": 10,
    }
    # The pretrained model belongs to every tenant (the system's); the fine-tune is the
    # admin tenant's own model, version 1 of its name, whose parent is the base.
    body = {"kind": "finetune", "model": "lm:1", "dataset": "fox", "name": "fox-lm", "params": lora}
    tuned = stack.wait(stack.submit(body)["id"])
    assert tuned["state"] == "succeeded", tuned
    assert tuned["result_model"] == "fox-lm:1"
    assert "val_loss" in tuned["metrics"]
    (version,) = stack.call("GET", "/v1/models/fox-lm").json()["items"]
    assert version["lineage"] == {"dataset": "fox", "parent": "lm:1", "job": tuned["id"]}
    assert version["status"] == "ready"
    greedy = {"prompt": "The quick", "max_tokens": 12, "temperature": 0, "seed": 0}
    base = downloads(stack, generate("lm:1", **greedy))
    adapted = downloads(stack, generate("fox-lm:1", **greedy))
    assert adapted != base

    # A fine-tune of the fine-tune stacks a second adapter on the first.
    body = {**body, "model": "fox-lm:1", "params": {**lora, "steps": 4}}
    stacked = stack.wait(stack.submit(body)["id"])
    assert stacked["state"] == "succeeded", stacked
    assert stacked["result_model"] == "fox-lm:2"
    again = generate("fox-lm:2", **greedy)
    assert again["state"] == "succeeded", again
