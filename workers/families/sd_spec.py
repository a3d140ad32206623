"""The `diffusers` family: any diffusers text-to-image pipeline a self-hoster has on disk
(Stable Diffusion 1.x / 2.x and XL layouts), registered with `POST /v1/models`.

Besides the parameter schema, this module checks a pipeline folder's layout without torch,
so the API can refuse a wrong folder at once: `model_index.json` names a supported pipeline
class, and every weight file of its components is safetensors (a pickled `.bin` or `.ckpt`
could run code when loaded, so such a folder is refused).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.errors import InvalidInputError
from workers.families.base import Family, Resources

SEED_MAX = 2**32 - 1
# model_index.json `_class_name` -> the layout it has. SD 2.x uses the 1.x class.
PIPELINES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}
# Named samplers -> (diffusers scheduler class, extra config). `default` keeps the one the
# pipeline was saved with.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++_2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
SchedulerName = Literal[
    "default",
    "ddim",
    "ddpm",
    "pndm",
    "lms",
    "heun",
    "euler",
    "euler_a",
    "dpm++_2m",
    "dpm++_2m_karras",
    "unipc",
]


class SdGenerateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1, max_length=4000, description="What to draw.")
    negative_prompt: str = Field("", max_length=4000, description="What to steer away from.")
    steps: int = Field(30, ge=1, le=500, description="Denoising steps.")
    guidance: float = Field(
        7.5, ge=0, le=50, description="Classifier-free guidance scale; 1 or less turns it off."
    )
    width: int | None = Field(
        None,
        ge=16,
        le=4096,
        multiple_of=8,
        description="Image width in pixels, a multiple of 8. Unset: the model's native size.",
    )
    height: int | None = Field(
        None,
        ge=16,
        le=4096,
        multiple_of=8,
        description="Image height in pixels, a multiple of 8. Unset: the model's native size.",
    )
    scheduler: SchedulerName = Field(
        "default", description="Sampler; `default` is the one the pipeline was saved with."
    )
    num_images: int = Field(1, ge=1, le=16, description="Images for the prompt.")
    seed: int | None = Field(
        None,
        ge=0,
        le=SEED_MAX,
        description="Image i uses seed + i, so the same seed gives the same images. Unset: random.",
    )


def _weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(safetensors files, pickle-format weight files) directly inside `folder`."""
    files = [f for f in folder.iterdir() if f.is_file()]
    return (
        [f for f in files if f.suffix == ".safetensors"],
        [f for f in files if f.suffix in PICKLE_SUFFIXES],
    )


def check_layout(path: Path, field: str = "path") -> dict[str, Any]:
    """What a pipeline folder holds (pipeline class, layout, components), or 422 naming
    `field`. Looks at files only: loading happens in a worker."""
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise InvalidInputError.one(field, f"{path} has no model_index.json (not a pipeline)")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInputError.one(field, f"model_index.json does not parse: {exc}") from exc
    class_name = index.get("_class_name") if isinstance(index, dict) else None
    if class_name not in PIPELINES:
        supported = ", ".join(sorted(PIPELINES))
        raise InvalidInputError.one(
            field, f"pipeline class {class_name!r} is not supported (supported: {supported})"
        )
    components = sorted(
        name
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and value[0] is not None
    )
    for name in components:
        folder = path / name
        if not folder.is_dir():
            raise InvalidInputError.one(field, f"component folder {name}/ is missing")
        if name.startswith(("tokenizer", "scheduler", "feature_extractor")):
            continue  # no weights
        safe, pickled = _weight_files(folder)
        if not safe:
            detail = f" (found {pickled[0].name}: pickle weights are refused)" if pickled else ""
            raise InvalidInputError.one(field, f"{name}/ has no .safetensors weights{detail}")
    return {"pipeline": class_name, "layout": PIPELINES[class_name], "components": components}


def batch_key(p: SdGenerateParams) -> tuple[int, float, int | None, int | None, str]:
    """Jobs share a pipeline call when they take the same steps, guidance, size and sampler;
    prompts, negative prompts, seeds and num_images are per job."""
    return (p.steps, p.guidance, p.width, p.height, p.scheduler)


FAMILY = Family(
    name="diffusers",
    description="Any diffusers text-to-image pipeline on disk (Stable Diffusion 1.x/2.x, XL),"
    " registered with POST /v1/models.",
    implementation="workers.families.sd_pipeline",
    generate_params=SdGenerateParams,
    resources=Resources(num_gpus=1.0, num_cpus=1.0, gpu_memory_gb=8.0),
    max_batch_size=16,
    batch_key=batch_key,
    check_layout=check_layout,
)
