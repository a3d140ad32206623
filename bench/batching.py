"""Cross-job batching on the CPU: 16 concurrent tiny-`ddpm` generation jobs through the whole
genq stack, against the same 16 jobs one at a time, and against one bare batched model call
of 16 images (the ddpm implementation called directly in this process: no API, no queue, no
Ray), in the same run.

    .venv/bin/python bench/batching.py [--jobs 16] [--steps 100]

Workload: the `tiny` ddpm preset (16x16 grayscale, a 2-level UNet, 200 training timesteps)
trained for 4 steps through the API, then generate jobs of 1 image each with `--steps`
denoising steps, so the model's time dominates each job. The model server runs on one CPU
thread (a Ray actor with num_cpus=1); the bare calls here are pinned to one thread too.

Figures: images/s of each way, the ratios concurrent/sequential (target >= 3x) and
concurrent/bare batch (target >= 90%), and the in-actor view: the batch sizes the server
formed and the model time of each batch (the `batch_s` metric), to tell the queue's fixed
costs from the batching itself. Written to bench/results/batching-<UTC time>.json and .md.
"""

from __future__ import annotations

import argparse
import json
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

from tests.stackproc import StackProcess  # noqa: E402

POLL_S = 0.01  # the bench's own wait loop: stackproc's 0.2 s poll would dominate small jobs


def wait_done(stack: StackProcess, job_id: str) -> dict[str, Any]:
    while True:
        job = dict(stack.call("GET", f"/v1/jobs/{job_id}").json())
        if job["state"] in {"succeeded", "failed", "canceled"}:
            assert job["state"] == "succeeded", job
            return job
        time.sleep(POLL_S)


def generate_body(model: str, i: int, steps: int) -> dict[str, Any]:
    params = {"label": i % 10, "num_images": 1, "steps": steps, "seed": 1000 + i}
    return {"kind": "generate", "model": model, "params": params}


def through_stack(stack: StackProcess, model: str, n: int, steps: int) -> dict[str, Any]:
    # Warm the server (load, first call) so neither way pays it.
    wait_done(stack, stack.submit(generate_body(model, 99, steps))["id"])

    start = time.perf_counter()
    sequential = [
        wait_done(stack, stack.submit(generate_body(model, i, steps))["id"]) for i in range(n)
    ]
    sequential_s = time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        ids = list(pool.map(lambda i: stack.submit(generate_body(model, i, steps))["id"], range(n)))
        concurrent = list(pool.map(lambda j: wait_done(stack, j), ids))
    concurrent_s = time.perf_counter() - start

    # Each batch reports its model time to every job in it: count each batch once.
    batches: dict[tuple[float, float], int] = {}
    for job in concurrent:
        m = job["metrics"]
        batches[(m["batch_s"], m["batch_jobs"])] = int(m["batch_jobs"])
    model_s = sum(s for s, _ in batches)
    solo_model_s = statistics.median(job["metrics"]["batch_s"] for job in sequential)
    return {
        "sequential_s": sequential_s,
        "concurrent_s": concurrent_s,
        "sequential_images_per_s": n / sequential_s,
        "concurrent_images_per_s": n / concurrent_s,
        "batch_sizes": sorted(batches.values(), reverse=True),
        "concurrent_model_s": model_s,
        "solo_model_s_median": solo_model_s,
    }


