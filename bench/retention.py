"""The retention pass (core/retention.py) on a backlog: how fast it frees expired jobs, and
the longest transaction it holds while doing so (the lock every other writer waits for on
SQLite).

    .venv/bin/python bench/retention.py [--jobs 5000] [--batch 500] [--database-url URL]

--jobs finished jobs, each with 2 small outputs in a local artifact folder and 5 events,
finished 30 days ago, are expired by GENQ_RETAIN_OUTPUTS_DAYS=7 and GENQ_RETAIN_JOBS_DAYS=14
in one pass. Printed and written to bench/results/retention-<UTC time>.json: jobs, files and
rows freed per second, and the longest and mean transaction (BEGIN to COMMIT) in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import event, insert

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import migrations  # noqa: E402
from bench.common import write_result  # noqa: E402
from core.artifacts import ArtifactStore  # noqa: E402
from core.catalog import ensure_builtins  # noqa: E402
from core.db import Database  # noqa: E402
from core.ids import new_id  # noqa: E402
from core.keys import get_or_create_tenant  # noqa: E402
from core.retention import Retention  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.tables import Artifact, Job, JobEvent, utcnow  # noqa: E402


def fill(database: Database, store: ArtifactStore, tenant_id: str, jobs: int) -> None:
    finished = utcnow() - timedelta(days=30)
    for start in range(0, jobs, 1000):
        ids = [new_id() for _ in range(min(1000, jobs - start))]
        rows: list[dict[str, Any]] = []
        for job_id in ids:
            for n in range(2):
                stored = store.write_output(tenant_id, job_id, f"out-{n}.txt", b"x" * 512)
                rows.append(
                    dict(
                        id=new_id(),
                        job_id=job_id,
                        tenant_id=tenant_id,
                        name=f"out-{n}.txt",
                        kind="text",
                        path=stored.path,
                        content_type="text/plain",
                        size_bytes=stored.size_bytes,
                        sha256=stored.sha256,
                        meta={},
                        created_at=finished,
                    )
                )
        with database.transaction() as session:
            session.execute(
                insert(Job),
                [
                    dict(
                        id=j,
                        tenant_id=tenant_id,
                        kind="generate",
                        state="succeeded",
                        queue="generate",
                        family="echo",
                        params={},
                        finished_at=finished,
                        created_at=finished,
                        updated_at=finished,
                    )
                    for j in ids
                ],
            )
            session.execute(insert(Artifact), rows)
            session.execute(
                insert(JobEvent),
                [dict(job_id=j, type="log", data={"n": n}) for j in ids for n in range(5)],
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="genq-bench-retention-"))
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        var_dir=folder,
        database_url=args.database_url,
        retain_outputs_days=7,
        retain_jobs_days=14,
        retention_batch_size=args.batch,
    )
    migrations.upgrade(settings)
    database = Database(settings)
    store = ArtifactStore.from_settings(settings)
    with database.transaction() as session:
        ensure_builtins(session)
        tenant_id = get_or_create_tenant(session, f"bench-{new_id()[:8]}").id
    fill(database, store, tenant_id, args.jobs)

    spans: list[float] = []
    began: dict[int, float] = {}
    event.listen(
        database.engine, "begin", lambda conn: began.__setitem__(id(conn), time.perf_counter())
    )

    def ended(conn: Any) -> None:
        if id(conn) in began:
            spans.append(time.perf_counter() - began.pop(id(conn)))

    event.listen(database.engine, "commit", ended)
    event.listen(database.engine, "rollback", ended)
    start = time.perf_counter()
    freed = Retention(settings, database, store).run()
    took = time.perf_counter() - start
    figures = {
        "database": database.engine.dialect.name,
        "jobs": args.jobs,
        "batch": args.batch,
        "freed": freed.as_dict(),
        "seconds": round(took, 2),
        "jobs_per_s": round(freed.jobs / took),
        "files_per_s": round(freed.files / took),
        "transactions": len(spans),
        "longest_transaction_ms": round(1000 * max(spans), 1),
        "mean_transaction_ms": round(1000 * sum(spans) / len(spans), 1),
    }
    print(json.dumps(figures, indent=1))
    write_result("retention", figures)
    database.dispose()
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
