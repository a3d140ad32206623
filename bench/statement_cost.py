"""How much of the worker's two transactions per `echo` job (the claim, and the finish with its
placement and output) is the database driver running their statements, and how much is the
Python above it (SQLAlchemy's Core and ORM, genq's own code). In-process, one thread: each
job's claim and finish are timed (CPU of this process); a second run of as many jobs times
every `cursor.execute` of theirs (between SQLAlchemy's before/after_cursor_execute events),
which is the driver and, for SQLite, the database engine itself (PostgreSQL's server works in
processes of its own, not counted here). The rest is what the statements cost above the
driver.

    .venv/bin/python bench/statement_cost.py [--jobs 400] [--database-url URL]

Figures are printed and written to bench/results/statement-cost-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import event  # noqa: E402

from bench.common import EchoJobs, scratch_postgres, write_result  # noqa: E402
from scheduler.attempt import claim_for_token  # noqa: E402

WARM_JOBS = 30


def measure(jobs: int, database_url: str | None) -> dict[str, float]:
    bench = EchoJobs.make(database_url, "genq-statement-cost-")
    database = bench.database
    counting = {"on": False, "statements": 0, "driver_s": 0.0, "started": 0.0}

    def _before(*_: Any) -> None:
        counting["started"] = time.process_time()

    def _after(*_: Any) -> None:
        if counting["on"]:
            counting["driver_s"] += time.process_time() - counting["started"]
            counting["statements"] += 1

    def one() -> float:
        job_id = bench.create()
        counting["on"] = True
        started = time.process_time()
        lease = claim_for_token(database, job_id, "generate", lease_ttl_s=60).lease
        assert lease is not None
        claimed = time.process_time()
        counting["on"] = False
        stored = bench.store_output(lease)
        counting["on"] = True
        finishing = time.process_time()
        bench.finish(lease, stored)
        finished = time.process_time()
        counting["on"] = False
        return (claimed - started) + (finished - finishing)

    for _ in range(WARM_JOBS):
        one()
    # The jobs' own cost with no listener, then the driver's share with the two listeners
    # (whose own calls would otherwise count as above the driver).
    total_s = sum(one() for _ in range(jobs))
    event.listen(database.engine, "before_cursor_execute", _before)
    event.listen(database.engine, "after_cursor_execute", _after)
    for _ in range(jobs):
        one()
    database.dispose()
    per_job_ms = 1000 * total_s / jobs
    driver_ms = 1000 * counting["driver_s"] / jobs
    return {
        "statements_per_job": counting["statements"] / jobs,
        "claim_and_finish_cpu_ms": round(per_job_ms, 3),
        "driver_cpu_ms": round(driver_ms, 3),
        "above_driver_cpu_ms": round(per_job_ms - driver_ms, 3),
        "above_driver_share": round(1 - driver_ms / per_job_ms, 2),
        "above_driver_us_per_statement": round(
            1000 * (per_job_ms - driver_ms) / (counting["statements"] / jobs), 1
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--database-url", default=None, help="a PostgreSQL server's URL")
    args = parser.parse_args()
    result: dict[str, Any] = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores",
        "jobs": args.jobs,
        "sqlite": measure(args.jobs, None),
    }
    if args.database_url:
        with scratch_postgres(args.database_url) as url:
            result["postgresql"] = measure(args.jobs, url)
    for name in ("sqlite", "postgresql"):
        if name in result:
            print(name, result[name])
    write_result("statement-cost", result)


if __name__ == "__main__":
    main()
