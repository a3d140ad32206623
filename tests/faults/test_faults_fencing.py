"""Fault injection, round two (issue #16): a stale attempt cannot touch its successor (its
cancel names its own attempt, its files are deleted, never promoted), database errors are
transient (retried inside the attempt, else the attempt is released uncounted; never a
`model-error`), a claim whose transaction fails leaves its job claimable and sent again, and a
normal finish raises no `lease lost` alarm. Same harness as tests/faults/test_faults.py; each test
proves that its fault fired.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from core.artifacts import ArtifactStore
from core.tables import Artifact, Job
from tests.support.faults import Cluster, Proc, RayHead, running_ray_head, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.stack]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory, s3_server: Any) -> Iterator[RayHead]:
    """The harness's Ray head, started after moto_server so that its node has the AWS_*
    settings (the S3 case's model server reads its model from the bucket)."""
    var_dir = tmp_path_factory.mktemp("ray-fencing")
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.url
    with running_ray_head(var_dir, {"GENQ_CACHE_DIR": str(var_dir / "node-cache")}) as head:
        yield head


def make_cluster(
    tmp_path: Path, ray_head: RayHead, redis_url: str, db_url: str, **env: str
) -> Cluster:
    return Cluster(tmp_path, db_url, ray_head, redis_url, {k.upper(): v for k, v in env.items()})


def attempt_progress(cluster: Cluster, job_id: str, attempt: int) -> bool:
    """Whether attempt `attempt` has recorded a progress step."""
    current = 0
    for event in cluster.events(job_id):
        if event.type == "state" and event.data.get("to") == "running":
            current = event.data["attempt"]
        elif event.type == "progress" and current == attempt and event.data["step"] >= 1:
            return True
    return False


def stored_outputs(store: ArtifactStore, cluster: Cluster, job_id: str) -> dict[str, int]:
    """Every file in the store under the job's outputs (any attempt), with its size."""
    with cluster.database.transaction() as session:
        job = session.get(Job, job_id)
        assert job is not None
        tenant_id = job.tenant_id
    return dict(store.list(f"outputs/{tenant_id}/{job_id}"))


@pytest.mark.parametrize("store_kind", ["local", "s3"])
def test_stale_attempt_neither_cancels_its_successor_nor_leaves_files(
    tmp_path: Path, ray_head: RayHead, redis_db_url: str, s3_url: str, store_kind: str
) -> None:
    env = {"genq_progress_interval_s": "30"}  # the stale attempt's last progress stays held
    if store_kind == "s3":
        env["genq_artifact_url"] = s3_url
    cluster = make_cluster(
        tmp_path, ray_head, redis_db_url, f"sqlite:///{tmp_path / 'genq.db'}", **env
    )
    try:
        stale = cluster.worker()
        cluster.scheduler()
        warm = cluster.submit({"kind": "generate", "model": "echo", "params": {"message": "w"}})
        assert cluster.wait(warm, 90)["state"] == "succeeded"
        job_id = cluster.submit(
            {
                "kind": "generate",
                "model": "echo",
                "params": {"message": "fenced", "delay_s": 10, "progress_steps": 2},
            }
        )
        wait_until(lambda: attempt_progress(cluster, job_id, 1), 60, "attempt 1 to progress")
        cluster.freeze(stale)  # its attempt goes on on the server meanwhile
        wait_until(
            lambda: any(
                e.data.get("reason") == "lease expired" for e in cluster.events(job_id, "state")
            ),
            30,
            "the reaper to requeue the job",
        )
        # A newer attempt ends an older one still on its server (workers/server.py): attempt 1
        # has an output to write only if its call ended there before attempt 2 arrives.
        wait_until(
            lambda: job_id not in cluster.ray.server_jobs(), 60, "attempt 1 to end on its server"
        )
        healthy = cluster.worker()
        wait_until(lambda: attempt_progress(cluster, job_id, 2), 90, "attempt 2 to progress")
        # The stale worker wakes while attempt 2 runs on the same model server: it finds its
        # lease gone, asks the server to stop *its* attempt, and has an output to write.
        cluster.kill(stale, signal.SIGCONT)
        wait_until(lambda: "lease lost" in stale.text(), 30, "the stale attempt's alarm")
        wait_until(
            lambda: "deleted 1 output file(s) of attempt 1" in stale.text(),
            30,
            "the stale attempt to delete its file",
        )
        job = cluster.wait(job_id, 60)
        assert job["state"] == "succeeded" and job["attempt"] == 2, job
        assert "Traceback" not in healthy.text() and "IllegalTransition" not in healthy.text()
        events = cluster.events(job_id, "state")
        assert not [e for e in events if e.data.get("to") in ("canceling", "canceled")]
        (output,) = job["outputs"]
        with cluster.database.transaction() as session:
            row = session.get(Artifact, output["id"])
            assert row is not None
            path, size, sha256 = row.path, row.size_bytes, row.sha256
        store = ArtifactStore.from_settings(cluster.settings)
        with store.open(path) as f:
            data = f.read()
        assert data == b"fenced" and len(data) == size
        assert hashlib.sha256(data).hexdigest() == sha256
        # One file in the store for the job: the recorded one (the stale attempt's is gone).
        assert stored_outputs(store, cluster, job_id) == {path: size}
        cluster.check_invariants(job_id)
    finally:
        cluster.close()


def terminate_backends(conn: psycopg.Connection[Any]) -> int:
    """Terminate every other client connection to this database; how many were."""
    rows = conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname ="
        " current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
    ).fetchall()
    return sum(1 for (ok,) in rows if ok)


