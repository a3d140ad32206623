"""What the typed answers (api/schemas.py) cost a page of jobs, against the alternatives.

    .venv/bin/python bench/openapi_render.py [--jobs 1000] [--rounds 7] [--before REV]

--jobs finished jobs on SQLite, each with an output, metrics and a placement, rendered by
`api.payloads.render_jobs` as GET /v1/jobs renders a page (the queries and the dicts), side
by side in one run, rounds interleaved:

- before: `render_jobs` of api/payloads.py at git revision REV (default: main), whose builders
  return untyped dicts;
- after: `render_jobs` of this checkout, whose builders are typed to api.schemas.Job (a typed
  dict: nothing happens at run time);
- validated: after, then the page validated by pydantic against `list[api.schemas.Job]`, the
  cost of sending every answer through the models at run time;
- build_before, build_after, build_validated: the same, the builder (`job_payload`) alone on
  jobs and a context loaded once (no queries).

Printed and written to bench/results/openapi-render-<UTC time>.json: each variant's median
milliseconds per render and its ratio to before (build_*: to build_before).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import insert, select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import migrations  # noqa: E402
from api import payloads, schemas  # noqa: E402
from bench.common import write_result  # noqa: E402
from core.catalog import ensure_builtins  # noqa: E402
from core.db import Database  # noqa: E402
from core.ids import new_id  # noqa: E402
from core.keys import get_or_create_tenant  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.tables import Artifact, Job, utcnow  # noqa: E402


def module_at(revision: str, folder: Path) -> Any:
    """api/payloads.py as it was at `revision`, imported under another name."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{revision}:api/payloads.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = folder / "payloads_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("payloads_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def fill(database: Database, tenant_id: str, jobs: int) -> None:
    finished = utcnow() - timedelta(minutes=5)
    ids = [new_id() for _ in range(jobs)]
    placement = {
        "node_id": "node-1",
        "node_ip": "10.0.0.1",
        "hostname": "host-1",
        "gpu_ids": ["0"],
        "replica": "echo-0",
    }
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
                    params={"message": "hello", "steps": 4},
                    attempt=1,
                    metrics={"loss": 0.25, "load_s": 1.5},
                    placement=placement,
                    started_at=finished - timedelta(seconds=2),
                    finished_at=finished,
                    created_at=finished - timedelta(seconds=3),
                    updated_at=finished,
                )
                for j in ids
            ],
        )
        session.execute(
            insert(Artifact),
            [
                dict(
                    id=new_id(),
                    job_id=j,
                    tenant_id=tenant_id,
                    name="out.txt",
                    kind="text",
                    path=f"{tenant_id}/{j}/out.txt",
                    content_type="text/plain",
                    size_bytes=5,
                    sha256="0" * 64,
                    meta={},
                    created_at=finished,
                )
                for j in ids
            ],
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--before", default="main")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="genq-bench-openapi-"))
    before = module_at(args.before, folder)
    settings = Settings(_env_file=None, var_dir=folder)  # type: ignore[call-arg]
    migrations.upgrade(settings)
    database = Database(settings)
    with database.transaction() as session:
        ensure_builtins(session)
        tenant_id = get_or_create_tenant(session, "bench").id
    fill(database, tenant_id, args.jobs)
    page = TypeAdapter(list[schemas.Job])

    def render(module: Any, validate: bool = False) -> Callable[[], int]:
        def run() -> int:
            with database.read() as session:
                jobs = list(session.scalars(select(Job).order_by(Job.created_at.desc())))
                rendered = module.render_jobs(session, jobs, slots=1)
            if validate:
                page.validate_python(rendered)
            return len(rendered)

        return run

    # The builders alone, on jobs and their context loaded once: what the typing could cost.
    with database.read() as session:
        loaded = list(session.scalars(select(Job).order_by(Job.created_at.desc())))
        context = payloads.load_context(session, loaded, slots=1)
        session.expunge_all()

    def build(module: Any, validate: bool = False) -> Callable[[], int]:
        def run() -> int:
            built = [module.job_payload(job, context) for job in loaded]
            if validate:
                page.validate_python(built)
            return len(built)

        return run

    variants = {
        "before": render(before),
        "after": render(payloads),
        "validated": render(payloads, validate=True),
        "build_before": build(before),
        "build_after": build(payloads),
        "build_validated": build(payloads, validate=True),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for name, run in variants.items():  # one untimed round each: caches, imports
        assert run() == args.jobs, name
    names = list(variants)
    for round_ in range(args.rounds):
        # Each round starts with another variant, so none always runs first or last.
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            run = variants[name]
            gc.collect()  # no variant pays for another's garbage
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(spent) * 1000 for name, spent in times.items()}
    figures = {
        "jobs": args.jobs,
        "rounds": args.rounds,
        "before_revision": args.before,
        "database": database.engine.dialect.name,
        "median_ms": {name: round(ms, 1) for name, ms in medians.items()},
        "ratio_to_before": {
            name: round(ms / medians["build_before" if name.startswith("build") else "before"], 3)
            for name, ms in medians.items()
        },
    }
    print(json.dumps(figures, indent=1))
    write_result("openapi-render", figures)
    database.dispose()
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
