"""What an idle `genq up` costs: the CPU its processes spend while no job runs, against the
floor that Ray itself sets, a Ray head started as genq's is with one idle actor, side by side
in one run.

    .venv/bin/python bench/idle_stack.py [--seconds 30] [--settle-s 10] [--rounds 2]

genq side: a `genq up` with genq's defaults (SQLite, 2 API processes, a Celery worker of 8
threads, the periodic scheduler, a local Ray head) runs one `echo` job, so that its model pool
and one `echo` model server are up, as after any first job; after `--settle-s` the CPU time
of every process below it is read from /proc, and again `--seconds` later. Ray side: the head
that `genq up` starts (stack/services.py, the same flags and environment) with one actor of a
class that does nothing, read the same way. The rounds alternate which side goes first.

Figures are per process kind, in percent of one core; `genq_own_pct` is the genq side's
total less the Ray side's. Printed and written to bench/results/idle-stack-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import wait_for_workers, write_result  # noqa: E402
from bench.job_path import REDIS, cpu_by_name, start_ray_head, stop_ray_head  # noqa: E402
from tests.support.stackproc import StackProcess  # noqa: E402


def idle_pct(roots: Callable[[], list[int]], seconds: float) -> dict[str, float]:
    """Percent of one core that the processes below `roots()` (and the bench's Redis server)
    spent over `seconds`, by kind, with the total as `total`."""
    before = cpu_by_name(roots())
    started = time.monotonic()
    time.sleep(seconds)
    after = cpu_by_name(roots())
    elapsed = time.monotonic() - started
    by_kind: dict[str, float] = {}
    for pid, (name, cpu_s) in after.items():
        if pid in before:  # a process that started meanwhile is no idle cost
            by_kind[name] = by_kind.get(name, 0.0) + cpu_s - before[pid][1]
    pct = {
        name: round(100 * cpu_s / elapsed, 2)
        for name, cpu_s in sorted(by_kind.items(), key=lambda kv: -kv[1])
        if cpu_s > 0
    }
    pct["total"] = round(sum(pct.values()), 2)
    return pct


def genq_side(var_dir: Path, seconds: float, settle_s: float) -> dict[str, float]:
    broker = f"{REDIS}/12"
    redis.Redis.from_url(broker).flushdb()
    # genq's defaults where the test harness (StackProcess) sets less, as bench/job_path.py.
    env = {
        "GENQ_REDIS_URL": broker,
        "GENQ_LOG_LEVEL": "WARNING",
        "GENQ_API_WORKERS": "2",
        "GENQ_WORKER_CONCURRENCY": "8",
    }
    stack = StackProcess(var_dir, env)
    stack.env.update(env)
    try:
        stack.start()
        assert stack.process is not None
        wait_for_workers(stack, 1)
        job = stack.submit({"kind": "generate", "model": "echo", "params": {"message": "x"}})
        assert stack.wait(job["id"])["state"] == "succeeded"
        time.sleep(settle_s)
        pid = stack.process.pid
        figures = idle_pct(lambda: [pid], seconds)
        code, left = stack.stop()
        assert code == 0 and not left, (code, left)
        return figures
    finally:
        stack.kill()


# The Ray side's driver: a process of its own, since Ray reads some of the head's environment
# (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER: stay on loopback) when it is imported.
DRIVER = """
import os, sys, ray
ray.init(address=os.environ["BARE_RAY_ADDRESS"], log_to_driver=False)

@ray.remote(num_cpus=0)
class Idle:
    def pid(self):
        return os.getpid()

actor = Idle.remote()
ray.get(actor.pid.remote())
print("ready", flush=True)
sys.stdin.read()
"""


def ray_side(var_dir: Path, seconds: float, settle_s: float) -> dict[str, float]:
    head, head_env = start_ray_head(var_dir / "ray", var_dir / "ray.log")
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER],
        env={**os.environ, **head_env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(120, driver.kill)  # a driver that cannot connect
    watchdog.start()
    try:
        assert driver.stdout is not None and driver.stdout.readline().strip() == "ready"
        watchdog.cancel()
        time.sleep(settle_s)
        # The driver is not counted: the genq side's drivers are its Celery worker.
        return idle_pct(lambda: [head.pid], seconds)
    finally:
        watchdog.cancel()
        assert driver.stdin is not None
        driver.stdin.close()
        try:
            driver.wait(30)
        finally:
            driver.kill()
            stop_ray_head(head)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="how long each side is read")
    parser.add_argument("--settle-s", type=float, default=10.0, help="wait before reading")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rounds: list[dict[str, Any]] = []
    for n in range(args.rounds):
        tmp = Path(tempfile.mkdtemp(prefix="genq-idle-"))
        sides = [("genq", genq_side), ("ray", ray_side)]
        if n % 2:
            sides.reverse()
        figures = {name: run(tmp / name, args.seconds, args.settle_s) for name, run in sides}
        rounds.append(figures)
        print(f"round {n + 1}: genq {figures['genq']['total']}%, ray {figures['ray']['total']}%")
    # The round whose genq total is the median's (the first of two when the count is even).
    totals = [r["genq"]["total"] for r in rounds]
    median = sorted(totals)[(len(totals) - 1) // 2]
    chosen = rounds[totals.index(median)]
    result = {
        "seconds": args.seconds,
        "settle_s": args.settle_s,
        "rounds": args.rounds,
        "genq_pct": chosen["genq"],
        "ray_pct": chosen["ray"],
        "genq_own_pct": round(chosen["genq"]["total"] - chosen["ray"]["total"], 2),
        "rounds_genq_total_pct": ", ".join(f"{t:.2f}" for t in totals),
        "rounds_ray_total_pct": ", ".join(f"{r['ray']['total']:.2f}" for r in rounds),
        "genq_total_pct_mean": round(statistics.mean(totals), 2),
    }
    for side in ("genq_pct", "ray_pct"):
        print(f"\n{side}:")
        for name, pct in result[side].items():
            print(f"{pct:7.2f}%  {name}")
    print(f"\ngenq's own: {result['genq_own_pct']}% of a core")
    write_result("idle-stack", result)


if __name__ == "__main__":
    main()
