"""Driving a model server (workers/server.py) from a test: run jobs to their end, one by one or
at once, how many jobs one shared forward passes with, the server's batching counters; and for
the text families' continuous batching (tests/workers/test_charlm_batching.py,
test_lm_batching.py) a job's text and what it streamed, a job started on a thread whose first
text the test can wait for, and the checks both families pass, each given the family's jobs."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray

from core.events import Metric, Output, TextDelta
from workers.families.base import CanceledError


def run_job(server: Any, job_id: str, params: dict[str, Any]) -> list[Any]:
    return [ray.get(ref) for ref in server.generate.remote(job_id, params)]


def run_together(server: Any, jobs: dict[str, dict[str, Any]]) -> dict[str, list[Any]]:
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {j: pool.submit(run_job, server, j, p) for j, p in jobs.items()}
        return {j: f.result() for j, f in futures.items()}


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
    """A job with a stop string that its text meets well after its first token (taken from
    its text without one), and the text it must end with."""
    params = {"prompt": "The lazy dog", "max_tokens": 120, "seed": 10}
    full = text(run_job(server, "stop-full", params))
    at = next(k for k in range(20, len(full) - 3) if full.find(full[k : k + 3]) == k)
    return {**params, "stop": ["\u2603", full[at : at + 3]]}, full[:at]


def check_jobs_join_a_running_batch(
    server: Any, jobs: dict[str, dict[str, Any]], long: dict[str, Any]
) -> dict[str, Output]:
    """`jobs` and a job with a stop string join the batch of the `long` job while it decodes
    (then canceled): each shares forward passes, streams its text, stops where it must, and
    gets the text and finish it gets alone. Their outputs, for the family's own checks."""
    jobs = dict(jobs)
    jobs["stop"], stopped = stop_job(server)
    before = stats(server)
    running = Started(server, "long", long)
    assert running.first_text.wait(60) and running.error is None
    # The long job is decoding: these join its batch between two of its steps.
    together = run_together(server, jobs)
    assert running.thread.is_alive(), "the long job ended before the others were done"
    assert ray.get(server.cancel.remote("long")) is True
    running.result()
    assert isinstance(running.error, CanceledError)

    after = stats(server)
    assert after["shared_steps"] > before["shared_steps"]
    assert after["largest_batch_jobs"] >= 2
    for job_id, events in together.items():
        assert shared_with(events) >= 2, job_id  # it shared forward passes
        assert streamed(events) == text(events), job_id  # the stream is the text
    out = {j: [e for e in events if isinstance(e, Output)][0] for j, events in together.items()}
    assert out["stop"].meta["finish_reason"] == "stop"
    assert text(together["stop"]) == stopped  # ends before its stop string, none of it sent

    for job_id, params in jobs.items():
        alone = run_job(server, f"{job_id}-alone", params)
        assert shared_with(alone) == 1
        assert text(alone) == text(together[job_id]), job_id
        assert (
            out[job_id].meta["finish_reason"]
            == [e for e in alone if isinstance(e, Output)][0].meta["finish_reason"]
        )
    return out


def check_a_cancel_leaves_the_others_text_intact(
    server: Any, long: dict[str, Any], meanwhile: Callable[[], None] | None = None
) -> None:
    """A `long` job is canceled while two others decode beside it (and `meanwhile` runs
    before the cancel): they share forward passes, end well, with the text they get alone."""
    victim = Started(server, "victim", {**long, "seed": 3})
    assert victim.first_text.wait(60) and victim.error is None
    others = {f"o{i}": {"prompt": "The quick", "max_tokens": 600, "seed": 20 + i} for i in range(2)}
    running = {j: Started(server, j, p) for j, p in others.items()}
    for job in running.values():
        assert job.first_text.wait(60) and job.error is None
    if meanwhile is not None:
        meanwhile()
    assert ray.get(server.cancel.remote("victim")) is True
    victim.result()
    assert isinstance(victim.error, CanceledError)
    for job_id, job in running.items():
        events = job.result()
        assert job.error is None
        assert shared_with(events) >= 2
        assert text(events) == text(run_job(server, f"{job_id}-alone", others[job_id]))
    assert ray.get(server.info.remote())["active_jobs"] == []


def check_the_batch_limit_of_two(small: Any, max_tokens: int) -> None:
    """Four jobs at once on a server whose batches hold two rows: none shares with more."""
    jobs = {f"r{i}": {"prompt": "The", "max_tokens": max_tokens, "seed": i} for i in range(4)}
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: run_job(small, j, jobs[j]), jobs))
    assert all(shared_with(events) <= 2 for events in results)
    info = stats(small)
    assert info["max_batch_size"] == 2 and info["largest_batch_jobs"] <= 2
