"""Cross-job batching on the CPU: 16 concurrent tiny-`ddpm` generation jobs through the whole
genq stack, against the same 16 jobs one at a time, and against one bare batched model call
of 16 images (the ddpm implementation called directly in this process: no API, no queue, no
Ray), in the same run.

    .venv/bin/python bench/batching.py [--jobs 16] [--steps 200] [--rounds 3] [--max-wait-ms 100]

Workload: the `tiny` ddpm preset (16x16 grayscale, a 2-level UNet, 200 training timesteps)
trained for 4 steps through the API, then generate jobs of 4 images each with `--steps` (200,
the most the tiny model allows) denoising steps: 16 jobs fill one batch of 64 rows, ddpm's
`max_batch_size`, and the model's time (seconds) dominates the queue's fixed costs (about half
a second for 16 jobs: submits, claims, output files, the last wait for stragglers). The model
server runs on one CPU thread (a Ray actor with num_cpus=1); the bare calls here are pinned to
one thread too.

The stack runs with GENQ_BATCH_MAX_WAIT_MS=100: 16 jobs submitted at once reach the server
spread over a few hundred milliseconds on this loaded 2-core machine (API, SQLite, Celery
claims), 20-30 ms apart, more than the 10 ms default waits between two arrivals; a second
batch would cost a whole second model pass. The concurrent run and
the bare batched call alternate for `--rounds` rounds while the stack idles between them, so
that load from other processes falls on both alike; medians are reported.

Figures: images/s of each way, the ratios concurrent/sequential (target >= 3x) and
concurrent/bare batch (target >= 90%), and the in-actor view: the batch sizes the server
formed and the model time of each batch (the `batch_s` metric), to tell the queue's fixed
costs from the batching itself. Written to bench/results/batching-<UTC time>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.stackproc import StackProcess  # noqa: E402

POLL_S = 0.05  # each poll costs the API ~8 ms of CPU: faster polling would slow the model


def wait_done(stack: StackProcess, job_id: str) -> dict[str, Any]:
    while True:
        job = dict(stack.call("GET", f"/v1/jobs/{job_id}").json())
        if job["state"] in {"succeeded", "failed", "canceled"}:
            assert job["state"] == "succeeded", job
            return job
        time.sleep(POLL_S)


IMAGES_PER_JOB = 4  # 16 jobs x 4 images = 64 rows, ddpm's max_batch_size: one full batch


def generate_body(model: str, i: int, steps: int) -> dict[str, Any]:
    params = {"label": i % 10, "num_images": IMAGES_PER_JOB, "steps": steps, "seed": 1000 + i}
    return {"kind": "generate", "model": model, "params": params}


def sequential_run(stack: StackProcess, model: str, n: int, steps: int) -> dict[str, Any]:
    # Warm the server (load, first call) so neither way pays it.
    wait_done(stack, stack.submit(generate_body(model, 99, steps))["id"])
    start = time.perf_counter()
    jobs = [wait_done(stack, stack.submit(generate_body(model, i, steps))["id"]) for i in range(n)]
    seconds = time.perf_counter() - start
    return {
        "s": seconds,
        "images_per_s": n * IMAGES_PER_JOB / seconds,
        "model_s_median": statistics.median(job["metrics"]["batch_s"] for job in jobs),
    }


def concurrent_run(stack: StackProcess, model: str, n: int, steps: int) -> dict[str, Any]:
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        ids = list(pool.map(lambda i: stack.submit(generate_body(model, i, steps))["id"], range(n)))
    # One waiting client, not n: polling must not take the CPU the model needs.
    jobs = [wait_done(stack, j) for j in ids]
    seconds = time.perf_counter() - start
    # Each batch reports its model time to every job in it: count each batch once.
    batches: dict[tuple[float, float], int] = {}
    for job in jobs:
        m = job["metrics"]
        batches[(m["batch_s"], m["batch_jobs"])] = int(m["batch_jobs"])
    return {
        "s": seconds,
        "images_per_s": n * IMAGES_PER_JOB / seconds,
        "batch_sizes": sorted(batches.values(), reverse=True),
        "model_s": sum(s for s, _ in batches),
    }


class Bare:
    """The implementation called directly in this process: no API, no queue, no Ray."""

    def __init__(self, model_dir: Path) -> None:
        import torch

        from workers.families import ddpm

        torch.set_num_threads(1)  # as the actor: Ray gives a num_cpus=1 actor one thread
        self.model = ddpm.load(model_dir, {}, "cpu")

    def jobs(self, n: int, steps: int, min_rows: int) -> list[tuple[dict, Any]]:
        from workers.families.base import RunContext

        return [
            (
                generate_body("", i, steps)["params"],
                RunContext(job_id=f"bare-{i}", device="cpu", min_rows=min_rows),
            )
            for i in range(n)
        ]

    def batch(self, n: int, steps: int, min_rows: int = 16) -> float:
        jobs = self.jobs(n, steps, min_rows)
        start = time.perf_counter()
        outputs = [item for _, item in self.model.generate_batch(jobs) if hasattr(item, "data")]
        assert len(outputs) == n * IMAGES_PER_JOB
        return n * IMAGES_PER_JOB / (time.perf_counter() - start)

    def alone(self, steps: int, min_rows: int, repeats: int = 3) -> float:
        jobs = self.jobs(repeats, steps, min_rows)
        start = time.perf_counter()
        for params, ctx in jobs:
            list(self.model.generate(params, ctx))
        return repeats * IMAGES_PER_JOB / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200, help="at most 200 (tiny ddpm)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-wait-ms", type=float, default=100.0)
    args = parser.parse_args()
    n, steps = args.jobs, args.steps

    tmp = Path(tempfile.mkdtemp(prefix="genq-bench-batching-"))
    env = {
        "GENQ_RAY_NUM_CPUS": "2",
        "GENQ_WORKER_CONCURRENCY": str(max(16, n + 2)),  # every job waits on Ray at once
        "GENQ_BATCH_MAX_WAIT_MS": str(args.max_wait_ms),
    }
    stack = StackProcess(tmp / "var", env)
    rounds = []
    try:
        stack.start()
        train = {
            "kind": "train",
            "family": "ddpm",
            "dataset": "digits",
            "name": "bench",
            "params": {"preset": "tiny", "steps": 4, "batch_size": 8, "checkpoint_every": 4},
        }
        trained = wait_done(stack, stack.submit(train)["id"])
        model_dir = tmp / "var" / "artifacts" / "models" / trained["id"]
        assert model_dir.exists(), model_dir
        sequential = sequential_run(stack, "bench:1", n, steps)
        bare = Bare(model_dir)
        bare.batch(2, steps)  # warm-up
        # Interleaved, so that the load other processes put on the machine hits both alike.
        for _ in range(args.rounds):
            rounds.append((concurrent_run(stack, "bench:1", n, steps), bare.batch(n, steps)))
        alone_padded = bare.alone(steps, min_rows=16)
        alone_unpadded = bare.alone(steps, min_rows=1)
        code, _ = stack.stop()
        assert code == 0, stack.log_text()[-3000:]
    finally:
        stack.kill()

    in_actor_ips = statistics.median(n * IMAGES_PER_JOB / g["model_s"] for g, _ in rounds)
    genq = rounds[len(rounds) // 2][0]  # the middle round, for the model-time line
    concurrent = statistics.median(r[0]["images_per_s"] for r in rounds)
    bare_batch_ips = statistics.median(r[1] for r in rounds)
    results = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "workload": f"{n} jobs x {IMAGES_PER_JOB} images, tiny ddpm 16x16, {steps} DDPM steps,"
        " 1 CPU thread",
        "batch_max_wait_ms": args.max_wait_ms,
        "load_average_1m": os.getloadavg()[0],
        "sequential": sequential,
        "rounds": [{"genq": g, "bare_batch_images_per_s": b} for g, b in rounds],
        "concurrent_images_per_s_median": concurrent,
        "bare_batch_images_per_s_median": bare_batch_ips,
        "bare_alone_padded_images_per_s": alone_padded,
        "bare_alone_unpadded_images_per_s": alone_unpadded,
        "ratio_concurrent_vs_sequential": concurrent / sequential["images_per_s"],
        "ratio_concurrent_vs_bare_batch": concurrent / bare_batch_ips,
        "in_actor_images_per_s_median": in_actor_ips,
        "ratio_in_actor_vs_bare_batch": in_actor_ips / bare_batch_ips,
        "ratio_concurrent_vs_unpadded_alone": concurrent / alone_unpadded,
    }
    sequential_ips = sequential["images_per_s"]
    lines = [
        f"# Batching on the CPU ({results['at']})",
        "",
        f"Workload: {results['workload']}.",
        "",
        "| way | images/s | ratio |",
        "|---|---:|---:|",
        f"| {n} jobs one at a time through genq | {sequential_ips:.2f} | 1.00x (baseline) |",
        f"| {n} concurrent jobs through genq | {concurrent:.2f} | "
        f"{results['ratio_concurrent_vs_sequential']:.2f}x sequential (target >= 3x) |",
        f"| bare batched call of {n} (no queue) | {bare_batch_ips:.2f} | "
        f"genq concurrent = {100 * results['ratio_concurrent_vs_bare_batch']:.0f}% of it "
        "(target >= 90%) |",
        f"| in-actor model time of the concurrent run | {in_actor_ips:.2f} | "
        f"{100 * results['ratio_in_actor_vs_bare_batch']:.0f}% of the bare batch |",
        f"| bare single job, padded to 16 rows (what genq runs alone) | {alone_padded:.2f} | |",
        f"| bare single job, no padding (GENQ_BATCH_MIN_ROWS=1) | "
        f"{alone_unpadded:.2f} | genq concurrent = "
        f"{results['ratio_concurrent_vs_unpadded_alone']:.2f}x it |",
        "",
        f"Concurrent and bare batch: medians of {len(rounds)} interleaved rounds. Batches the "
        f"server formed (jobs each), by round: {[r[0]['batch_sizes'] for r in rounds]}; in the "
        f"middle round, model time {genq['model_s']:.2f} s of {genq['s']:.2f} s end to end. A job "
        f"alone: model {sequential['model_s_median']:.3f} s of {sequential['s'] / n:.3f} s end "
        f"to end. GENQ_BATCH_MAX_WAIT_MS={args.max_wait_ms:g}; 1-minute load average at the "
        f"end {results['load_average_1m']:.1f} on this machine's cores (other work shares them).",
    ]
    print("\n".join(lines))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (out / f"batching-{stamp}.json").write_text(json.dumps(results, indent=2))
    (out / f"batching-{stamp}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
