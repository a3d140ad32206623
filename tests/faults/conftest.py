"""Fixtures of the fault-injection tests (the harness: tests/support/faults.py): a Ray head per
module, and per test a `Cluster` on the database `backend` names ("sqlite" or "postgres")."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.settings import Settings
from stack.supervisor import Stack
from tests.support.faults import Cluster, RayHead


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    var_dir = tmp_path_factory.mktemp("ray")
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        var_dir=var_dir,
        ray_num_cpus=4,
        ray_num_gpus=1,  # declared only: proves that a GPU share is given back
    )
    stack = Stack(settings)
    stack.env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    stack.start_ray()
    yield RayHead(stack, var_dir)
    stack.stop()


@pytest.fixture
def cluster(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    backend: str,
    ray_head: RayHead,
    redis_db_url: str,
) -> Iterator[Cluster]:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'genq.db'}"
    else:
        url = str(request.getfixturevalue("fresh_pg_url"))
    c = Cluster(tmp_path, url, ray_head, redis_db_url)
    yield c
    c.close()
