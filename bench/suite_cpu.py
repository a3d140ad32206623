"""Where the test suite's CPU goes: the suite (or part of it) run in one test process, one test
at a time, with the machine's busy CPU-seconds read from /proc/stat before and after each test.
The sum is the work the suite asks of the machine however it is spread over test processes,
so divided by the CPUs it is the least wall time any parallel run could take.

    .venv/bin/python bench/suite_cpu.py                      # the whole suite (~25 min, 2 cores)
    .venv/bin/python bench/suite_cpu.py tests/stack -m 'not multihost'   # pytest arguments

The figures are the whole machine's: the test's own process and everything it starts (stacks,
Ray heads, model servers, PostgreSQL's and Redis's work for it), and anything else running, so
run it on an otherwise idle machine. A module's first test carries its module-scoped fixtures.
Every process computes with one thread (OMP_NUM_THREADS=1), as under `make test`. Prints CPU
and wall seconds by folder and the heaviest modules, and writes
bench/results/suite-cpu-<UTC time>.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine_busy_s, write_result  # noqa: E402

# Where the plug-in (this module, loaded by pytest with -p) appends one line per test.
OUT_ENV = "GENQ_SUITE_CPU_OUT"
TOP_MODULES = 12


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """The plug-in: a test's setup, call and teardown, measured together."""
    cpu, wall = machine_busy_s(), time.monotonic()
    yield
    line = {
        "id": item.nodeid,
        "cpu_s": machine_busy_s() - cpu,
        "wall_s": time.monotonic() - wall,
    }
    with open(os.environ[OUT_ENV], "a") as out:
        out.write(json.dumps(line) + "\n")


def folder_of(nodeid: str) -> str:
    parts = nodeid.split("::")[0].split("/")
    return "/".join(parts[:2]) if len(parts) > 2 else parts[0]


def summarise(rows: list[dict[str, Any]], cpus: int) -> dict[str, Any]:
    def totals(key: Any) -> dict[str, dict[str, float]]:
        acc: dict[str, dict[str, float]] = defaultdict(
            lambda: {"cpu_s": 0, "wall_s": 0, "cases": 0}
        )
        for row in rows:
            entry = acc[key(row["id"])]
            entry["cpu_s"] += row["cpu_s"]
            entry["wall_s"] += row["wall_s"]
            entry["cases"] += 1
        ranked = sorted(acc.items(), key=lambda kv: -kv[1]["cpu_s"])
        return {name: {k: round(v, 1) for k, v in fig.items()} for name, fig in ranked}

    cpu = sum(r["cpu_s"] for r in rows)
    modules = totals(lambda nodeid: nodeid.split("::")[0])
    return {
        "cases": len(rows),
        "cpus": cpus,
        "cpu_s": round(cpu, 1),
        "wall_s": round(sum(r["wall_s"] for r in rows), 1),
        # The least wall time of any parallel run: every CPU busy with this work all along.
        "floor_s_all_cpus_busy": round(cpu / cpus, 1),
        "by_folder": totals(folder_of),
        "heaviest_modules": dict(list(modules.items())[:TOP_MODULES]),
    }


def main(argv: list[str]) -> int:
    cpus = len(os.sched_getaffinity(0))
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as out:
        out_path = Path(out.name)
    env = {
        **os.environ,
        OUT_ENV: str(out_path),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, "-m", "pytest", "-n", "0", "-q", "-p", "bench.suite_cpu", *argv]
    print("running:", " ".join(command), flush=True)
    try:
        run = subprocess.run(command, cwd=ROOT, env=env, check=False)
        rows = [json.loads(line) for line in out_path.read_text().splitlines()]
    finally:
        out_path.unlink(missing_ok=True)
    if not rows:
        print("no test ran")
        return 1
    result = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "pytest_exit": run.returncode}
    result |= summarise(rows, cpus)
    print(f"\n{result['cases']} cases: {result['cpu_s']} CPU-s busy, {result['wall_s']} s of tests")
    print(f"least wall time with all {cpus} CPUs busy: {result['floor_s_all_cpus_busy']} s\n")
    print(f"{'CPU-s':>8} {'wall s':>8} {'cases':>6}  folder")
    for name, fig in result["by_folder"].items():
        print(f"{fig['cpu_s']:8.1f} {fig['wall_s']:8.1f} {fig['cases']:6.0f}  {name}")
    print(f"\n{'CPU-s':>8} {'wall s':>8} {'cases':>6}  module (the {TOP_MODULES} heaviest)")
    for name, fig in result["heaviest_modules"].items():
        print(f"{fig['cpu_s']:8.1f} {fig['wall_s']:8.1f} {fig['cases']:6.0f}  {name}")
    write_result("suite-cpu", result)
    return run.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
