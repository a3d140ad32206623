"""A fresh local Ray for a test module: `address="local"` always starts a new cluster, never
one already running on the host, and a pinned compute thread per worker keeps the tests' Ray
processes from fighting each other for the CPU (docs/tests.md)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def local_ray(
    num_cpus: int, num_gpus: int | None = None, resources: dict[str, Any] | None = None
) -> Iterator[None]:
    """Ray started for the block, with these CPUs, GPUs and custom resources declared (a GPU
    declared without one lets placement by GPU shares run on the CPU; None: the GPUs Ray
    finds)."""
    import ray  # here: tests/workers/conftest.py imports this where Ray may be missing

    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        resources=resources,
        include_dashboard=False,
        namespace="genq",
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    try:
        yield
    finally:
        ray.shutdown()
