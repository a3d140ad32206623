"""What a streaming language-model job costs in SQL, and how soon a follower of its events
sees each token (issue 19, target 4), run through `bench/streams.py --text`.

    .venv/bin/python bench/streams.py --text [--tokens 1000] [--rate 200]

A real API (`genq api`: gunicorn, 1 process of 8 threads) on a PostgreSQL database of the
run's own and a real Redis; the job is claimed here and its tokens are recorded by the runner's
own EventRecorder, as a model server's TextDelta events reach it: `--tokens` of them, `--rate`
a second (200/s is a GPU-sized model). A follower reads `GET /v1/jobs/{id}/events` over HTTP
meanwhile. Each token's text is its number, so the follower knows when it saw each one;
latency is token made (on the model's schedule) -> its text read from the stream; a recorder
that cannot keep up falls behind the model, as it would behind a model server's stream (the
latency from the token's hand-over to the recorder is given too).

Transactions are counted two ways: the recorder's write transactions while the tokens stream
(a SQLAlchemy begin hook; the finishing transaction apart), and every transaction the database
committed meanwhile, the API's reads and each connection's pre-ping included
(pg_stat_database.xact_commit, read after PostgreSQL has flushed its statistics).

Three runs side by side, on the same machine:
- `before`: GENQ_TOKEN_FLUSH_MS=0 and no wake-ups (the recorder's Redis unreachable, so the
  stream polls SQL every 0.3 s): how genq behaved before;
- `per_token_woken`: a write per token, with wake-ups;
- `after`: the default, GENQ_TOKEN_FLUSH_MS=100, with wake-ups.
Figures are printed and written to bench/results/streams-text-<UTC time>.json.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
import requests
import sqlalchemy as sa
from sqlalchemy import select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import migrations  # noqa: E402
from bench.common import write_result  # noqa: E402
from core.catalog import ensure_builtins  # noqa: E402
from core.db import READ_ONLY, Database, make_engine  # noqa: E402
from core.events import TextDelta  # noqa: E402
from core.keys import create_key, get_or_create_tenant  # noqa: E402
from core.leases import claim_job, finish_job  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.states import JobKind, JobState  # noqa: E402
from core.tables import JobEvent  # noqa: E402
from scheduler.enqueue import Publisher  # noqa: E402
from scheduler.recorder import EventRecorder  # noqa: E402
from scheduler.runner import JobSnapshot, Runner  # noqa: E402
from tests.support.stackproc import free_port  # noqa: E402

PG_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")
UNREACHABLE_REDIS = "redis://127.0.0.1:9/0"  # the discard port: nothing listens there
THREADS = 8


def _admin() -> sa.Engine:
    return make_engine(PG_URL).execution_options(isolation_level="AUTOCOMMIT")


def _xact_commit(engine: sa.Engine, name: str) -> int:
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_stat_clear_snapshot()"))
        return int(
            conn.execute(
                sa.text("SELECT xact_commit FROM pg_stat_database WHERE datname = :n"), {"n": name}
            ).scalar_one()
        )


def _start_api(settings: Settings, port: int, var_dir: Path) -> subprocess.Popen[bytes]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GENQ_")},
        "GENQ_DATABASE_URL": str(settings.database_url),
        "GENQ_REDIS_URL": str(settings.redis_url),
        "GENQ_VAR_DIR": str(var_dir),
        "GENQ_PORT": str(port),
        "GENQ_API_WORKERS": "1",
        "GENQ_API_THREADS": str(THREADS),
        "GENQ_LOG_LEVEL": "WARNING",
        "GENQ_RATE_LIMITS": "false",
    }
    log = open(var_dir / "api.log", "wb")  # noqa: SIM115 - the child keeps it
    api = subprocess.Popen([sys.executable, "-m", "stack.cli", "api"], env=env, stdout=log,
                           stderr=subprocess.STDOUT, cwd=ROOT)  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code < 500:
                return api
        except requests.RequestException:
            pass
        time.sleep(0.2)
    api.kill()
    raise RuntimeError(f"the API did not start: {(var_dir / 'api.log').read_text()[-2000:]}")


def run(tokens: int, rate: float, flush_ms: int, wakeups: bool) -> dict[str, Any]:
    name = f"genq_bench_text_{uuid.uuid4().hex[:8]}"
    admin = _admin()
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    var_dir = Path(tempfile.mkdtemp(prefix="genq-stream-text-"))
    url = sa.engine.make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        var_dir=var_dir,
        database_url=url,
        redis_url=f"{REDIS.rstrip('/')}/12",
        artifact_root=var_dir / "artifacts",
        token_flush_ms=flush_ms,
    )
    migrations.upgrade(settings)
    redis.Redis.from_url(str(settings.redis_url)).flushdb()
    database = Database(settings)
    publisher = Publisher(
        settings.model_copy(update={"redis_url": UNREACHABLE_REDIS}) if not wakeups else settings
    )
    port = free_port()
    api = _start_api(settings, port, var_dir)
    try:
        with database.transaction() as session:
            ensure_builtins(session)
            tenant = get_or_create_tenant(session, "bench")
            _, key = create_key(session, tenant)
            tenant_id = tenant.id
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {key}"
        base = f"http://127.0.0.1:{port}"
        body = {"kind": "generate", "model": "echo", "params": {}}
        job_id = http.post(f"{base}/v1/jobs", json=body, timeout=10).json()["id"]
        with database.transaction() as session:
            lease = claim_job(session, job_id, lease_ttl_s=600)
        assert lease is not None
        snapshot = JobSnapshot(job_id, tenant_id, JobKind.GENERATE, "echo", "generate", 5, {}, None)
        recorder = EventRecorder(Runner(settings, database, publisher), snapshot, lease)

        made: list[float] = [0.0] * tokens
        seen: dict[int, float] = {}
        opened = threading.Event()

        def follow() -> None:
            with http.get(f"{base}/v1/jobs/{job_id}/events", stream=True, timeout=60) as response:
                opened.set()
                for line in response.iter_lines(decode_unicode=True):
                    if line.startswith("data: "):
                        at = time.monotonic()
                        data = json.loads(line[6:])
                        for number in data.get("text", "").split():
                            seen.setdefault(int(number), at)

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        opened.wait(30)
        # When each of the recorder's write transactions began, while the tokens stream (the
        # finishing transaction, which every job has, is counted apart).
        writes: list[float] = []
        streaming = [True]

        def count(conn: sa.Connection) -> None:
            if streaming[0] and not conn.get_execution_options().get(READ_ONLY, False):
                writes.append(time.monotonic())

        sa.event.listen(database.engine, "begin", count)
        time.sleep(1.5)  # PostgreSQL flushes its statistics at most once a second
        before = _xact_commit(admin, name)
        started = time.monotonic()
        for i in range(tokens):  # a steady model: token i is made at started + i / rate
            time.sleep(max(0.0, started + i / rate - time.monotonic()))
            made[i] = time.monotonic()
            recorder.record(TextDelta(i, f"{i} "))
        streaming[0] = False
        with database.transaction() as session:  # the runner's finishing transaction
            recorder.write_pending(session)
            finish_job(session, lease, JobState.SUCCEEDED)
        recorder.committed()
        recorder.discard_unrecorded(succeeded=True)
        stream_s = time.monotonic() - started
        follower.join(30)
        time.sleep(1.5)
        all_xacts = _xact_commit(admin, name) - before
        with database.read() as session:
            text_rows = len(
                list(
                    session.scalars(
                        select(JobEvent.id).where(
                            JobEvent.job_id == job_id, JobEvent.type == "text_delta"
                        )
                    )
                )
            )
        # From the model's making (its schedule): a recorder that cannot keep up falls behind
        # it, as it would behind a model server's stream; and from the hand-over.
        latencies_ms = sorted(
            (seen[i] - (started + i / rate)) * 1000 for i in range(tokens) if i in seen
        )
        handed_ms = sorted((seen[i] - made[i]) * 1000 for i in range(tokens) if i in seen)
        gaps_ms = [(b - a) * 1000 for a, b in zip(writes, writes[1:], strict=False)]
        return {
            "token_flush_ms": flush_ms,
            "wakeups": wakeups,
            "tokens": tokens,
            "tokens_seen_by_follower": len(latencies_ms),
            "stream_s": round(stream_s, 2),
            # Besides the finishing transaction; the first token is written at once, then
            # each write begins at least GENQ_TOKEN_FLUSH_MS after the one before.
            "stream_write_transactions": len(writes),
            "stream_writes_per_s": round((len(writes) - 1) / (writes[-1] - writes[0]), 2),
            "min_gap_between_writes_ms": round(min(gaps_ms), 1) if gaps_ms else None,
            "text_delta_rows": text_rows,
            "all_transactions": all_xacts,
            "all_transactions_per_s": round(all_xacts / stream_s, 1),
            "latency_p50_ms": round(statistics.median(latencies_ms), 1),
            "latency_p99_ms": round(latencies_ms[int(len(latencies_ms) * 0.99) - 1], 1),
            "latency_max_ms": round(latencies_ms[-1], 1),
            "from_hand_over_p50_ms": round(statistics.median(handed_ms), 1),
            "from_hand_over_p99_ms": round(handed_ms[int(len(handed_ms) * 0.99) - 1], 1),
        }
    finally:
        api.terminate()
        api.wait(30)
        publisher.close()
        database.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def main(tokens: int, rate: float) -> None:
    runs = {
        "before": run(tokens, rate, 0, wakeups=False),
        "per_token_woken": run(tokens, rate, 0, wakeups=True),
        "after": run(tokens, rate, 100, wakeups=True),
    }
    result = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores",
        "api": f"1 process x {THREADS} threads, PostgreSQL",
        "tokens_per_s": rate,
        **runs,
    }
    for label, figures in runs.items():
        print(
            f"{label:>15}: {figures['stream_s']} s, "
            f"{figures['stream_write_transactions']} writes "
            f"({figures['stream_writes_per_s']}/s, closest two "
            f"{figures['min_gap_between_writes_ms']} ms apart), {figures['text_delta_rows']} "
            f"text rows, {figures['all_transactions_per_s']} transactions/s in all; "
            f"token -> follower p50 {figures['latency_p50_ms']} ms, p99 "
            f"{figures['latency_p99_ms']} ms, max {figures['latency_max_ms']} ms; from "
            f"hand-over p50 {figures['from_hand_over_p50_ms']} ms, p99 "
            f"{figures['from_hand_over_p99_ms']} ms "
            f"({figures['tokens_seen_by_follower']}/{tokens} seen)"
        )
    before, after = runs["before"], runs["after"]
    fewer = before["stream_write_transactions"] / after["stream_write_transactions"]
    print(
        f"after vs before: {fewer:.0f}x fewer writes, "
        f"{before['all_transactions'] / max(1, after['all_transactions']):.1f}x fewer "
        f"transactions in all; the stream took {after['stream_s']} s vs {before['stream_s']} s "
        f"({tokens / rate:.1f} s at the model's pace)"
    )
    write_result("streams-text", result)
