"""genq on namespace hosts (tests/support/multihost.py), for tests/stack/test_multihost.py: the
services host (its own PostgreSQL, Redis and moto_server, reached over the bridge only), a Ray head,
GPU hosts, a Celery host and an API host, each started as the README's "Running on a cluster" says,
with leases of a few seconds; and a client of the API host's HTTP address, which reads PostgreSQL
for the job history.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Any

import requests

from core.db import Database
from core.settings import Settings
from core.tables import Artifact, JobEvent, Model
from tests.support.multihost import Host, Lab, Proc, port_open, postgres_bin
from tests.support.recovery import FAST_RECOVERY, wait_until

BIN = Path(sys.executable).parent
GENQ = [sys.executable, "-m", "stack.cli"]
TERMINAL = {"succeeded", "failed", "canceled"}
BUCKET = "genq-artifacts"

# Leases of a few seconds (as tests/support/faults.py), so that a dead host's job is
# requeued at once; Ray declares a silent node dead after about three seconds.
FAST = {
    **FAST_RECOVERY,
    "GENQ_WORKER_CONCURRENCY": "4",
    "GENQ_MAX_ATTEMPTS": "4",
    "GENQ_CLUSTER_SNAPSHOT_INTERVAL_S": "1",
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


class Cluster:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.admin_key = "gq_multihost_" + secrets.token_hex(16)
        check = lab.add_host
        self.services = check("services")
        self.head = check("head")
        self.gpus = [check("gpu1"), check("gpu2")]
        self.celery = check("celery")
        self.api_host = check("api")
        svc = self.services.ip
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("GENQ_", "RAY_", "AWS_")) and "proxy" not in k.lower()
        }
        self.env = {
            **base,
            **FAST,
            "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
            "GENQ_VAR_DIR": "/tmp/genq",  # on the host's own tmpfs
            "GENQ_DATABASE_URL": f"postgresql://postgres@{svc}:5432/postgres",
            "GENQ_REDIS_URL": f"redis://{svc}:6379/0",
            "GENQ_RAY_ADDRESS": f"{self.head.ip}:6379",
            "GENQ_ARTIFACT_URL": f"s3://{BUCKET}/cluster",
            "GENQ_SECRET_KEY": "multihost",
            "GENQ_ADMIN_KEY": self.admin_key,
            "AWS_ENDPOINT_URL": f"http://{svc}:5000",
            "AWS_ACCESS_KEY_ID": "multihost",
            "AWS_SECRET_ACCESS_KEY": "multihost-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
        }
        self.url = f"http://{self.api_host.ip}:8000"
        self.http = requests.Session()
        self.http.trust_env = False  # no proxy: the API host is on our bridge
        self.http.headers["Authorization"] = f"Bearer {self.admin_key}"
        self.database: Database | None = None

    def host_env(self, host: Host, **extra: str) -> dict[str, str]:
        return {**self.env, "GENQ_NODE_IP": host.ip, **extra}

    # -- starting the hosts' processes -------------------------------------------------------

    def start_services(self) -> None:
        svc = self.services
        pg = postgres_bin()
        assert pg is not None
        subnet = f"{self.lab.prefix}.0/24"
        script = (
            f"{pg}/initdb -D /tmp/pg -A trust -U postgres >/dev/null && "
            f"echo 'host all all {subnet} trust' >> /tmp/pg/pg_hba.conf && "
            f"exec {pg}/postgres -D /tmp/pg -c listen_addresses={svc.ip} "
            "-c unix_socket_directories=/tmp -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        env = self.host_env(svc)
        svc.run("postgres", ["runuser", "-u", "postgres", "--", "sh", "-c", script], env)
        svc.run("redis", ["redis-server", "--bind", svc.ip, "--port", "6379", "--save", "",
                          "--appendonly", "no", "--protected-mode", "no"], env)  # fmt: skip
        svc.run("s3", [str(BIN / "moto_server"), "-H", svc.ip, "-p", "5000"], env)
        for port, what in ((5432, "PostgreSQL"), (6379, "Redis"), (5000, "the S3 server")):
            wait_until(lambda port=port: port_open(svc.ip, port), 90, what)
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=self.env["AWS_ENDPOINT_URL"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )
        wait_until(lambda: _try(lambda: s3.create_bucket(Bucket=BUCKET)), 60, "the bucket")
        self.s3 = s3

    def start_head(self) -> Proc:
        return self._ray_node(self.head, ["node", "--head"], {})

    def start_gpu_node(self, host: Host) -> Proc:
        declared = {
            "GENQ_RAY_NUM_GPUS": "1",
            "GENQ_RAY_GPU_MEMORY_GB": "16",
            "GENQ_RAY_NUM_CPUS": "2",
        }
        return self._ray_node(host, ["node"], declared)

    def _ray_node(self, host: Host, args: list[str], extra: dict[str, str]) -> Proc:
        # `ray start` gives its raylet 30 s to register and then exits; on a busy machine
        # (the suite beside other work on two cores) that is tried again, as a supervisor would.
        for _ in range(3):
            proc = host.run("ray", [*GENQ, *args], self.host_env(host, **extra))
            wait_until(lambda p=proc: _node_started(p), 180, f"the Ray node of {host.name}")
            if proc.process.poll() is None:
                return proc
            host.procs.remove(proc)
        raise AssertionError(proc.text()[-3000:])

    def start_worker(self) -> Proc:
        host = self.celery
        proc = host.run(
            "worker", [*GENQ, "worker", f"--hostname=celery@{host.name}-{host.boots}"],
            self.host_env(host),
        )  # fmt: skip
        wait_until(lambda: "ready." in proc.text() or proc.process.poll() is not None, 180,
                   "the Celery worker")  # fmt: skip
        assert proc.process.poll() is None, proc.text()[-3000:]
        return proc

    def start_api(self) -> None:
        host = self.api_host
        env = self.host_env(
            host, GENQ_HOST=host.ip, GENQ_PORT="8000", GENQ_API_WORKERS="1", GENQ_API_THREADS="8"
        )
        migrate = host.run("migrate", [*GENQ, "migrate"], env)
        assert migrate.process.wait(180) == 0, migrate.text()[-3000:]
        host.run("scheduler", [*GENQ, "scheduler"], env)
        host.run("api", [*GENQ, "api"], env)
        wait_until(lambda: _try(lambda: self.http.get(f"{self.url}/v1/health").ok), 120, "the API")
        settings = Settings(_env_file=None, database_url=self.env["GENQ_DATABASE_URL"])  # type: ignore[call-arg]
        self.database = Database(settings)

    # -- the API, as a client on the bridge ---------------------------------------------------

    def submit(self, body: dict[str, Any]) -> str:
        response = self.http.post(f"{self.url}/v1/jobs", json=body, timeout=30)
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    def get(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"{self.url}/v1/jobs/{job_id}", timeout=30)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def wait(self, job_id: str, timeout_s: float = 300) -> dict[str, Any]:
        try:
            return dict(wait_until(lambda: (j := self.get(job_id))["state"] in TERMINAL and j,
                                   timeout_s, f"job {job_id} to end"))  # fmt: skip
        except AssertionError:
            raise AssertionError(f"{self.get(job_id)}\n{self.lab.logs()}") from None

    def events(self, job_id: str, type_: str | None = None) -> list[JobEvent]:
        assert self.database is not None
        with self.database.transaction() as session:
            query = session.query(JobEvent).filter(JobEvent.job_id == job_id)
            if type_:
                query = query.filter(JobEvent.type == type_)
            return list(query.order_by(JobEvent.id))

    def progress_steps(self, job_id: str) -> list[tuple[int, int]]:
        attempt, out = 0, []
        for event in self.events(job_id):
            if event.type == "state" and event.data.get("to") == "running":
                attempt = event.data["attempt"]
            elif event.type == "progress":
                out.append((attempt, event.data["step"]))
        return out

    def sha256(self, artifact_id: str) -> str:
        """The SHA-256 recorded when the output was stored."""
        assert self.database is not None
        with self.database.transaction() as session:
            row = session.get(Artifact, artifact_id)
            assert row is not None
            return str(row.sha256)

    def resumed_from(self, job_id: str) -> list[int]:
        """The steps the job's trainers said they resumed from ("resumed from step N")."""
        prefix = "resumed from step "
        return [
            int(e.data["message"][len(prefix) :])
            for e in self.events(job_id, "log")
            if str(e.data.get("message", "")).startswith(prefix)
        ]

    def versions(self, job_id: str) -> int:
        assert self.database is not None
        with self.database.transaction() as session:
            return session.query(Model).filter(Model.job_id == job_id).count()

    def close(self) -> None:
        if self.database is not None:
            self.database.dispose()
        self.http.close()


def _node_started(proc: Proc) -> bool:
    """`ray start` said its node runs, or exited."""
    return "Ray runtime started" in proc.text() or proc.process.poll() is not None


def _try(call: Any) -> Any:
    try:
        return call() or True
    except Exception:
        return False
