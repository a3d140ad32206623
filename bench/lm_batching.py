"""Continuous batching of a language model on the CPU: 16 concurrent generate jobs of a
`transformers` (or, with --family charlm, a `charlm`) model against the same 16 jobs one at a
time, side by side in one run, at two levels:

1. the model server: a real `ModelServer` Ray actor (as the test suite starts it, with the
   stack's progress interval), called from 16 threads at once (as 16 Celery tasks would) and
   then one call at a time;
2. through the queue: a real `genq up` (API, SQLite, Redis, Celery, Ray), 16 jobs submitted
   over HTTP at once and then one at a time, each waited for by polling. This is the figure a
   user feels.

    .venv/bin/python bench/lm_batching.py [--family charlm] [--jobs 16] [--max-tokens 100]
        [--rounds 3] [--no-stack] [--no-server]

Workload: the tiny GPT-2-shaped model the tests build from config
(tests/support/pretrained_models.py: 2 layers, 32 wide, 128 positions, a byte-level BPE of 400
tokens), or charlm's `tiny` preset (1 layer, 32 wide, a context of 32 bytes; at the model
server built from config, seeded, untrained; through the queue trained for 20 steps on the
built-in `pydocs` text, as a charlm model is registered by training it), prompt "The quick
brown fox", `--max-tokens` sampled tokens (charlm: bytes) per job (temperature 1, each job its
own seed). Tokens/s counts the tokens the jobs made (a job may end early at its end-of-text
token), over the wall time from the first call (submit) to the last job done. The concurrent
and one-at-a-time runs alternate for `--rounds` rounds so that load from other processes on
this shared machine falls on both alike; medians are reported. The model server runs with one
CPU thread.

Figures: tokens/s of each way and the ratio concurrent / one at a time (issue #19's target:
>= 4x with 16 jobs), the largest batch the server formed and the share of forward passes that
were shared, and where a job's time went through the queue (medians of each job's time from
submit to start, and from start to finish, from the job's own timestamps). Polls read SQL
(GENQ_STATUS_STALENESS_S=0), so a job is seen done when it is. Written to
bench/results/lm-batching[-charlm]-<UTC time>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.pretrained_models import build_tiny_lm  # noqa: E402

WORKLOADS = {
    "transformers": "tiny GPT-2-shaped LM (2 layers, 32 wide)",
    "charlm": "charlm tiny preset (1 layer, 32 wide, 32-byte context)",
}

POLL_S = 0.05
PROMPT = "The quick brown fox"


def params(i: int, max_tokens: int) -> dict[str, Any]:
    return {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 1.0, "seed": 1000 + i}


def side_by_side(
    one: Callable[[int], int], n: int, rounds: int, way: list[str] | None = None
) -> tuple[list[float], list[float]]:
    """tokens/s of n jobs one at a time and of n at once, `rounds` times alternately; `one(i)`
    runs job i to its end and returns the tokens it made. `way[0]` says which runs now."""
    way = way if way is not None else [""]
    way[0] = "warm"
    one(n + 1)  # warm: the model server's load and first call are paid by neither way
    alone, together = [], []
    for _ in range(rounds):
        way[0] = "alone"
        start = time.perf_counter()
        tokens = sum(one(i) for i in range(n))
        alone.append(tokens / (time.perf_counter() - start))
        way[0] = "together"
        start = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            tokens = sum(pool.map(one, range(n)))
        together.append(tokens / (time.perf_counter() - start))
    return alone, together


def build_model(family: str) -> Path:
    """The model folder of the bench's workload."""
    folder = Path(tempfile.mkdtemp(prefix="genq-bench-lm-model-")) / "lm"
    if family == "transformers":
        return Path(build_tiny_lm(folder))
    import torch

    from workers.families.charlm import PRESETS, build
    from workers.families.checkpoints import save_model

    torch.manual_seed(0)
    save_model(build({"preset": "tiny", **PRESETS["tiny"]}), charlm_config(), folder)
    return folder


