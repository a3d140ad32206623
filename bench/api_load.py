"""API requests/s under load, each against a baseline served by the same gunicorn (same
workers, threads and middleware) in the same run, measured with wrk:

- polling, `GET /v1/jobs/{id}`, against a hello-JSON route (issue #19, target 2: >= 0.4).
  The polled jobs are a mix: a third queued, a third running, a third succeeded with an
  output (claimed and finished in-process through core.jobs, as a worker would), requested in
  turn. `job_status` polls 96 of them (each polled many times a second, as clients that poll
  their jobs several times a second do); `job_status_spread` polls 960 (each about once or
  twice a second at these rates, so most polls render the job afresh from SQL);
- submitting, `POST /v1/jobs`, against the bare endpoint of bench/bare_pipeline.py (insert a
  row, publish a Celery task, nothing else), mounted at /bare in the same workers (target 3:
  >= 0.5).

    .venv/bin/python bench/api_load.py [--duration 10] [--connections 16] [--database-url URL]
        [--root CHECKOUT] [--label before]

Needs `wrk` (Debian package; or WRK=/path/to/wrk). `--root` serves the API from another
checkout (a `git worktree` of an earlier commit, for before/after figures; this file's
hello_app.py and bare_pipeline.py are copied into it). Submitted jobs are published to Redis
DB 12 of BENCH_REDIS_URL, which nothing consumes during the run; it is flushed before and after.
Figures are printed and written to bench/results/api-load[-label]-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.stackproc import free_port  # noqa: E402

REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")

WRK = os.environ.get("WRK", "wrk")
BODY = b'{"kind": "generate", "model": "echo", "params": {"message": "x"}}'

POST_SCRIPT = """
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""

# Each connection's requests go through the ids in turn, from a different start.
POLL_SCRIPT = """
local ids = {%s}
local n = 0
setup = function(thread) thread:set("start", math.random(#ids)) end
init = function(args) n = start end
request = function()
  n = n + 1
  return wrk.format("GET", "/v1/jobs/" .. ids[(n %% #ids) + 1])
end
"""


