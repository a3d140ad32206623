"""`POST /openai/v1/images/generations` on the image families, answered in OpenAI's shape.

`diffusers` draws the prompt; `ddpm`, `gan` and `vae` are class-conditional, so their prompt
names a class: one of the model's class names (`digits` has "0" to "9") or a class number.
`n` is the job's `num_images`; `size` (`WIDTHxHEIGHT`) sets a `diffusers` model's width and
height, and the others draw at their trained size only. `response_format` `url` answers genq
artifact URLs (fetched with the same key), `b64_json` the PNGs themselves. The call is one
genq job; family parameters OpenAI lacks (`steps`, `guidance`, `negative_prompt`, `seed`)
come through `extra_body`.
"""

from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass
from typing import Any, Literal

from flask import Blueprint, Response, g, jsonify
from pydantic import BaseModel, ConfigDict, Field

from api.jobs import read_json_body
from api.openai_compat import calls
from api.openai_compat.errors import JOB_ID_HEADER
from api.payloads import artifact_url
from core.errors import InvalidInputError
from core.tables import Model
from workers.families.base import OpenAIShape
from workers.registry import FAMILIES

bp = Blueprint("images", __name__)

IMAGE_SHAPES = (OpenAIShape.IMAGES, OpenAIShape.LABELLED_IMAGES)
_SIZE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(..., min_length=1, max_length=140)
    prompt: str = Field(..., min_length=1, max_length=4000)
    n: int = Field(1, ge=1)
    size: str | None = None
    response_format: Literal["url", "b64_json"] = "url"


def class_label(model: Model, prompt: str) -> int:
    """The class a labelled model's prompt names: a class name it was trained with, or a
    class number below its class count."""
    config = model.config or {}
    names = [str(n) for n in config.get("class_names") or []]
    text = prompt.strip()
    for index, name in enumerate(names):
        if text.lower() == name.lower():
            return index
    count = int(config.get("num_classes") or 0)
    if text.isdigit() and (not count or int(text) < count):
        return int(text)
    known = f"one of its classes ({', '.join(names[:20])})" if names else "a class number"
    raise InvalidInputError.one(
        "prompt", f"model {model.ref} is class-conditional: the prompt names {known}"
    )


def _size(model: Model, size: str | None) -> dict[str, int]:
    if size is None:
        return {}
    match = _SIZE.match(size)
    if match is None:
        raise InvalidInputError.one("size", "must be WIDTHxHEIGHT in pixels, e.g. 512x512")
    width, height = int(match.group(1)), int(match.group(2))
    if FAMILIES[model.family].openai == OpenAIShape.IMAGES:
        return {"width": width, "height": height}
    native = (model.config or {}).get("image_size")
    if native and width == height == int(native):
        return {}
    raise InvalidInputError.one(
        "size", f"model {model.ref} draws {native}x{native} images only; leave size out"
    )


def _params(model: Model, req: ImageRequest, body: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {"num_images": req.n}
    if FAMILIES[model.family].openai == OpenAIShape.IMAGES:
        params["prompt"] = req.prompt
    else:
        params["label"] = class_label(model, req.prompt)
    params.update(_size(model, req.size))
    spec = FAMILIES[model.family].generate_params
    params.update(calls.family_fields(spec, body, {"prompt", "label", "mode", *params}))
    return params


RENAMES = {"num_images": "n", "width": "size", "height": "size", "label": "prompt"}


@dataclass
class ImageCall:
    model: Model
    req: ImageRequest
    params: dict[str, Any]


def image_call(body: dict[str, Any]) -> ImageCall:
    """An images request turned into its job's params."""
    req = calls.parse(ImageRequest, body)
    model = calls.find_model(req.model)
    family = FAMILIES.get(model.family)
    if family is None or family.openai not in IMAGE_SHAPES:
        drawing = sorted(name for name, f in FAMILIES.items() if f.openai in IMAGE_SHAPES)
        raise InvalidInputError.one(
            "model",
            f"model {model.ref} is a {model.family} model; images come from "
            f"{', '.join(drawing)} models",
        )
    return ImageCall(model, req, _params(model, req, body))


def images_body(result: calls.Result, response_format: str, created: int) -> dict[str, Any]:
    """The answer to an images call whose job finished."""
    data = []
    for artifact in result.outputs:
        if artifact.kind != "image":
            continue  # a contact sheet (`grid`) is genq's extra, not one of the n images
        if response_format == "b64_json":
            data.append({"b64_json": base64.b64encode(calls.read_output(artifact)).decode()})
        else:
            data.append({"url": calls.absolute_url(artifact_url(artifact.id))})
    return {"created": created, "data": data}


@bp.post("/images/generations")
def generations() -> Response:
    body = read_json_body()
    g.openai_renames = RENAMES
    call = image_call(body)
    submissions = calls.submissions_for(call.model, [call.params], body)
    wait_s = calls.wait_s(body)
    slots = calls.take_slot()
    try:
        job_ids = calls.create_jobs(submissions)
        calls.wait_done(job_ids, wait_s)
        (result,) = calls.results(job_ids)
    finally:
        slots.release()
    response = jsonify(images_body(result, call.req.response_format, int(time.time())))
    response.headers[JOB_ID_HEADER] = ", ".join(job_ids)
    return response