def charlm_config() -> dict[str, Any]:
    from workers.families.charlm import PRESETS

    return {"family": "charlm", "preset": "tiny", **PRESETS["tiny"]}


def server_level(family: str, folder: Path, n: int, max_tokens: int, rounds: int) -> dict[str, Any]:
    import ray

    from core.events import Output
    from workers.registry import get_family
    from workers.routing import get_model_server
    from workers.server import ServingOptions, attempt_key

    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=1,  # declared only: the family asks for a GPU, the server runs on the CPU
        include_dashboard=False,
        namespace="genq",
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    try:
        # As `genq up` serves it: the runner records progress every 0.5 s (the setting's
        # default), so the server passes progress on, and coalesces streamed text, as there.
        options = ServingOptions(progress_interval_s=0.5, idle_unload_s=None)
        config = charlm_config() if family == "charlm" else {}
        server = get_model_server("bench-lm", get_family(family), str(folder), config, options)

        def one(i: int) -> int:
            # As the runner reads a server (scheduler/runner.py): the answer to `start`, then
            # a `follow` stream of the rest while the job runs on.
            job_id, token = f"job-{i}-{time.monotonic_ns()}", "bench"
            answer = server.start.remote(job_id, params(i, max_tokens), token, wait_s=0.5)
            events, ended = ray.get(answer)
            if not ended:
                stream = server.follow.remote(attempt_key(job_id, token))
                events += [ray.get(ref) for ref in stream]
            for event in events:
                if isinstance(event, Output):
                    return int(event.meta["completion_tokens"])
            raise AssertionError("a job ended without its output")

        alone, together = side_by_side(one, n, rounds)
        stats = ray.get(server.info.remote())["batching"]
        ray.kill(server)
    finally:
        ray.shutdown()
    return {"alone": alone, "together": together, "server_stats": stats}


def stack_level(family: str, folder: Path, n: int, max_tokens: int, rounds: int) -> dict[str, Any]:
    from genq_client import Client
    from tests.support.stackproc import StackProcess

    tmp = Path(tempfile.mkdtemp(prefix="genq-bench-lm-"))
    stack = StackProcess(
        tmp / "var",
        {
            "GENQ_RAY_NUM_CPUS": "2",
            "GENQ_WORKER_CONCURRENCY": str(n + 2),  # every job holds a thread while it runs
            # Polls read SQL: a poll may otherwise see a job's end up to a second late (the
            # rendered job is kept that long, api/polling.py), which would time the cache,
            # not the jobs, and weigh most on the one-at-a-time run.
            "GENQ_STATUS_STALENESS_S": "0",
        },
    )
    try:
        stack.start()
        if family == "charlm":  # a charlm model is registered by training it
            train = {"kind": "train", "family": "charlm", "dataset": "pydocs", "name": "lm"}
            train["params"] = {"preset": "tiny", "steps": 20, "batch_size": 8, "seed": 0}
            trained = stack.wait(stack.submit(train)["id"])
            assert trained["state"] == "succeeded", trained
        else:
            with Client(stack.url, stack.admin_key) as genq:
                genq.register_model("lm", family=family, path=str(folder))
        while stack.call("GET", "/v1/models/lm").json()["items"][0]["status"] == "checking":
            time.sleep(0.2)

        spans: dict[str, list[tuple[float, float]]] = {"warm": [], "alone": [], "together": []}
        way = ["alone"]

        def one(i: int) -> int:
            body = {"kind": "generate", "model": "lm", "params": params(i, max_tokens)}
            job_id = stack.submit(body)["id"]
            while True:
                job = dict(stack.call("GET", f"/v1/jobs/{job_id}").json())
                if job["state"] in {"succeeded", "failed", "canceled"}:
                    assert job["state"] == "succeeded", job
                    spans[way[0]].append(job_spans(job))
                    return int(job["progress"]["total"])
                time.sleep(POLL_S)

        alone, together = side_by_side(one, n, rounds, way)
        code, _ = stack.stop()
        assert code == 0, stack.log_text()[-3000:]
    finally:
        stack.kill()
    return {
        "alone": alone,
        "together": together,
        "job_s": {
            w: {
                "submit_to_start": statistics.median(a for a, _ in spans[w]),
                "start_to_finish": statistics.median(b for _, b in spans[w]),
            }
            for w in ("alone", "together")
        },
    }


