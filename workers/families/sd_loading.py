"""Loading a Stable Diffusion pipeline from a folder on this machine, in the precision its
device wants: shared by the server (sd_pipeline.py) and the LoRA trainer (sd_lora.py), which
load the same folders the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from core.errors import ModelError
from workers.families.sd_spec import check_layout

# Pipelines loaded from disk by this process (tests count them: switching adapters loads none).
BASE_LOADS = [0]


def dtype_for(device: str) -> torch.dtype:
    return torch.float16 if device.startswith("cuda") else torch.float32


def load_pipeline(path: Path, device: str, dtype: torch.dtype | None = None) -> Any:
    """The pipeline of the folder, on `device`, in the right precision; ModelError if it does
    not load."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        layout = check_layout(path)
    except Exception as exc:
        raise ModelError(str(getattr(exc, "detail", exc))) from None
    cls = getattr(diffusers, layout["pipeline"])
    try:
        pipe = cls.from_pretrained(
            str(path),
            dtype=dtype or dtype_for(device),
            use_safetensors=True,
            local_files_only=True,
        )
    except Exception as exc:
        raise ModelError(f"the pipeline does not load: {type(exc).__name__}: {exc}") from None
    BASE_LOADS[0] += 1
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
