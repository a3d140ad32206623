"""Continuous batching of the `charlm` family through a real model server on a real local Ray,
with the tiny preset built from config (seeded, untrained): concurrent jobs share forward
passes (the server counts them), jobs join a running batch and leave it when their text ends,
a cancel takes one row out and the others' text stays what it is alone, and each
job keeps its own seed, sampling parameters and stop strings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

ray = pytest.importorskip("ray")

from tests.support.model_servers import (  # noqa: E402
    check_a_cancel_leaves_the_others_text_intact,
    check_jobs_join_a_running_batch,
    check_the_batch_limit_of_two,
    run_job,
    run_together,
    shared_with,
    text,
)
from workers.families.charlm import PRESETS, build  # noqa: E402
from workers.families.checkpoints import save_model  # noqa: E402
from workers.registry import get_family  # noqa: E402
from workers.routing import get_model_server  # noqa: E402
from workers.server import ServingOptions  # noqa: E402

# One local Ray for the module (tests/workers/conftest.py).
pytestmark = pytest.mark.usefixtures("ray_four_cpus")

CHARLM = get_family("charlm")
# As the stack serves: text is sent at most every 50 ms per job, not a Ray message per byte
# (the server would otherwise run far ahead of a reader of thousands of messages, and finish
# a long job before the test's cancel reaches it).
OPTIONS = ServingOptions(idle_unload_s=None, progress_interval_s=0.5)
CONFIG = {"family": "charlm", "preset": "tiny", **PRESETS["tiny"]}
# A long job: it is still decoding when the jobs sent after its first byte arrive (its 8,000
# steps take seconds; a job reaches the server in milliseconds).
LONG = {"prompt": "The quick brown fox", "max_tokens": 8000, "seed": 1}
JOBS = {
    "greedy": {"prompt": "genq runs", "max_tokens": 60, "temperature": 0},
    "hot": {"prompt": "A painting of a red fox", "max_tokens": 80, "seed": 7, "temperature": 1.3},
    "topk": {"prompt": "def", "max_tokens": 70, "seed": 8, "top_k": 5},
    "topp": {"prompt": "Stable diffusion turns", "max_tokens": 50, "seed": 9, "top_p": 0.7},
    "empty": {"prompt": "", "max_tokens": 40, "seed": 11},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    folder = tmp_path_factory.mktemp("charlm") / "model"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        save_model(build(CONFIG), CONFIG, folder)
    handle = get_model_server("charlm-batching", CHARLM, str(folder), CONFIG, OPTIONS)
    yield handle
    ray.kill(handle)


def test_jobs_join_a_running_batch_and_get_the_text_they_get_alone(server: Any) -> None:
    out = check_jobs_join_a_running_batch(server, JOBS, LONG)
    assert out["greedy"].meta["completion_tokens"] == 60


def test_a_cancel_leaves_the_others_text_intact(server: Any) -> None:
    check_a_cancel_leaves_the_others_text_intact(server, LONG)


def test_each_job_keeps_its_own_seed(server: Any) -> None:
    params = {"prompt": "A painting", "max_tokens": 300, "temperature": 1.0}
    jobs = {"s1": {**params, "seed": 5}, "s1-again": {**params, "seed": 5}, "s2": {**params,
            "seed": 6}}  # fmt: skip
    results = run_together(server, jobs)
    together = {j: text(events) for j, events in results.items()}
    assert max(shared_with(events) for events in results.values()) >= 2
    assert together["s1"] == together["s1-again"]
    assert together["s1"] != together["s2"]
    assert together["s2"] == text(run_job(server, "s2-alone", jobs["s2"]))


def test_the_family_batch_limit_can_be_lowered(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    save_model(build(CONFIG), CONFIG, folder)
    small = get_model_server(
        "charlm-two-rows",
        CHARLM,
        str(folder),
        CONFIG,
        ServingOptions(idle_unload_s=None, batch_max_rows=2),
    )
    check_the_batch_limit_of_two(small, max_tokens=400)
    ray.kill(small)