def job_spans(job: dict[str, Any]) -> tuple[float, float]:
    """(seconds from submit to start, from start to finish) from the job's timestamps."""
    created, started, finished = (
        datetime.fromisoformat(job[k]) for k in ("created_at", "started_at", "finished_at")
    )
    return (started - created).total_seconds(), (finished - started).total_seconds()


def summary(level: dict[str, Any]) -> dict[str, float]:
    """Medians of each way, and the median of the rounds' own ratios (each round's two runs
    are side by side, so their ratio is what the load of the moment leaves least changed)."""
    ratios = [t / a for a, t in zip(level["alone"], level["together"], strict=True)]
    return {
        "alone_tokens_per_s": statistics.median(level["alone"]),
        "together_tokens_per_s": statistics.median(level["together"]),
        "ratio": statistics.median(ratios),
        "round_ratios": ratios,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(WORKLOADS), default="transformers")
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=100, help="at most 128 - prompt")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-stack", action="store_true", help="the model-server level only")
    parser.add_argument("--no-server", action="store_true", help="through the queue only")
    args = parser.parse_args()
    n = args.jobs
    family = args.family
    folder = build_model(family)
    server = (
        None if args.no_server else server_level(family, folder, n, args.max_tokens, args.rounds)
    )
    stack = None if args.no_stack else stack_level(family, folder, n, args.max_tokens, args.rounds)
    results: dict[str, Any] = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "family": family,
        "workload": f"{n} jobs x {args.max_tokens} tokens, {WORKLOADS[family]}, temperature 1,"
        " 1 CPU thread",
        "load_average_1m": os.getloadavg()[0],
        "server": {**summary(server), "runs": server} if server else None,
        "stack": {**summary(stack), "runs": stack} if stack else None,
    }
    lines = [
        f"# Language-model batching on the CPU: {family} ({results['at']})",
        "",
        f"Workload: {results['workload']}.",
        "",
        "| level | one at a time, tokens/s | concurrent, tokens/s | ratio (target >= 4x) |"
        " rounds' ratios |",
        "|---|---:|---:|---:|---|",
    ]
    for name, level in (("model server (Ray actor)", "server"), ("through the queue", "stack")):
        if results[level] is not None:
            r = results[level]
            lines.append(
                f"| {name} | {r['alone_tokens_per_s']:.0f} | {r['together_tokens_per_s']:.0f} |"
                f" {r['ratio']:.2f}x | {', '.join(f'{x:.1f}' for x in r['round_ratios'])} |"
            )
    lines += [
        "",
        f"Medians of {args.rounds} alternating rounds (the ratio: the median of each round's"
        f" concurrent / one-at-a-time). 1-minute load average at the end"
        f" {results['load_average_1m']:.1f} (other work shares this machine's cores).",
    ]
    if server:
        stats = server["server_stats"]
        lines.append(
            f"Model server: largest batch {stats['largest_batch_jobs']} jobs,"
            f" {stats['shared_steps']} of {stats['steps']} forward passes shared by two jobs or"
            " more."
        )
    if stack:
        spans = stack["job_s"]
        lines.append(
            "Through the queue, a job's median seconds from submit to start and from start to"
            f" finish: one at a time {spans['alone']['submit_to_start']:.3f} and"
            f" {spans['alone']['start_to_finish']:.3f}, concurrent"
            f" {spans['together']['submit_to_start']:.3f} and"
            f" {spans['together']['start_to_finish']:.3f}."
        )
    print("\n".join(lines))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    name = "lm-batching" if family == "transformers" else f"lm-batching-{family}"
    (out / f"{name}-{stamp}.json").write_text(json.dumps(results, indent=2))
    (out / f"{name}-{stamp}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
