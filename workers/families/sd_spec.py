"""The `diffusers` family: any diffusers Stable Diffusion pipeline a self-hoster has on disk
(1.x / 2.x and XL layouts), registered with `POST /v1/models`: text-to-image, image-to-image
(`image` + `strength`) and inpainting (`image` + `mask`), and LoRA fine-tuning on a data set of
captioned images, whose result is a version holding only the adapter (served by its base
model's servers, the adapter switched per job).

Besides the parameter schema, this module checks a pipeline folder's layout without torch,
so the API can refuse a wrong folder at once: `model_index.json` names a supported pipeline
class, and every weight file of its components is safetensors (a pickled `.bin` or `.ckpt`
could run code when loaded, so such a folder is refused).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from core.errors import InvalidInputError
from core.states import JobKind
from workers.families.base import (
    SEED_MAX,
    CheckpointEvery,
    Family,
    OpenAIShape,
    Resources,
    TrainSeed,
)

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
# An input picture's id: `file-<24 hex>`, an artifact id, or `<dataset id>/<path>`.
INPUT_REF_MAX = 1100
# The params that name input pictures (resolved to their bytes by the runner).
INPUT_FIELDS = ("image", "mask")
# A fine-tuned version's genq.json `kind`: a LoRA adapter served with its base.
LORA_KIND = "lora"
DATASET_KIND = "captioned_images"
LoraTarget = Literal["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"]
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
    image: str | None = Field(
        None,
        min_length=1,
        max_length=INPUT_REF_MAX,
        description="Image-to-image or inpainting: the input picture, by id: an uploaded input"
        " file (`POST /v1/files`, `file-...`), an output artifact of a job, or a data set"
        " item (`<dataset id>/<path in the data set>`). Unset: text-to-image.",
    )
    mask: str | None = Field(
        None,
        min_length=1,
        max_length=INPUT_REF_MAX,
        description="Inpainting: a black-and-white picture (same forms of id as `image`); white"
        " pixels are repainted, black ones keep the input's pixels. Needs `image`.",
    )
    strength: float = Field(
        0.8,
        ge=0,
        le=1,
        validate_default=True,
        description="With `image`: how much of the input is noised away (0 returns the input,"
        " 1 ignores it). Runs about steps x strength denoising steps.",
    )
    lora_scale: float = Field(
        1.0,
        ge=0,
        le=4,
        description="On a LoRA version: the adapter's weight (0 draws as the base model).",
    )
    preview_every: int | None = Field(
        None,
        ge=1,
        le=500,
        description="Send a small preview PNG (at most 128 pixels a side; output"
        " `preview-SSSS.png`, kind `preview`) of the first image every this many steps."
        " Unset: none.",
    )

    @field_validator("strength")
    @classmethod
    def _some_step(cls, strength: float, info: ValidationInfo) -> float:
        steps = info.data.get("steps")
        if info.data.get("image") is None or strength == 0 or not isinstance(steps, int):
            return strength
        if int(steps * strength) < 1:
            raise ValueError(f"steps x strength must reach 1 (or strength 0): {steps} x {strength}")
        return strength

    @field_validator("mask")
    @classmethod
    def _mask_needs_image(cls, mask: str | None, info: ValidationInfo) -> str | None:
        if mask is not None and info.data.get("image") is None:
            raise ValueError("`mask` needs `image` (inpainting repaints part of an input)")
        return mask

    @property
    def mode(self) -> str:
        """text2img, img2img or inpaint."""
        if self.image is None:
            return "text2img"
        return "img2img" if self.mask is None else "inpaint"


class SdFinetuneParams(BaseModel):
    """LoRA (Hu et al. 2021) on the UNet's attention projections; the rest frozen."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(4, ge=1, le=256, description="LoRA rank.")
    alpha: float = Field(4.0, gt=0, le=1024, description="LoRA scale numerator (alpha / rank).")
    target_modules: list[LoraTarget] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        min_length=1,
        max_length=8,
        description="The UNet attention projections that get adapters.",
    )
    steps: int = Field(500, ge=1, le=1_000_000, description="Optimizer steps.")
    learning_rate: float = Field(1e-4, gt=0, le=1.0)
    batch_size: int = Field(1, ge=1, le=64, description="Images per step.")
    resolution: int | None = Field(
        None,
        ge=16,
        le=2048,
        multiple_of=8,
        description="Training images are centre-cropped and resized to this square."
        " Unset: the model's native size.",
    )
    seed: TrainSeed = 0
    checkpoint_every: CheckpointEvery = 100


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


def batch_key(
    p: SdGenerateParams,
) -> tuple[int, float, int | None, int | None, str, float] | None:
    """Jobs share a pipeline call when they take the same steps, guidance, size, sampler and
    adapter weight; prompts, negative prompts, seeds and num_images are per job. (The server
    adds the adapter itself to the key: one call runs one adapter.) Image-to-image and
    inpainting jobs run alone."""
    if p.image is not None:
        return None
    return (p.steps, p.guidance, p.width, p.height, p.scheduler, p.lora_scale)


def is_adapter(config: dict[str, Any]) -> bool:
    """A registered version that holds only a LoRA adapter (served on its base's servers)."""
    return config.get("kind") == LORA_KIND and config.get("family") == "diffusers"


def check_model_params(kind: JobKind, params: dict[str, Any], config: dict[str, Any]) -> None:
    """At submit: what the registered version cannot do is a 422 now, not a failed job."""
    if kind == JobKind.FINETUNE and is_adapter(config):
        raise InvalidInputError.one(
            "model", "this version is a LoRA adapter: fine-tune its base model instead"
        )
    if kind == JobKind.FINETUNE and config.get("layout") == "sdxl":
        raise InvalidInputError.one(
            "model", "LoRA fine-tuning is for Stable Diffusion 1.x/2.x layouts, not XL"
        )


FAMILY = Family(
    name="diffusers",
    description="Any diffusers Stable Diffusion pipeline on disk (1.x/2.x, XL), registered"
    " with POST /v1/models: text-to-image, image-to-image, inpainting; LoRA fine-tuning on"
    " captioned images.",
    implementation="workers.families.sd_pipeline",
    generate_params=SdGenerateParams,
    finetune_params=SdFinetuneParams,
    dataset_kinds=(DATASET_KIND,),
    check_model_params=check_model_params,
    input_fields=INPUT_FIELDS,
    resources=Resources(num_gpus=1.0, num_cpus=1.0, gpu_memory_gb=8.0),
    max_batch_size=16,
    batch_key=batch_key,
    check_layout=check_layout,
    openai=OpenAIShape.IMAGES,
)
