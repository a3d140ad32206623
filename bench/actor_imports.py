"""CPU a Ray worker process spends importing genq before it can run an actor: every model
server, pool and trainer is a fresh Python that imports Ray and the module that defines its
actor class (and, for a model server, its family's implementation when it loads a model).

    .venv/bin/python bench/actor_imports.py [--rounds 15] [--checkout NAME=PATH ...]

Each round runs, for each checkout in turn (e.g. `before=/tmp/main-tree current=.`), one fresh
`python -c "import ray, <module>"` per module, and reads the child's CPU time (user + system,
from `resource.getrusage(RUSAGE_CHILDREN)`); `import ray` alone is the floor every Ray worker
pays. The same interpreter (this virtualenv's) runs every child, in the checkout's folder
(which `python -c` puts first on its path). Medians per checkout and module are printed, with
each checkout's ratio to the first, and the packages each import loaded that a Ray worker has
no use for (SQLAlchemy, Flask, Celery). Written to bench/results/actor-imports-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import checkouts_of, write_result  # noqa: E402

# What a Ray worker imports for each kind of actor genq starts (the module of its class), and
# the lightest family's implementation, which a model server of `echo` imports on load.
MODULES = {
    "ray alone": "",
    "model server": "workers.server",
    "model pool": "workers.pool",
    "trainer": "workers.actors",
    "echo model": "workers.server, workers.families.echo",
}
UNUSED = ("sqlalchemy", "flask", "celery")


def child_cpu_s(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    """CPU seconds of one child process run in `cwd`, and its standard output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return used, done.stdout.strip()


def import_command(modules: str) -> list[str]:
    body = "import ray" + (f", {modules}" if modules else "")
    report = f"import sys; print(','.join(m for m in {UNUSED!r} if m in sys.modules))"
    return [sys.executable, "-c", f"{body}; {report}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--checkout", action="append", help="NAME=PATH (default: this one)")
    args = parser.parse_args()
    checkouts = checkouts_of(args.checkout, ROOT)
    cpu: dict[str, dict[str, list[float]]] = {n: {m: [] for m in MODULES} for n in checkouts}
    loads: dict[str, dict[str, str]] = {n: {} for n in checkouts}
    for _ in range(args.rounds):
        for name, checkout in checkouts.items():
            env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
            for what, modules in MODULES.items():
                used, loaded = child_cpu_s(import_command(modules), checkout, env)
                cpu[name][what].append(used)
                loads[name][what] = loaded
    result: dict[str, Any] = {"machine": f"{os.cpu_count()} cores", "rounds": args.rounds}
    first = next(iter(checkouts))
    for name in checkouts:
        result[name] = {
            f"{what}.cpu_ms": round(1000 * statistics.median(cpu[name][what])) for what in MODULES
        }
        result[name].update({f"{what}.loads": loads[name][what] or "none" for what in MODULES})
        if name != first:
            result[f"ratio_{name}_to_{first}"] = {
                f"{what}.cpu_ms": round(
                    result[name][f"{what}.cpu_ms"] / result[first][f"{what}.cpu_ms"], 2
                )
                for what in MODULES
            }
    for name in checkouts:
        print(name)
        for what in MODULES:
            cpu_ms, loaded = result[name][f"{what}.cpu_ms"], result[name][f"{what}.loads"]
            print(f"  {what:<14} {cpu_ms:>5} ms CPU  loads of {', '.join(UNUSED)}: {loaded}")
    write_result("actor-imports", result)


if __name__ == "__main__":
    main()
