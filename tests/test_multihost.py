"""genq on six hosts that share no disk: the multi-host test of the README's cluster layout.

Hosts are Linux namespaces (tests/multihost.py), each with its own address on a private bridge,
its own /tmp and /dev/shm and its own process list:

    services  PostgreSQL, Redis, an S3 server (moto_server)   reached over the network only
    head      the Ray head (`genq node --head`, no CPU)
    gpu1/2    Ray worker nodes (`genq node`, one GPU and 16 GB of gpu_memory_gb each)
    celery    `genq worker`, which starts its own zero-resource Ray node
    api       `genq api` and `genq scheduler`, no Ray at all

The test drives it through the API host's HTTP address, like a client, and reads PostgreSQL for
the job history. It shows: two models trained at once, each on its own GPU host; their
outputs generated there and downloaded from the API host; a GPU host power-cut mid-training,
and the job resumed on the other from its checkpoint in object storage, one model version;
the Celery host power-cut mid-run and rebooted with nothing lost.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from core.db import Database
from core.settings import Settings
from core.tables import Artifact, JobEvent, Model
from scheduler.snapshot import read_snapshots
from tests.multihost import (
    Host,
    Lab,
    NamespacesUnavailableError,
    Proc,
    check_namespaces,
    command_name,
    port_open,
    postgres_bin,
    wait_until,
)

pytestmark = [pytest.mark.multihost, pytest.mark.stack]

BIN = Path(sys.executable).parent
GENQ = [sys.executable, "-m", "api.cli"]
TERMINAL = {"succeeded", "failed", "canceled"}
BUCKET = "genq-artifacts"

# Leases of a few seconds (as tests/test_faults_support.py), so that a dead host's job is
# requeued at once; Ray declares a silent node dead after about three seconds.
FAST = {
    "GENQ_LEASE_TTL_S": "3",
    "GENQ_HEARTBEAT_INTERVAL_S": "1",
    "GENQ_REAP_INTERVAL_S": "0.5",
    "GENQ_RECONCILE_INTERVAL_S": "1",
    "GENQ_REPUBLISH_AFTER_S": "2",
    "GENQ_VISIBILITY_TIMEOUT_S": "60",
    "GENQ_RETRY_BACKOFF_BASE_S": "0.5",
    "GENQ_RETRY_BACKOFF_MAX_S": "2",
    "GENQ_PROGRESS_INTERVAL_S": "0",
    "GENQ_WORKER_CONCURRENCY": "4",
    "GENQ_MAX_ATTEMPTS": "4",
    "GENQ_LOG_LEVEL": "INFO",
    "GENQ_CLUSTER_SNAPSHOT_INTERVAL_S": "1",
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}

# Tiny, but long enough on two cores to be caught mid-way; a checkpoint every 5 steps.
TRAIN = {"kind": "train", "dataset": "digits", "resources": {"num_gpus": 1}}
TRAIN_PARAMS = {"preset": "tiny", "batch_size": 8, "checkpoint_every": 5, "seed": 1}


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
            "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
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
        proc = host.run("ray", [*GENQ, *args], self.host_env(host, **extra))
        wait_until(lambda: "Ray runtime started" in proc.text() or proc.process.poll() is not None,
                   120, f"the Ray node of {host.name}")  # fmt: skip
        assert proc.process.poll() is None, proc.text()[-3000:]
        return proc

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


def _try(call: Any) -> Any:
    try:
        return call() or True
    except Exception:
        return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    try:
        check_namespaces()
    except NamespacesUnavailableError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"the multi-host test must run under CI: {exc}")
        pytest.skip(f"cannot make namespace hosts here: {exc}")
    lab = Lab(tmp_path_factory.mktemp("multihost"))
    c = None
    try:
        c = Cluster(lab)
        c.start_services()
        c.start_head()
        for host in c.gpus:
            c.start_gpu_node(host)
        c.start_api()
        c.start_worker()
        yield c
    except BaseException:
        print(lab.logs(), file=sys.stderr)
        raise
    finally:
        if c is not None:
            c.close()
        lab.close()


def placement_ip(job: dict[str, Any]) -> str:
    """The address of the node the job ran on, as the job records it, with the GPU it held
    there (each GPU host declares one: id 0)."""
    placement = job.get("placement") or {}
    assert placement.get("node_ip"), f"the job does not say where it ran: {job}"
    assert placement.get("node_id") and placement.get("gpu_ids") == ["0"], placement
    return str(placement["node_ip"])


def trainers(host: Host) -> int:
    """Trainer actor processes running on `host`."""
    return sum(1 for c in _commands(host) if c.startswith(b"ray::Trainer"))


def test_the_hosts_share_no_disk_and_the_api_host_runs_no_ray(cluster: Cluster) -> None:
    # Each host has its own /tmp: the Ray sessions live only where their node runs.
    roots = {h.name: Path(f"/proc/{h.init_pid}/root/tmp") for h in cluster.lab.hosts.values()}
    for name in ("head", "gpu1", "gpu2", "celery"):
        assert (roots[name] / "ray").is_dir(), name
    for name in ("api", "services"):
        assert not (roots[name] / "ray").exists(), name
    # The worker started its own Ray node (no CPU, no GPU) on the Celery host.
    commands = [
        Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        for pid in cluster.celery.processes()
    ]
    assert any(b"raylet" in c for c in commands)
    assert not any(b"raylet" in c or b"gcs_server" in c for c in _commands(cluster.api_host))
    # ... and neither the API (gunicorn) nor the periodic scheduler has even loaded Ray.
    api_pids = cluster.api_host.processes()
    assert len(api_pids) >= 3  # gunicorn's arbiter and worker, the scheduler
    for pid in api_pids:
        assert "_raylet" not in Path(f"/proc/{pid}/maps").read_text(), command_name(pid)
    # What the dashboard's overview shows (the worker's snapshot in Redis): four Ray nodes,
    # each at its host's address; only the GPU hosts declare a GPU and gpu_memory_gb.
    broker = redis.Redis.from_url(cluster.env["GENQ_REDIS_URL"])
    try:
        nodes = wait_until(lambda: _alive_nodes(broker), 60, "the cluster snapshot")
    finally:
        broker.close()
    by_ip = {n["address"]: n["resources"] for n in nodes}
    hosts = cluster.lab.hosts
    assert set(by_ip) == {hosts[n].ip for n in ("head", "gpu1", "gpu2", "celery")}, by_ip
    for name in ("gpu1", "gpu2"):
        assert by_ip[hosts[name].ip]["GPU"] == 1.0
        assert by_ip[hosts[name].ip]["gpu_memory_gb"] == 16.0
    for name in ("head", "celery"):
        assert "GPU" not in by_ip[hosts[name].ip] and "CPU" not in by_ip[hosts[name].ip]

    # And as an operator sees it: the dashboard of the API host lists the nodes.
    browser = requests.Session()
    browser.trust_env = False
    login = browser.get(f"{cluster.url}/admin/login", timeout=30).text
    token = re.search(r'name="csrf_token" value="([^"]+)"', login)
    assert token, login
    response = browser.post(
        f"{cluster.url}/admin/login",
        data={"key": cluster.admin_key, "csrf_token": token.group(1)},
        timeout=30,
    )
    assert response.status_code == 200 and "Ray nodes and GPUs" in response.text, response.text
    assert "GPUs: 2.0 declared to Ray" in response.text
    assert response.text.count("16.0 GB") == 2
    for name in ("head", "gpu1", "gpu2", "celery"):
        assert f"<td>{hosts[name].ip}</td>" in response.text
    browser.close()

    # `ray status`, from any machine with the token, counts the same.
    status = cluster.celery.run(
        "ray-status",
        [str(BIN / "ray"), "status", f"--address={cluster.env['GENQ_RAY_ADDRESS']}"],
        cluster.host_env(cluster.celery),
    )
    assert status.process.wait(120) == 0, status.text()
    assert "0.0/2.0 GPU" in status.text() and "0.0/32.0 gpu_memory_gb" in status.text()


def _alive_nodes(broker: redis.Redis) -> list[dict[str, Any]] | None:
    for snap in read_snapshots(broker):
        view = snap.get("ray") or {}
        nodes = [n for n in view.get("nodes", []) if n.get("alive")]
        if len(nodes) == 4:
            return nodes
    return None


def _commands(host: Host) -> list[bytes]:
    out = []
    for pid in host.processes():
        try:
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" "))
        except OSError:
            continue
    return out


def test_two_models_at_once_on_two_gpu_hosts_and_a_gpu_host_dies(cluster: Cluster) -> None:
    jobs = {
        name: cluster.submit(
            {**TRAIN, "family": "gan", "name": f"mh-{name}",
             "params": {**TRAIN_PARAMS, "steps": 150}}
        )
        for name in ("a", "b")
    }  # fmt: skip
    gpu1, gpu2 = cluster.gpus

    # Both train at the same time, each on its own GPU host (each holds a whole GPU): one
    # trainer process on each GPU host, and each job says which host.
    def both_running() -> dict[str, dict[str, Any]] | None:
        now = {n: cluster.get(j) for n, j in jobs.items()}
        if all(j["state"] == "running" and (j["progress"] or {}).get("step") for j in now.values()):
            return now
        return None

    running = wait_until(both_running, 240, "both training jobs running at once")
    assert trainers(gpu1) == trainers(gpu2) == 1
    ips = {n: placement_ip(j) for n, j in running.items()}
    assert set(ips.values()) == {gpu1.ip, gpu2.ip}, ips

    # Power cut on gpu1 once both have checkpointed (in object storage).
    wait_until(lambda: all(cluster.get(j)["progress"]["step"] >= 12 for j in jobs.values()), 240,
               "a checkpoint of each job")  # fmt: skip
    hit = next(n for n in jobs if ips[n] == gpu1.ip)
    killed = " | ".join(gpu1.kill().values())
    # Its raylet and the trainer among them: all SIGKILLed, none left.
    assert "raylet" in killed and "ray::Trainer" in killed, killed
    killed_at = max(step for _, step in cluster.progress_steps(jobs[hit]))

    done = {n: cluster.wait(j, 600) for n, j in jobs.items()}
    assert all(j["state"] == "succeeded" for j in done.values()), done
    # Only the job on the dead host needed a second attempt.
    assert {n for n, j in done.items() if j["attempt"] > 1} == {hit}, done
    job = done[hit]
    assert placement_ip(job) == gpu2.ip  # resumed on the other GPU host
    # From a checkpoint in object storage (gpu2 never had this job's files): at most one
    # interval of the steps recorded before the power cut is done again.
    [resumed] = cluster.resumed_from(jobs[hit])
    assert resumed % 5 == 0 and resumed >= max(5, killed_at - 5), (killed_at, resumed)
    for name, job_id in jobs.items():
        assert cluster.versions(job_id) == 1
        assert done[name]["result_model"] == f"mh-{name}:1"

    # The lost host comes back with an empty disk and joins again.
    gpu1.boot()
    cluster.start_gpu_node(gpu1)

    # Generate on both trained models at once, each model's server on its own GPU host (the
    # trained weights come from object storage); the outputs download from the API host,
    # which shares no disk with them.
    gens = {
        n: cluster.submit({"kind": "generate", "model": f"mh-{n}:1",
                           "params": {"num_images": 2, "label": 3, "seed": 7}})
        for n in ("a", "b")
    }  # fmt: skip
    made = {n: cluster.wait(j, 300) for n, j in gens.items()}
    assert {placement_ip(j) for j in made.values()} == {gpu1.ip, gpu2.ip}, made
    for job in made.values():
        assert job["state"] == "succeeded", job
        assert len(job["outputs"]) == 2
        for output in job["outputs"]:
            response = cluster.http.get(cluster.url + output["url"], timeout=60)
            assert response.status_code == 200, response.text
            assert len(response.content) == output["bytes"]
            assert response.content[:8] == b"\x89PNG\r\n\x1a\n"
            assert hashlib.sha256(response.content).hexdigest() == cluster.sha256(output["id"])


def test_a_celery_host_restarted_mid_run_loses_nothing(cluster: Cluster) -> None:
    train = cluster.submit(
        {**TRAIN, "family": "gan", "name": "mh-c", "params": {**TRAIN_PARAMS, "steps": 200}}
    )
    echoes = [
        cluster.submit({"kind": "generate", "model": "echo",
                        "params": {"message": f"m{i}", "delay_s": 3, "progress_steps": 3}})
        for i in range(4)
    ]  # fmt: skip
    wait_until(lambda: cluster.get(train)["progress"]["step"] >= 12, 240, "training progress")
    killed = " | ".join(cluster.celery.kill().values())
    # The Celery worker (the Ray driver) and the Ray node it started: SIGKILLed, none left.
    assert "api.cli worker" in killed and "raylet" in killed, killed
    # With the worker gone no job changes state until its lease expires: these were running.
    running = {j for j in [train, *echoes] if cluster.get(j)["state"] == "running"}
    assert train in running
    killed_at = max(step for _, step in cluster.progress_steps(train))
    cluster.celery.boot()  # an empty disk: the new worker starts a new Ray node
    cluster.start_worker()
    for job_id in [train, *echoes]:
        job = cluster.wait(job_id, 400)
        assert job["state"] == "succeeded", job
        if job_id in running:
            assert job["attempt"] >= 2, job
        names = [o["name"] for o in job["outputs"]]
        assert len(names) == len(set(names))
        terminal = [e for e in cluster.events(job_id, "state") if e.data.get("to") in TERMINAL]
        assert len(terminal) == 1
    # The trainer on its GPU host outlives its driver by the seconds Ray takes to see the
    # driver's node gone, checkpointing on: the next attempt resumes from the last one.
    resumed = cluster.resumed_from(train)
    assert resumed and min(resumed) % 5 == 0 and min(resumed) >= max(5, killed_at - 5), resumed
    assert cluster.versions(train) == 1
    assert cluster.get(train)["result_model"] == "mh-c:1"
