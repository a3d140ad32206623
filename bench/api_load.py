"""API requests/s under load: job submission and job status, against a hello-JSON route served
by the same gunicorn (same workers, threads and middleware), measured with wrk.

    .venv/bin/python bench/api_load.py [--duration 10] [--connections 16] [--database-url URL]

Needs `wrk` (Debian package). Submitted jobs are published to Redis DB 12, which nothing
consumes during the run; it is flushed before and after. Figures are printed and written to
bench/results/api-load-<UTC time>.json.
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
from datetime import UTC, datetime
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.stackproc import free_port  # noqa: E402

REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")

POST_SCRIPT = """
wrk.method = "POST"
wrk.body = '{"kind": "generate", "model": "echo", "params": {"message": "x"}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""


def run_wrk(
    url: str, duration_s: int, connections: int, script: Path | None, key: str | None
) -> dict[str, float]:
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{duration_s}s", "--latency"]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk)")

    tmp = Path(tempfile.mkdtemp(prefix="genq-api-load-"))
    broker = f"{REDIS}/12"
    redis.Redis.from_url(broker).flushdb()
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GENQ_")},
        "GENQ_VAR_DIR": str(tmp / "var"),
        "GENQ_REDIS_URL": broker,
        "GENQ_PORT": str(port),
        "GENQ_LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),
    }
    if args.database_url:
        env["GENQ_DATABASE_URL"] = args.database_url
    migrate = subprocess.run(
        [sys.executable, "-m", "api.cli", "migrate"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    key = migrate.stdout.split("admin key (shown once):")[1].strip()
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
            "bench.hello_app:create()",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{base}/bench/hello", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        request = urllib.request.Request(
            f"{base}/v1/jobs",
            method="POST",
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            data=b'{"kind": "generate", "model": "echo", "params": {"message": "x"}}',
        )
        job_id = json.loads(urllib.request.urlopen(request).read())["id"]
        script = tmp / "post.lua"
        script.write_text(POST_SCRIPT % key)
        figures = {
            "hello_json": run_wrk(
                f"{base}/bench/hello", args.duration, args.connections, None, None
            ),
            "job_status": run_wrk(
                f"{base}/v1/jobs/{job_id}", args.duration, args.connections, None, key
            ),
            "job_submit": run_wrk(f"{base}/v1/jobs", args.duration, args.connections, script, None),
        }
    finally:
        server.terminate()
        server.wait(30)
        redis.Redis.from_url(broker).flushdb()

    hello = figures["hello_json"]["requests_per_s"]
    result = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores",
        "database": "postgresql" if args.database_url else "sqlite",
        "server": "gunicorn gthread, 2 workers x 16 threads",
        "load": f"wrk -t2 -c{args.connections} -d{args.duration}s",
        **figures,
        "ratio_status_to_hello": figures["job_status"]["requests_per_s"] / hello,
        "ratio_submit_to_hello": figures["job_submit"]["requests_per_s"] / hello,
    }
    for name, f in figures.items():
        print(
            f"{name:<12} {f['requests_per_s']:8.1f} req/s   p50 {f['p50_ms']:6.1f} ms   "
            f"p99 {f['p99_ms']:6.1f} ms   non-2xx {int(f['non_2xx'])}"
        )
    print(
        f"status / hello: {result['ratio_status_to_hello']:.2f}   "
        f"submit / hello: {result['ratio_submit_to_hello']:.2f}"
    )
    out = ROOT / "bench" / "results" / f"api-load-{result['at'][:19].replace(':', '')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