def bare(model_dir: Path, n: int, steps: int, min_rows: int) -> dict[str, float]:
    """The implementation called directly: one batch of n jobs, and one job of 1 image."""
    import torch

    from workers.families import ddpm
    from workers.families.base import RunContext

    torch.set_num_threads(1)  # as the actor: Ray gives a num_cpus=1 actor one thread
    model = ddpm.load(model_dir, {}, "cpu")

    def ctx(i: int) -> RunContext:
        return RunContext(job_id=f"bare-{i}", device="cpu", min_rows=min_rows)

    jobs = [(generate_body("", i, steps)["params"], ctx(i)) for i in range(n)]
    list(model.generate_batch(jobs[:2]))  # warm-up
    start = time.perf_counter()
    outputs = [item for _, item in model.generate_batch(jobs) if hasattr(item, "data")]
    batch_s = time.perf_counter() - start
    assert len(outputs) == n
    start = time.perf_counter()
    for params, c in jobs[:4]:
        list(model.generate(params, c))
    alone_s = (time.perf_counter() - start) / 4
    return {"batch_images_per_s": n / batch_s, "alone_images_per_s": 1 / alone_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    n, steps = args.jobs, args.steps

    tmp = Path(tempfile.mkdtemp(prefix="genq-bench-batching-"))
    env = {
        "GENQ_RAY_NUM_CPUS": "2",
        "GENQ_WORKER_CONCURRENCY": str(max(16, n + 2)),  # every job waits on Ray at once
        "GENQ_PROGRESS_INTERVAL_S": "0.5",
    }
    stack = StackProcess(tmp / "var", env)
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
        genq = through_stack(stack, "bench:1", n, steps)
        code, _ = stack.stop()
        assert code == 0, stack.log_text()[-3000:]
    finally:
        stack.kill()

    padded = bare(model_dir, n, steps, min_rows=16)
    unpadded = bare(model_dir, n, steps, min_rows=1)
    concurrent, sequential = genq["concurrent_images_per_s"], genq["sequential_images_per_s"]
    results = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "workload": f"{n} jobs x 1 image, tiny ddpm 16x16, {steps} DDPM steps, 1 CPU thread",
        "genq": genq,
        "bare_min_rows_16": padded,
        "bare_min_rows_1": unpadded,
        "ratio_concurrent_vs_sequential": concurrent / sequential,
        "ratio_concurrent_vs_bare_batch": concurrent / padded["batch_images_per_s"],
        "ratio_in_actor_vs_bare_batch": (n / genq["concurrent_model_s"])
        / padded["batch_images_per_s"],
        "ratio_concurrent_vs_unpadded_alone": concurrent / unpadded["alone_images_per_s"],
    }
    lines = [
        f"# Batching on the CPU ({results['at']})",
        "",
        f"Workload: {results['workload']}.",
        "",
        "| way | images/s | ratio |",
        "|---|---:|---:|",
        f"| {n} jobs one at a time through genq | {sequential:.2f} | 1.00x (baseline) |",
        f"| {n} concurrent jobs through genq | {concurrent:.2f} | "
        f"{results['ratio_concurrent_vs_sequential']:.2f}x sequential (target >= 3x) |",
        f"| bare batched call of {n} (no queue) | {padded['batch_images_per_s']:.2f} | "
        f"genq concurrent = {100 * results['ratio_concurrent_vs_bare_batch']:.0f}% of it "
        "(target >= 90%) |",
        f"| in-actor model time of the concurrent run | {n / genq['concurrent_model_s']:.2f} | "
        f"{100 * results['ratio_in_actor_vs_bare_batch']:.0f}% of the bare batch |",
        f"| bare single job, padded to 16 rows (what genq runs alone) | "
        f"{padded['alone_images_per_s']:.2f} | |",
        f"| bare single job, no padding (GENQ_BATCH_MIN_ROWS=1) | "
        f"{unpadded['alone_images_per_s']:.2f} | genq concurrent = "
        f"{results['ratio_concurrent_vs_unpadded_alone']:.2f}x it |",
        "",
        f"Batches the server formed for the {n} concurrent jobs (jobs each): "
        f"{genq['batch_sizes']}; model time {genq['concurrent_model_s']:.2f} s of "
        f"{genq['concurrent_s']:.2f} s end to end. A job alone: model "
        f"{genq['solo_model_s_median']:.3f} s of {genq['sequential_s'] / n:.3f} s end to end.",
    ]
    print("\n".join(lines))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (out / f"batching-{stamp}.json").write_text(json.dumps(results, indent=2))
    (out / f"batching-{stamp}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