def run_wrk(
    url: str, duration_s: int, connections: int, script: Path | None, key: str | None
) -> dict[str, float]:
    argv = [WRK, "-t2", f"-c{connections}", f"-d{duration_s}s", "--latency"]
    if script:
        argv += ["-s", str(script)]
    if key:
        argv += ["-H", f"Authorization: Bearer {key}"]
    out = subprocess.run(argv + [url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def ms(label: str) -> float:
        value, unit = re.search(rf"\s{label}\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "requests_per_s": rps,
        "p50_ms": ms("50%"),
        "p99_ms": ms("99%"),
        "non_2xx": float(non_2xx.group(1)) if non_2xx else 0.0,
    }


def submit(base: str, key: str) -> str:
    request = urllib.request.Request(
        f"{base}/v1/jobs",
        method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        data=BODY,
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return str(json.loads(response.read())["id"])


def seed_mix(root: Path, env: dict[str, str], job_ids: list[str]) -> dict[str, int]:
    """Leave a third of the jobs queued, claim a third (running) and claim, give an output and
    finish the last third (succeeded), through core.jobs as a worker does; run with the
    checkout's own code (`root`)."""
    code = """
import json, sys
from core.artifacts import ArtifactStore
from core.db import Database
from core.events import Output
from core.leases import claim_job, finish_job
from core.recording import record_output
from core.settings import Settings
from core.states import JobState

ids = json.loads(sys.stdin.read())
settings = Settings()
database = Database(settings)
store = ArtifactStore.from_settings(settings)
third = len(ids) // 3
for index, job_id in enumerate(ids[third:]):
    with database.transaction() as session:
        lease = claim_job(session, job_id, lease_ttl_s=3600)
        assert lease is not None
        if index < third:
            continue
        data = b"x"
        stored = store.put_bytes(f"bench/{job_id}/output.txt", data)
        record_output(session, lease, Output("output.txt", "text", "text/plain", data), stored)
        finish_job(session, lease, JobState.SUCCEEDED)
"""
    subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(job_ids),
        env=env,
        cwd=root,
        text=True,
        check=True,
    )
    third = len(job_ids) // 3
    return {"queued": third, "running": third, "succeeded": len(job_ids) - 2 * third}


def median_round(runs: list[dict[str, float]]) -> dict[str, float]:
    """The round with the median requests/s, and every round's requests/s."""
    ordered = sorted(runs, key=lambda r: r["requests_per_s"])
    middle = dict(ordered[len(ordered) // 2])
    return {**middle, "rounds_requests_per_s": [r["requests_per_s"] for r in runs]}  # type: ignore[dict-item]


def poll_script(tmp: Path, name: str, job_ids: list[str]) -> Path:
    script = tmp / f"{name}.lua"
    script.write_text(POLL_SCRIPT % ", ".join(f'"{i}"' for i in job_ids))
    return script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per phase and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to serve")
    parser.add_argument("--label", default="", help="in the result file's name: api-load-LABEL-")
    parser.add_argument("--jobs", type=int, default=96, help="polled jobs in job_status")
    parser.add_argument("--spread-jobs", type=int, default=960, help="in job_status_spread")
    args = parser.parse_args()
    if shutil.which(WRK) is None:
        sys.exit("wrk is not installed (apt-get install wrk, or set WRK=/path/to/wrk)")
    root = args.root.resolve()
    if root != ROOT:
        for name in ("hello_app.py", "bare_pipeline.py"):
            shutil.copy(ROOT / "bench" / name, root / "bench" / name)

    tmp = Path(tempfile.mkdtemp(prefix="genq-api-load-"))
    broker = f"{REDIS}/12"
    redis.Redis.from_url(broker).flushdb()
    port = free_port()
    database_url = args.database_url or f"sqlite:///{tmp / 'var' / 'genq.db'}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("GENQ_", "BARE_"))},
        "GENQ_VAR_DIR": str(tmp / "var"),
        "GENQ_REDIS_URL": broker,
        "GENQ_DATABASE_URL": database_url,
        "GENQ_PORT": str(port),
        "GENQ_LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(root),
        # The bare endpoint writes its own table in the same database, publishes to the same
        # Redis.
        "BARE_DATABASE_URL": database_url,
        "BARE_BROKER_URL": broker,
    }
    migrate = subprocess.run(
        [sys.executable, "-m", "stack.cli", "migrate"],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    key = migrate.stdout.split("admin key (shown once):")[1].strip()
    # Made before the workers start: two of them creating it at once fail on PostgreSQL.
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from bench.bare_pipeline import create_table, database_url, make_engine;"
            "create_table(make_engine(database_url()))",
        ],
        env=env,
        cwd=root,
        check=True,
    )
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    server = subprocess.Popen(
        [
            gunicorn,
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "2",
            "--worker-class",
            "gthread",
            "--threads",
            "16",
            "bench.hello_app:create_with_bare()",
        ],
        env=env,
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1800):  # a loaded machine may take minutes to start it
            try:
                urllib.request.urlopen(f"{base}/bench/hello", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        with ThreadPoolExecutor(8) as pool:
            spread = list(pool.map(lambda _: submit(base, key), range(args.spread_jobs)))
        mix = seed_mix(root, env, spread)
        # Every third job of the spread, so that the small set has the same mix.
        third = len(spread) // 3
        per_state = args.jobs // 3
        small = [
            job for start in (0, third, 2 * third) for job in spread[start : start + per_state]
        ]
        post = tmp / "post.lua"
        post.write_text(POST_SCRIPT % (BODY.decode(), key))
        d, c = args.duration, args.connections
        phases = {
            "hello_json": (f"{base}/bench/hello", None, None),
            "job_status": (base, poll_script(tmp, "poll", small), key),
            "job_status_spread": (base, poll_script(tmp, "spread", spread), key),
            "bare_submit": (f"{base}/bare/jobs", post, None),
            "job_submit": (f"{base}/v1/jobs", post, None),
        }
        # The phases take turns, round after round: on a shared machine the load of others
        # drifts, and each phase should see the same drift as its baseline.
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in phases}
        for _ in range(args.rounds):
            for name, (url, script, auth) in phases.items():
                rounds[name].append(run_wrk(url, d, c, script, auth))
        figures = {name: median_round(runs) for name, runs in rounds.items()}
    finally:
        server.terminate()
        server.wait(30)
        redis.Redis.from_url(broker).flushdb()

    hello = figures["hello_json"]["requests_per_s"]
    bare = figures["bare_submit"]["requests_per_s"]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    at = datetime.now(UTC).isoformat(timespec="seconds")
    result: dict[str, object] = {
        "at": at,
        "commit": commit,
        "machine": f"{os.cpu_count()} cores",
        "load_average": os.getloadavg(),
        "database": "postgresql" if args.database_url else "sqlite",
        "server": "gunicorn gthread, 2 workers x 16 threads",
        "load": f"wrk -t2 -c{args.connections} -d{args.duration}s, {args.rounds} rounds "
        "taking turns (the median round is given)",
        "polled": {
            "job_status": {
                "jobs": len(small),
                "queued": per_state,
                "running": per_state,
                "succeeded": per_state,
            },
            "job_status_spread": {"jobs": len(spread), **mix},
            "key": "admin (not rate limited)",
        },
        **figures,
        "ratio_status_to_hello": figures["job_status"]["requests_per_s"] / hello,
        "ratio_status_spread_to_hello": figures["job_status_spread"]["requests_per_s"] / hello,
        "ratio_submit_to_bare": figures["job_submit"]["requests_per_s"] / bare,
        "ratio_submit_to_hello": figures["job_submit"]["requests_per_s"] / hello,
    }
    for name, f in figures.items():
        print(
            f"{name:<18} {f['requests_per_s']:8.1f} req/s   p50 {f['p50_ms']:6.1f} ms   "
            f"p99 {f['p99_ms']:6.1f} ms   non-2xx {int(f['non_2xx'])}"
        )
    print(
        f"status / hello: {result['ratio_status_to_hello']:.2f}   "
        f"status spread / hello: {result['ratio_status_spread_to_hello']:.2f}   "
        f"submit / bare: {result['ratio_submit_to_bare']:.2f}"
    )
    label = f"{args.label}-" if args.label else ""
    stamp = at[:19].replace(":", "")
    out = ROOT / "bench" / "results" / f"api-load-{label}{stamp}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