@pytest.mark.postgres
def test_terminated_database_connections_are_transient(
    tmp_path: Path, ray_head: RayHead, redis_db_url: str, fresh_pg_url: str
) -> None:
    cluster = make_cluster(tmp_path, ray_head, redis_db_url, fresh_pg_url)
    try:
        worker = cluster.worker()
        cluster.scheduler()
        ids = [
            cluster.submit(
                {
                    "kind": "generate",
                    "model": "echo",
                    "params": {"message": f"m{n}", "delay_s": 1.5, "progress_steps": 15},
                }
            )
            for n in range(12)
        ]
        killed = 0
        with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                killed += terminate_backends(conn)
                ended = conn.execute(
                    "SELECT count(*) FROM job WHERE id = ANY(%s) AND state IN"
                    " ('succeeded', 'failed', 'canceled')",
                    (ids,),
                ).fetchone()
                if ended and ended[0] == len(ids):
                    break
                time.sleep(0.1)  # a pace for the faults, not a wait for a result
        # The fault fired: connections died mid-transaction in the worker.
        assert killed >= 20, killed
        assert any(
            "administrator command" in p.text() or "AdminShutdown" in p.text()
            for p in cluster.procs
        )
        jobs = [cluster.wait(job_id, 120) for job_id in ids]
        for job in jobs:
            error = job.get("error") or {}
            assert error.get("type") != "model-error", job
            if job["state"] == "failed":  # its attempts ran out while the database was away
                assert error.get("type") in ("transient", "lost") and job["outputs"] == [], job
            else:
                assert job["state"] == "succeeded" and len(job["outputs"]) == 1, job
            cluster.check_invariants(job["id"])
        assert any(job["state"] == "succeeded" for job in jobs)
        assert "IllegalTransitionError" not in worker.text()
    finally:
        cluster.close()


FAIL_ONE_CLAIM = """
CREATE SEQUENCE fault_claims;
CREATE FUNCTION fail_first_claim() RETURNS trigger AS $$
BEGIN
  IF OLD.state = 'queued' AND NEW.state = 'running' AND nextval('fault_claims') = 1 THEN
    RAISE EXCEPTION 'injected fault: the claim transaction fails';
  END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER fail_first_claim BEFORE UPDATE ON job
  FOR EACH ROW EXECUTE FUNCTION fail_first_claim();
"""


@pytest.mark.postgres
def test_a_failed_claim_leaves_the_job_claimable_and_sent_again(
    tmp_path: Path, ray_head: RayHead, redis_db_url: str, fresh_pg_url: str
) -> None:
    cluster = make_cluster(tmp_path, ray_head, redis_db_url, fresh_pg_url)
    try:
        with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
            conn.execute(FAIL_ONE_CLAIM)
        worker = cluster.worker()
        cluster.scheduler()
        job_id = cluster.submit({"kind": "generate", "model": "echo", "params": {"message": "c"}})
        job = cluster.wait(job_id, 60)
        # The fault fired: the first claim's transaction raised, the second one ran.
        with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
            row = conn.execute("SELECT last_value FROM fault_claims").fetchone()
        assert row is not None and row[0] >= 2
        assert "injected fault" in worker.text() and "the claim failed" in worker.text()
        # Nothing of the failed claim was written: the job ran once, on attempt 1.
        assert job["state"] == "succeeded" and job["attempt"] == 1, job
        assert len(job["outputs"]) == 1
        cluster.check_invariants(job_id)
    finally:
        cluster.close()


def test_no_lease_lost_alarm_after_normal_finishes(
    tmp_path: Path, ray_head: RayHead, redis_db_url: str
) -> None:
    # The keeper looks at the row every 50 ms: a finish it mistook for a lost lease would show.
    cluster = make_cluster(
        tmp_path,
        ray_head,
        redis_db_url,
        f"sqlite:///{tmp_path / 'genq.db'}",
        genq_heartbeat_interval_s="0.05",
    )
    try:
        worker: Proc = cluster.worker()
        ids = [
            cluster.submit({"kind": "generate", "model": "echo", "params": {"message": f"n{n}"}})
            for n in range(40)
        ]
        jobs = [cluster.wait(job_id, 120) for job_id in ids]
        assert all(j["state"] == "succeeded" and j["attempt"] == 1 for j in jobs)
        text = worker.text()
        assert text.count("finished: succeeded") >= 40  # the finishes the alarm would follow
        assert "lease lost" not in text, text[-3000:]
    finally:
        cluster.close()
