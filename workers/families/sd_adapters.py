"""The LoRA adapters a `diffusers` server keeps loaded on its one base pipeline.

A LoRA version (sd_lora.py) is served by its base model's server: each job names its adapter
(the version's model id and its folder on this machine) in its RunContext. The adapter is
loaded into the pipeline's UNet the first time (`load_lora_weights`, under a name derived
from the model id), kept, and switched on per call (`set_adapters` with the job's weight); a
job on the base model disables the adapters (`disable_lora`). Past MAX_ADAPTERS the least
recently used is deleted (`delete_adapters`). The base weights are never reloaded.
"""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

from core.errors import ModelError

MAX_ADAPTERS = 16
ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name for it


def is_adapter_folder(folder: Path) -> bool:
    return (folder / ADAPTER_FILE).is_file()


def adapter_name(model_id: str) -> str:
    """A name peft accepts (no dots) for the adapter of a model id."""
    return "genq_" + re.sub(r"[^A-Za-z0-9_]", "_", model_id)


class AdapterCache:
    def __init__(self, pipe: Any, pinned: dict[str, str] | None = None) -> None:
        self.pipe = pipe
        # A server started on an adapter version's own folder serves it by default.
        self.pinned = pinned
        self.loaded: OrderedDict[str, str] = OrderedDict()  # model id -> adapter name
        self.loads = 0  # adapters read from disk

    def use(self, adapter: dict[str, str] | None, scale: float) -> None:
        """Make the pipeline draw with `adapter` ({"id", "dir"}) at weight `scale`, or with
        the base alone (None)."""
        adapter = adapter or self.pinned
        if adapter is None:
            if self.loaded:
                self.pipe.disable_lora()
            return
        name = self.loaded.get(adapter["id"])
        if name is None:
            name = self._load(adapter)
        self.loaded.move_to_end(adapter["id"])
        self.pipe.enable_lora()
        self.pipe.set_adapters([name], adapter_weights=[scale])

    def _load(self, adapter: dict[str, str]) -> str:
        folder = Path(adapter["dir"])
        if not (folder / ADAPTER_FILE).is_file():
            raise ModelError(f"the LoRA version has no {ADAPTER_FILE}")
        while len(self.loaded) >= MAX_ADAPTERS:
            _, oldest = self.loaded.popitem(last=False)
            self.pipe.delete_adapters(oldest)
        name = adapter_name(adapter["id"])
        try:
            with warnings.catch_warnings():
                # peft warns on every adapter after the first: several are what we want.
                warnings.filterwarnings("ignore", "Already found a `peft_config`", UserWarning)
                self.pipe.load_lora_weights(
                    str(folder), weight_name=ADAPTER_FILE, adapter_name=name
                )
        except Exception as exc:
            raise ModelError(
                f"the LoRA adapter does not load on this base: {type(exc).__name__}: {exc}"
            ) from None
        self.loaded[adapter["id"]] = name
        self.loads += 1
        return name
