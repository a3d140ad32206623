"""A fresh local Ray for a test module: `address="local"` always starts a new cluster, never
one already running on the host, and a pinned compute thread per worker keeps the tests' Ray
processes from fighting each other for the CPU (docs/tests.md)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def one_thread_workers() -> Iterator[None]:
    """OMP_NUM_THREADS=1 in this process's environment while Ray's daemons start in the block:
    each raylet passes it to every worker it starts. Not a job `runtime_env`: the workers a
    raylet starts ahead of the first driver (one per core) carry no runtime env, so a job
    with one could never use them; they sat idle and new workers were started beside them."""
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = before


@contextlib.contextmanager
def local_ray(
    num_cpus: int, num_gpus: int | None = None, resources: dict[str, Any] | None = None
) -> Iterator[None]:
    """Ray started for the block, with these CPUs, GPUs and custom resources declared (a GPU
    declared without one lets placement by GPU shares run on the CPU; None: the GPUs Ray
    finds)."""
    import ray  # here: tests/workers/conftest.py imports this where Ray may be missing

    with one_thread_workers():
        ray.init(
            address="local",
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            resources=resources,
            include_dashboard=False,
            namespace="genq",
            log_to_driver=False,
        )
    try:
        yield
    finally:
        ray.shutdown()
