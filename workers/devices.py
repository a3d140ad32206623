"""The GPUs of this machine, as a Ray node declares them: how many, and their memory.

`genq node` asks here before it starts its Ray node, so that the node declares only the GPUs
this machine (or container) can see, honouring CUDA_VISIBLE_DEVICES as torch does, and their
total memory as the custom resource `gpu_memory_gb` (workers/families/base.py). torch is
imported only when asked, and a machine without CUDA has no GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

BYTES_PER_GB = 1024**3


@dataclass(frozen=True)
class Gpus:
    count: int
    memory_gb: float  # all of them together, rounded down to a tenth


def detect_gpus() -> Gpus:
    """The CUDA devices torch sees here; none without torch or CUDA."""
    try:
        import torch
    except ImportError:
        return Gpus(0, 0.0)
    if not torch.cuda.is_available():
        return Gpus(0, 0.0)
    count = torch.cuda.device_count()
    total = sum(torch.cuda.get_device_properties(i).total_memory for i in range(count))
    return Gpus(count, int(10 * total / BYTES_PER_GB) / 10)
