"""Continuous batching of the `charlm` family through a real model server on a real local Ray,
with the tiny preset built from config (seeded, untrained): concurrent jobs share forward
passes (the server counts them), jobs join a running batch and leave it when their text ends,
a cancel takes one row out and the others' text stays what it is alone, and each
job keeps its own seed, sampling parameters and stop strings."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

ray = pytest.importorskip("ray")

from core.events import Metric, Output, TextDelta  # noqa: E402
from workers.families.base import CanceledError  # noqa: E402
from workers.families.charlm import PRESETS, build  # noqa: E402
from workers.families.checkpoints import save_model  # noqa: E402
from workers.registry import get_family  # noqa: E402
from workers.routing import get_model_server  # noqa: E402
from workers.server import ServingOptions  # noqa: E402

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


@pytest.fixture(scope="module", autouse=True)
def ray_cluster() -> Iterator[None]:
    ray.init(
        address="local",
        num_cpus=4,
        num_gpus=1,  # declared only: the family asks for a GPU share, the server runs on the CPU
        include_dashboard=False,
        namespace="genq",
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    folder = tmp_path_factory.mktemp("charlm") / "model"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        save_model(build(CONFIG), CONFIG, folder)
    handle = get_model_server("charlm-batching", CHARLM, str(folder), CONFIG, OPTIONS)
    yield handle
    ray.kill(handle)


def run_job(server: Any, job_id: str, params: dict[str, Any]) -> list[Any]:
    return [ray.get(ref) for ref in server.generate.remote(job_id, params)]


def text(events: list[Any]) -> str:
    (output,) = [e for e in events if isinstance(e, Output)]
    return bytes(output.data).decode()


def streamed(events: list[Any]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def shared_with(events: list[Any]) -> float:
    (metric,) = [e for e in events if isinstance(e, Metric) and "batch_jobs" in e.values]
    return metric.values["batch_jobs"]


def stats(server: Any) -> dict[str, Any]:
    return dict(ray.get(server.info.remote())["batching"])


class Started:
    """Runs a job on a thread, and tells when its first piece of text has come."""

    def __init__(self, server: Any, job_id: str, params: dict[str, Any]) -> None:
        self.events: list[Any] = []
        self.error: BaseException | None = None
        self.first_text = threading.Event()
        self.server, self.job_id, self.params = server, job_id, params
        self.thread = threading.Thread(target=self._consume)
        self.thread.start()

    def _consume(self) -> None:
        try:
            for ref in self.server.generate.remote(self.job_id, self.params):
                self.events.append(ray.get(ref))
                if isinstance(self.events[-1], TextDelta):
                    self.first_text.set()
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            self.error = exc
        finally:
            self.first_text.set()

    def result(self) -> list[Any]:
        self.thread.join()
        return self.events


def stop_job(server: Any) -> tuple[dict[str, Any], str]:
    """A job with a stop string that its text meets well after its first byte (taken from its
    text without one), and the text it must end with."""
    params = {"prompt": "The lazy dog", "max_tokens": 120, "seed": 10}
    full = text(run_job(server, "stop-full", params))
    at = next(k for k in range(20, len(full) - 3) if full.find(full[k : k + 3]) == k)
    return {**params, "stop": ["\u2603", full[at : at + 3]]}, full[:at]


def test_jobs_join_a_running_batch_and_get_the_text_they_get_alone(server: Any) -> None:
    jobs = dict(JOBS)
    jobs["stop"], stopped = stop_job(server)
    before = stats(server)
    long = Started(server, "long", LONG)
    assert long.first_text.wait(60) and long.error is None
    # The long job is decoding: these join its batch between two of its steps.
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {j: pool.submit(run_job, server, j, p) for j, p in jobs.items()}
        together = {j: f.result() for j, f in futures.items()}
    assert long.thread.is_alive(), "the long job ended before the others were done"
    assert ray.get(server.cancel.remote("long")) is True
    long.result()
    assert isinstance(long.error, CanceledError)

    after = stats(server)
    assert after["shared_steps"] > before["shared_steps"]
    assert after["largest_batch_jobs"] >= 2
    for job_id, events in together.items():
        assert shared_with(events) >= 2, job_id  # it shared forward passes
        assert streamed(events) == text(events), job_id  # the stream is the text
    out = {j: [e for e in events if isinstance(e, Output)][0] for j, events in together.items()}
    assert out["stop"].meta["finish_reason"] == "stop"
    assert text(together["stop"]) == stopped  # ends before its stop string, none of it sent
    assert out["greedy"].meta["completion_tokens"] == 60

    for job_id, params in jobs.items():
        alone = run_job(server, f"{job_id}-alone", params)
        assert shared_with(alone) == 1
        assert text(alone) == text(together[job_id]), job_id
        assert (
            out[job_id].meta["finish_reason"]
            == [e for e in alone if isinstance(e, Output)][0].meta["finish_reason"]
        )


def test_a_cancel_leaves_the_others_text_intact(server: Any) -> None:
    victim = Started(server, "victim", {**LONG, "seed": 3})
    assert victim.first_text.wait(60) and victim.error is None
    others = {f"o{i}": {"prompt": "The quick", "max_tokens": 600, "seed": 20 + i} for i in range(2)}
    running = {j: Started(server, j, p) for j, p in others.items()}
    for job in running.values():
        assert job.first_text.wait(60) and job.error is None
    assert ray.get(server.cancel.remote("victim")) is True
    victim.result()
    assert isinstance(victim.error, CanceledError)
    for job_id, job in running.items():
        events = job.result()
        assert job.error is None
        assert shared_with(events) >= 2
        assert text(events) == text(run_job(server, f"{job_id}-alone", others[job_id]))
    assert ray.get(server.info.remote())["active_jobs"] == []


def test_each_job_keeps_its_own_seed(server: Any) -> None:
    params = {"prompt": "A painting", "max_tokens": 300, "temperature": 1.0}
    jobs = {"s1": {**params, "seed": 5}, "s1-again": {**params, "seed": 5}, "s2": {**params,
            "seed": 6}}  # fmt: skip
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {j: pool.submit(run_job, server, j, p) for j, p in jobs.items()}
        results = {j: f.result() for j, f in futures.items()}
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
    jobs = {f"r{i}": {"prompt": "The", "max_tokens": 400, "seed": i} for i in range(4)}
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: run_job(small, j, jobs[j]), jobs))
    assert all(shared_with(events) <= 2 for events in results)
    info = stats(small)
    assert info["max_batch_size"] == 2 and info["largest_batch_jobs"] <= 2
    ray.kill(small)
