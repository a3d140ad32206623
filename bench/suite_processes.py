"""Which processes spend the test suite's CPU: the suite run as `make test` runs it (in parallel,
pytest-xdist), with every process on the machine read from /proc twice a second, and each
one's CPU-seconds summed by kind (test processes, Ray's actor processes by their class, Ray's
own daemons, a `genq up`'s children, PostgreSQL, Chromium...).

    .venv/bin/python bench/suite_processes.py                    # the whole suite (~12-15 min)
    .venv/bin/python bench/suite_processes.py -- tests/stack     # pytest arguments after --
    .venv/bin/python bench/suite_processes.py --workers 2 -- tests/workers

`bench/suite_cpu.py` says which tests cost the most (one at a time); this says what kind of
process the cost lands in, which is where a cut can be made (a Ray head per module, a family
whose imports are heavy). A process's CPU is the user and system time of all its threads (not
its children's: each child is counted as a process of its own), read last while it was alive,
so a process that lives under half a second may be missed, and its last half second is not:
the sum is a little under the machine's busy CPU-seconds, which are printed beside it. Run it
on an otherwise idle machine: every process counts, the tests' or not. Writes
bench/results/suite-processes-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine_busy_s, write_result  # noqa: E402

INTERVAL_S = 0.5
# A Ray worker process's title while it hosts an actor or runs a task: `ray::ModelServer`,
# `ray::model-<id>:ModelServer.__init__` (a named actor), `ray::Trainer.train`, `ray::IDLE`.
RAY_TITLE = re.compile(r"^ray::(?:[^:\s]*:)?([A-Za-z_][\w]*)")
# Command-line markers, first match wins; the kinds are grouped by their prefix in the report.
KINDS = [
    ("exec(eval(sys.stdin.readline()))", "test: xdist worker"),
    ("-m pytest", "test: pytest"),
    ("stack.cli up", "genq up: supervisor"),
    ("stack.cli worker", "genq up: Celery worker"),
    ("stack.cli scheduler", "genq up: periodic scheduler"),
    ("stack.cli keys", "genq up: key commands"),
    ("stack.cli migrate", "genq up: migrations"),
    ("gunicorn", "genq up: gunicorn (API)"),
    ("redis-server", "redis"),
    ("ray/core/src/ray/gcs/gcs_server", "ray daemon: gcs_server"),
    ("ray/core/src/ray/raylet/raylet", "ray daemon: raylet"),
    ("ray/dashboard/dashboard.py", "ray daemon: dashboard head"),
    ("ray/_private/log_monitor.py", "ray daemon: log monitor"),
    ("ray/autoscaler/_private/monitor.py", "ray daemon: autoscaler monitor"),
    ("ray.util.client.server", "ray daemon: client server"),
    ("bin/ray start", "ray daemon: `ray start`"),
    ("postgres", "postgresql"),
    ("chrom", "chromium"),
    ("moto_server", "moto (S3)"),
    ("prometheus", "prometheus"),
    ("pip", "pip"),
]


def kind_of(cmdline: str, titles: set[str]) -> str:
    """The kind of a process from its command line and the Ray titles it was seen with (a
    worker's title changes as it takes an actor; its actor's class names it)."""
    classes = {m.group(1) for t in titles if (m := RAY_TITLE.match(t))}
    actors = sorted(c for c in classes if c != "IDLE")
    if actors:
        name = actors[0]
        if name in ("DashboardAgent", "RuntimeEnvAgent"):
            return f"ray daemon: {name}"
        return f"ray worker: {name}"
    if classes:
        return "ray worker: idle"
    for marker, kind in KINDS:
        if marker in cmdline:
            return kind
    return "other: " + (Path(cmdline.split()[0]).name if cmdline else "?")


class Sampler:
    """Reads every process twice a second on a thread; `totals` sums them by kind."""

    def __init__(self) -> None:
        # (pid, create time) -> [cpu seconds, command line, Ray titles seen]
        self.seen: dict[tuple[int, float], list[Any]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        me = os.getpid()
        while not self.stop.is_set():
            for proc in psutil.process_iter(["cmdline", "cpu_times", "create_time"]):
                info = proc.info
                if proc.pid == me or info["cpu_times"] is None or info["create_time"] is None:
                    continue
                cmdline = " ".join(info["cmdline"] or [])
                entry = self.seen.setdefault((proc.pid, info["create_time"]), [0.0, "", set()])
                entry[0] = max(entry[0], info["cpu_times"].user + info["cpu_times"].system)
                if cmdline:
                    entry[1] = cmdline
                    if cmdline.startswith("ray::"):
                        entry[2].add(cmdline.split()[0])
            self.stop.wait(INTERVAL_S)

    def totals(self, started: float) -> dict[str, dict[str, float]]:
        """CPU-seconds and process count by kind, for the processes made after `started` and
        the CPU the older ones spent since (read from their first sighting)."""
        acc: dict[str, dict[str, float]] = defaultdict(lambda: {"cpu_s": 0.0, "processes": 0})
        for (_, created), (cpu, cmdline, titles) in self.seen.items():
            if created < started:
                continue  # a process older than the run: the services, this script
            entry = acc[kind_of(cmdline, titles)]
            entry["cpu_s"] += cpu
            entry["processes"] += 1
        ranked = sorted(acc.items(), key=lambda kv: -kv[1]["cpu_s"])
        return {
            k: {"cpu_s": round(v["cpu_s"], 1), "processes": int(v["processes"])} for k, v in ranked
        }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cpus = len(os.sched_getaffinity(0))
    parser.add_argument("--workers", type=int, default=min(cpus + 1, 8), help="xdist processes")
    parser.add_argument("pytest_args", nargs="*", help="after --: what pytest runs")
    args = parser.parse_args(argv)
    command = [
        sys.executable, "-m", "pytest", "-q", "-n", str(args.workers), "--dist", "loadfile",
        *args.pytest_args,
    ]  # fmt: skip
    print("running:", " ".join(command), flush=True)
    sampler = Sampler()
    started, busy = time.time(), machine_busy_s()
    sampler.thread.start()
    run = subprocess.run(command, cwd=ROOT, check=False)
    wall, busy = time.time() - started, machine_busy_s() - busy
    sampler.stop.set()
    sampler.thread.join()
    kinds = sampler.totals(started)
    counted = sum(v["cpu_s"] for v in kinds.values())
    groups: dict[str, float] = defaultdict(float)
    for name, fig in kinds.items():
        groups[name.split(":")[0]] += fig["cpu_s"]
    result = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "pytest_exit": run.returncode,
        "pytest_args": " ".join(args.pytest_args),
        "workers": args.workers,
        "cpus": cpus,
        "wall_s": round(wall, 1),
        "machine_busy_cpu_s": round(busy, 1),
        "counted_cpu_s": round(counted, 1),
        "by_group": {k: round(v, 1) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "by_kind": kinds,
    }
    print(f"\n{wall:.0f} s; the machine was busy {busy:.0f} CPU-s, {counted:.0f} of them counted")
    print(f"\n{'CPU-s':>8} {'share':>6}  group")
    for name, cpu in result["by_group"].items():
        print(f"{cpu:8.1f} {cpu / counted:6.1%}  {name}")
    print(f"\n{'CPU-s':>8} {'procs':>6} {'each':>6}  kind")
    for name, fig in kinds.items():
        each = fig["cpu_s"] / fig["processes"]
        print(f"{fig['cpu_s']:8.1f} {fig['processes']:6d} {each:6.2f}  {name}")
    write_result("suite-processes", result)
    return run.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
