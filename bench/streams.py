"""Event streams, two benchmarks.

What open event streams do to everyone else: N clients stream the events of long jobs from a
real `genq up` (2 API processes of 16 threads), and meanwhile GET /v1/jobs/{id} is timed.

    .venv/bin/python bench/streams.py [--streams 40] [--samples 20]

Two runs side by side: the default (each API process keeps at most half its threads for
streams, GENQ_API_MAX_STREAMS unset) and the baseline where every thread may hold a stream
(GENQ_API_MAX_STREAMS = GENQ_API_THREADS, which is how genq behaved before the limit). A request
that gets no answer in 10 s counts as timed out. Figures are printed and written to
bench/results/streams-<UTC time>.json.

What streaming text costs and how soon a follower sees it: `--text` (bench/stream_text.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402
from tests.support.stackproc import StackProcess  # noqa: E402

REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")
THREADS = 16
TIMEOUT_S = 10.0


def run(streams: int, samples: int, max_streams: int | None) -> dict[str, Any]:
    broker = f"{REDIS}/12"
    redis.Redis.from_url(broker).flushdb()
    env = {
        "GENQ_REDIS_URL": broker,
        "GENQ_LOG_LEVEL": "WARNING",
        "GENQ_API_WORKERS": "2",
        "GENQ_API_THREADS": str(THREADS),
    }
    if max_streams is not None:
        env["GENQ_API_MAX_STREAMS"] = str(max_streams)
    stack = StackProcess(Path(tempfile.mkdtemp(prefix="genq-streams-")) / "var", env)
    stack.env.update(env)
    headers = {"Authorization": ""}
    answers: list[int | str] = []
    try:
        stack.start()
        headers["Authorization"] = f"Bearer {stack.admin_key}"
        long_job = {"kind": "generate", "model": "echo", "params": {"delay_s": 120}}
        ids = [stack.submit(long_job)["id"] for _ in range(streams)]

        def follow(job_id: str) -> None:
            try:
                with requests.get(
                    f"{stack.url}/v1/jobs/{job_id}/events",
                    headers=headers,
                    stream=True,
                    timeout=(TIMEOUT_S, 300),
                ) as response:
                    answers.append(response.status_code)
                    for _ in response.iter_lines():
                        pass
            except requests.RequestException as exc:
                answers.append(type(exc).__name__)

        for job_id in ids:
            threading.Thread(target=follow, args=(job_id,), daemon=True).start()
        time.sleep(3)  # every stream has been answered or is waiting for a thread
        latencies_ms, timed_out = [], 0
        for i in range(samples):
            started = time.perf_counter()
            try:
                requests.get(
                    f"{stack.url}/v1/jobs/{ids[i % len(ids)]}", headers=headers, timeout=TIMEOUT_S
                ).raise_for_status()
                latencies_ms.append((time.perf_counter() - started) * 1000)
            except requests.Timeout:
                timed_out += 1
        stack.stop()  # (the long jobs end with it; a cancel could wait for a thread too)
    finally:
        stack.kill()
    return {
        "max_streams_per_process": max_streams if max_streams is not None else THREADS // 2,
        "streams_open": answers.count(200),
        "streams_refused_503": answers.count(503),
        "get_job_answered": len(latencies_ms),
        "get_job_timed_out": timed_out,
        "get_job_p50_ms": round(statistics.median(latencies_ms), 1) if latencies_ms else None,
        "get_job_max_ms": round(max(latencies_ms), 1) if latencies_ms else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=40)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--text", action="store_true", help="the streaming-text bench instead")
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0, help="tokens made per second")
    args = parser.parse_args()
    if args.text:
        from bench.stream_text import main as text_main

        text_main(args.tokens, args.rate)
        return
    default = run(args.streams, args.samples, None)
    every_thread = run(args.streams, args.samples, THREADS)
    result = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores",
        "api": f"2 processes x {THREADS} threads",
        "streams_asked": args.streams,
        "default": default,
        "baseline_every_thread_may_stream": every_thread,
    }
    for name, figures in (("default", default), ("every thread", every_thread)):
        print(
            f"{name:>13}: {figures['streams_open']} streams open, "
            f"{figures['streams_refused_503']} refused (503); GET /v1/jobs/{{id}}: "
            f"{figures['get_job_answered']} answered (p50 {figures['get_job_p50_ms']} ms, "
            f"max {figures['get_job_max_ms']} ms), {figures['get_job_timed_out']} timed out "
            f"after {TIMEOUT_S:.0f} s"
        )
    write_result("streams", result)


if __name__ == "__main__":
    main()
