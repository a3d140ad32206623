"""The two ways to drive a model server through Ray, side by side in one run: the streaming
`generate` call (one ObjectRef per event, what the runner used until 2026-12-06) and the way
the runner reads a server now (workers/server.py): the plain `start` call, whose answer is a
list of the job's first events (all of them for a quick job), then, for a job still running,
a `follow` stream of the rest. An `echo` server is started in a local Ray instance; jobs are
sent from 1 and from 8 threads (the Celery worker's default), each job read to its end, and
the CPU time of this process (the caller) and of the server's process is counted per job,
with the share of jobs whose `start` answer ended them.

    .venv/bin/python bench/server_calls.py [--jobs 400] [--rounds 2]

Each round runs both ways in turn (their order swapped every round), so both meet the same
machine. Figures (ms of CPU per job for the caller and the server, jobs/s) and the ratios of
the started way to the streamed one are printed and written to
bench/results/server-calls-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import ray

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402
from bench.cpu_per_job import TICK_S  # noqa: E402
from workers.actors import start_model_server  # noqa: E402
from workers.registry import get_family  # noqa: E402
from workers.server import ServingOptions, attempt_key  # noqa: E402

PARAMS = {"message": "x"}
WARM_JOBS = 30


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Ways:
    """One job through the server each way; every job has its own id and attempt."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self._ids = itertools.count()
        # Jobs of the started way whose first answer carried them to their end.
        self.ended_at_start = 0

    def _job(self) -> tuple[str, str]:
        n = next(self._ids)
        return f"job-{n}", f"token-{n}"

    def streamed(self) -> int:
        job_id, token = self._job()
        refs = self.server.generate.options(num_returns="streaming").remote(job_id, PARAMS, token)
        events = 0
        while True:
            if not ray.wait([refs], timeout=1.0)[0]:
                continue
            try:
                ref = next(refs)
            except StopIteration:
                return events
            ray.get(ref)
            events += 1

    def started(self) -> int:
        job_id, token = self._job()
        first = self.server.start.remote(job_id, PARAMS, token, wait_s=0.5)
        events, ended = ray.get(first)
        count = len(events)
        if ended:
            self.ended_at_start += 1
            return count
        for ref in self.server.follow.remote(attempt_key(job_id, token)):
            ray.get(ref)
            count += 1
        return count


def measure(run_one: Callable[[], int], jobs: int, threads: int, server_pid: int) -> dict:
    per_thread = jobs // threads
    events: list[int] = []

    def loop() -> None:
        for _ in range(per_thread):
            events.append(run_one())

    caller0, server0, start = own_cpu_s(), process_cpu_s(server_pid), time.perf_counter()
    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed_s = time.perf_counter() - start
    done = per_thread * threads
    return {
        "caller_cpu_ms_per_job": 1000 * (own_cpu_s() - caller0) / done,
        "server_cpu_ms_per_job": 1000 * (process_cpu_s(server_pid) - server0) / done,
        "jobs_per_s": done / elapsed_s,
        "events_per_job": statistics.mean(events),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=400, help="jobs per way, round and threads")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        server = start_model_server(
            "model-bench-server-calls", get_family("echo"), None, {}, ServingOptions()
        )
        server_pid = cast(int, ray.get(server.ping.remote()))
        ways = Ways(server)
        named = {"streamed": ways.streamed, "started": ways.started}
        for _ in range(WARM_JOBS):
            ways.streamed()
            ways.started()
        ways.ended_at_start = 0
        runs: dict[str, list[dict]] = {}
        for round_no in range(args.rounds):
            for threads in (1, 8):
                order = ["streamed", "started"] if round_no % 2 == 0 else ["started", "streamed"]
                for way in order:
                    figures = measure(named[way], args.jobs, threads, server_pid)
                    runs.setdefault(f"{way}.threads_{threads}", []).append(figures)
                    print(
                        f"round {round_no + 1}, {threads} thread(s), {way}: "
                        f"caller {figures['caller_cpu_ms_per_job']:.2f} ms, server "
                        f"{figures['server_cpu_ms_per_job']:.2f} ms per job, "
                        f"{figures['jobs_per_s']:.0f} jobs/s"
                    )
    finally:
        ray.shutdown()

    started_jobs = sum(len(figures) for key, figures in runs.items() if key.startswith("started"))
    result: dict[str, Any] = {
        "machine": f"{os.cpu_count()} cores",
        "jobs": args.jobs,
        "started_ended_in_first_answer": round(ways.ended_at_start / (started_jobs * args.jobs), 3),
    }
    for key, figures in runs.items():
        result[key] = {
            name: round(statistics.mean(f[name] for f in figures), 2) for name in figures[0]
        }
    for threads in (1, 8):
        streamed = result[f"streamed.threads_{threads}"]
        started = result[f"started.threads_{threads}"]
        result[f"ratio_started_to_streamed.threads_{threads}"] = {
            name: round(started[name] / streamed[name], 2)
            for name in ("caller_cpu_ms_per_job", "server_cpu_ms_per_job", "jobs_per_s")
        }
    for key, value in result.items():
        print(f"{key}: {value}")
    write_result("server-calls", result)


if __name__ == "__main__":
    main()
