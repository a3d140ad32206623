"""Fixtures the worker tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.ray_cluster import local_ray


@pytest.fixture(scope="module")
def ray_four_cpus() -> Iterator[None]:
    """A local Ray for the module's model servers: four CPUs and one GPU, declared only (the
    families ask for a GPU share; the servers run on the CPU)."""
    with local_ray(num_cpus=4, num_gpus=1):
        yield
