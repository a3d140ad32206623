"""Fixtures of the fault-injection tests (the harness: tests/support/faults.py): a Ray head per
module, and per test a `Cluster` on the database `backend` names ("sqlite" or "postgres")."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.faults import Cluster, RayHead, running_ray_head


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    with running_ray_head(tmp_path_factory.mktemp("ray")) as head:
        yield head


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
