"""Continuous batching of the `transformers` family through a real model server on a real local
Ray, with the tiny GPT-2-shaped model the tests build from config: concurrent jobs share forward
passes (the server counts them), jobs join a running batch and leave it when their text ends,
a cancel or a bad job takes one row out and the others' text stays what it is alone, and each
job keeps its own seed, sampling parameters and stop strings.

The model's weights are drawn as GPT-2's (standard deviation 0.02), not as the wider default of
build_tiny_lm: a row's logits in a batch differ from alone by float rounding, and with the
wider weights that rounding decides about one token in 6,000 (docs/batching.md); with these, its
logits are small enough that none of 64 jobs of 100 tokens changed in a batch of 64."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("transformers")

from core.errors import InvalidInputError  # noqa: E402
from tests.support.model_servers import (  # noqa: E402
    check_a_cancel_leaves_the_others_text_intact,
    check_jobs_join_a_running_batch,
    check_the_batch_limit_of_two,
    run_job,
    run_together,
    text,
)
from tests.support.pretrained_models import build_tiny_lm  # noqa: E402
from workers.registry import get_family  # noqa: E402
from workers.routing import get_model_server  # noqa: E402
from workers.server import ServingOptions  # noqa: E402

# One local Ray for the module (tests/workers/conftest.py).
pytestmark = pytest.mark.usefixtures("ray_four_cpus")

LM = get_family("transformers")
OPTIONS = ServingOptions(idle_unload_s=None)
# A long job: it is still decoding when the jobs sent after its first token arrive (its
# 900 steps take seconds; a job reaches the server in milliseconds).
LONG = {"prompt": "The quick brown fox", "max_tokens": 900, "seed": 1}
JOBS = {
    "greedy": {"prompt": "genq runs", "max_tokens": 60, "temperature": 0},
    "hot": {"prompt": "A painting of a red fox in the snow,", "max_tokens": 80, "seed": 7,
            "temperature": 1.3},
    "topk": {"prompt": "def", "max_tokens": 70, "seed": 8, "top_k": 5},
    "topp": {"prompt": "Stable diffusion turns", "max_tokens": 50, "seed": 9, "top_p": 0.7},
    "chat": {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 40, "seed": 11},
}  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    folder = build_tiny_lm(tmp_path_factory.mktemp("lm") / "lm", context=1024, init=0.02)
    handle = get_model_server("lm-batching", LM, str(folder), {}, OPTIONS)
    yield handle
    ray.kill(handle)


def test_jobs_join_a_running_batch_and_get_the_text_they_get_alone(server: Any) -> None:
    out = check_jobs_join_a_running_batch(server, JOBS, LONG)
    assert out["greedy"].meta["completion_tokens"] <= 60


def test_a_cancel_or_a_bad_job_leaves_the_others_text_intact(server: Any) -> None:
    def a_bad_job() -> None:
        # A prompt and max_tokens beyond the model's context: refused at its join, alone.
        bad = {"prompt": "The quick brown fox " * 60, "max_tokens": 900, "seed": 1}
        with pytest.raises(InvalidInputError):
            run_job(server, "bad", bad)

    check_a_cancel_leaves_the_others_text_intact(server, LONG, meanwhile=a_bad_job)


def test_each_job_keeps_its_own_seed(server: Any) -> None:
    params = {"prompt": "A painting", "max_tokens": 50, "temperature": 1.0}
    jobs = {"s1": {**params, "seed": 5}, "s1-again": {**params, "seed": 5}, "s2": {**params,
            "seed": 6}}  # fmt: skip
    together = {j: text(events) for j, events in run_together(server, jobs).items()}
    assert together["s1"] == together["s1-again"]
    assert together["s1"] != together["s2"]
    assert together["s2"] == text(run_job(server, "s2-alone", jobs["s2"]))


def test_the_family_batch_limit_can_be_lowered(tmp_path: Path) -> None:
    folder = build_tiny_lm(tmp_path / "lm")
    small = get_model_server(
        "lm-two-rows", LM, str(folder), {}, ServingOptions(idle_unload_s=None, batch_max_rows=2)
    )
    check_the_batch_limit_of_two(small, max_tokens=100)
    ray.kill(small)
