"""CPU time of the transaction that finishes a generate job (its placement, its output and the
finish with the tenant's usage, as scheduler/outcomes.py writes them), in-process, against
the same transaction with the two flushes it made before (each lookup flushed the pending
changes first, so the job row was UPDATEd three times). The two run interleaved in one
process, so the ratio holds on a busy machine where the figures through the whole stack move.

    .venv/bin/python bench/finish_cost.py [--jobs 300] [--database-url URL]

Figures are printed and written to bench/results/finish-cost-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import EchoJobs, write_result  # noqa: E402
from core.leases import claim_job, finish_job  # noqa: E402
from core.recording import record_output, record_placement  # noqa: E402
from core.states import JobState  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--database-url", default=None, help="default: SQLite in a temp dir")
    args = parser.parse_args()
    bench = EchoJobs.make(args.database_url, "genq-finish-")
    database, output = bench.database, bench.output

    def one(flush_first: bool) -> float:
        job_id = bench.create()
        with database.transaction() as session:
            lease = claim_job(session, job_id, lease_ttl_s=60)
        assert lease is not None
        stored = bench.store_output(lease)
        started = time.process_time()
        with database.transaction() as session:
            record_placement(session, lease, {"node": "bench"})
            if flush_first:  # what the output lookup's autoflush did
                session.flush()
            record_output(session, lease, output, stored)
            if flush_first:  # what the usage row's locking lookup's autoflush did
                session.flush()
            finish_job(session, lease, JobState.SUCCEEDED, metrics={"load_s": 0.0})
        return 1000 * (time.process_time() - started)

    for _ in range(20):  # warm: statement caches, connections
        one(True)
        one(False)
    before, after = [], []
    for _ in range(args.jobs):
        before.append(one(True))
        after.append(one(False))
    database.dispose()
    database_name = "postgresql" if args.database_url else "sqlite"
    result = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores",
        "database": database_name,
        "jobs": args.jobs,
        "finish_cpu_ms_three_flushes": {
            "mean": round(statistics.fmean(before), 3),
            "p50": round(statistics.median(before), 3),
        },
        "finish_cpu_ms_one_flush": {
            "mean": round(statistics.fmean(after), 3),
            "p50": round(statistics.median(after), 3),
        },
    }
    result["ratio_mean"] = round(
        result["finish_cpu_ms_one_flush"]["mean"] / result["finish_cpu_ms_three_flushes"]["mean"],
        2,
    )
    print(
        f"finish transaction ({database_name}), CPU per job: "
        f"three flushes {result['finish_cpu_ms_three_flushes']['mean']:.2f} ms, "
        f"one flush {result['finish_cpu_ms_one_flush']['mean']:.2f} ms "
        f"(ratio {result['ratio_mean']:.2f})"
    )
    write_result("finish-cost", result)


if __name__ == "__main__":
    main()
