"""CPU time of the two transactions the Celery worker runs for every `echo` job, in-process:
the claim (`scheduler.attempt.claim_for_token`, as `Runner.run` makes it: the fair-share claim
of `core/fairness.py` and the snapshot; in a checkout without it, the steps it replaced) and
the finish (placement, output and the finish with the tenant's usage, as
`scheduler/outcomes.py` writes them), without Celery, Ray or HTTP, whose cost would hide
theirs on a loaded machine.

    .venv/bin/python bench/claim_finish_cost.py [--jobs 300] [--rounds 3] [--database-url URL]
                                                [--checkout NAME=PATH ...]

With several --checkout options (e.g. `before=/tmp/main-tree current=.`), each round runs one
child process per checkout, in turn, each importing that folder's code, so that a baseline and a
change meet the same load. SQLite: a fresh file per child; PostgreSQL: the URL given (migrated
by each child). Figures (mean CPU ms per job, per checkout, and each checkout's ratio to the
first) are printed and written to bench/results/claim-finish-cost-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WARM_JOBS = 30


def child(jobs: int, database_url: str | None) -> dict[str, float]:
    """Time `jobs` claims and finishes with the code of the working folder."""
    sys.path.insert(0, os.getcwd())
    from sqlalchemy import bindparam, select

    from core.fairness import claim_next
    from core.tables import Job
    from scheduler import attempt

    # This checkout's bench/common.py, by its path (the checkout under test may predate it);
    # what it builds comes from the checkout under test, first on sys.path.
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "bench" / "common.py")
    assert spec is not None and spec.loader is not None
    common = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    bench = common.EchoJobs.make(database_url, "genq-claim-finish-")
    database = bench.database

    queue_of = select(Job.queue).where(Job.id == bindparam("job_id"))

    def claim(job_id: str) -> Any:
        """The runner's claim: `claim_for_token` where the checkout has it (the message's
        queue as its hint), else the steps it replaced, as the runner made them."""
        if hasattr(attempt, "claim_for_token"):
            made = attempt.claim_for_token(database, job_id, "generate", lease_ttl_s=60)
            return made.lease
        with database.transaction() as session:
            queue = session.connection().execute(queue_of, {"job_id": job_id}).scalar()
            limits: dict[str, Any] = {}
            lease = claim_next(session, queue, lease_ttl_s=60, limits_seen=limits)
            assert lease is not None
            attempt.read_snapshot(session, lease.job_id, limits)
        return lease

    def one() -> tuple[float, float]:
        job_id = bench.create()
        started = time.process_time()
        lease = claim(job_id)
        claimed = time.process_time()
        stored = bench.store_output(lease)
        finishing = time.process_time()
        bench.finish(lease, stored)
        finished = time.process_time()
        return 1000 * (claimed - started), 1000 * (finished - finishing)

    for _ in range(WARM_JOBS):
        one()
    runs = [one() for _ in range(jobs)]
    database.dispose()
    return {
        "claim_cpu_ms": statistics.fmean(r[0] for r in runs),
        "finish_cpu_ms": statistics.fmean(r[1] for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300, help="jobs per child")
    parser.add_argument("--rounds", type=int, default=3, help="children per checkout")
    parser.add_argument("--database-url", default=None, help="default: SQLite in a temp dir")
    parser.add_argument("--checkout", action="append", help="NAME=PATH (default: this one)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.jobs, args.database_url)))
        return
    # Here, not at the top: a child runs this file with another checkout's packages first.
    sys.path.insert(0, str(ROOT))
    from bench.common import checkouts_of

    checkouts = checkouts_of(args.checkout, ROOT)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in checkouts}
    for _ in range(args.rounds):
        for name, checkout in checkouts.items():
            command = [sys.executable, str(Path(__file__).resolve()), "--child"]
            command += ["--jobs", str(args.jobs)]
            if args.database_url:
                command += ["--database-url", args.database_url]
            env = {**os.environ, "PYTHONPATH": str(checkout)}
            done = subprocess.run(command, cwd=checkout, env=env, check=True, capture_output=True)
            runs[name].append(json.loads(done.stdout.decode().strip().splitlines()[-1]))
            print(name, runs[name][-1], flush=True)
    result: dict[str, Any] = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores",
        "database": "postgresql" if args.database_url else "sqlite",
        "jobs": args.jobs,
        "rounds": args.rounds,
    }
    first = next(iter(checkouts))
    for name in checkouts:
        result[name] = {
            figure: round(statistics.fmean(r[figure] for r in runs[name]), 3)
            for figure in ("claim_cpu_ms", "finish_cpu_ms")
        }
        if name != first:
            result[f"ratio_{name}_to_{first}"] = {
                figure: round(result[name][figure] / result[first][figure], 2)
                for figure in ("claim_cpu_ms", "finish_cpu_ms")
            }
    print(json.dumps(result, indent=2))
    stamp = result["at"][:19].replace(":", "")
    out = ROOT / "bench" / "results" / f"claim-finish-cost-{stamp}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
