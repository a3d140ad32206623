"""genq on six hosts that share no disk: the multi-host test of the README's cluster layout.

Hosts are Linux namespaces (tests/support/multihost.py; genq on them:
tests/support/multihost_genq.py), each with its own address on a private bridge, its own /tmp and
/dev/shm and its own process list:

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
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from scheduler.snapshot import read_snapshots
from tests.support.multihost import (
    Host,
    Lab,
    NamespacesUnavailableError,
    check_namespaces,
    command_name,
)
from tests.support.multihost_genq import BIN, TERMINAL, Cluster
from tests.support.recovery import wait_until

# Six hosts start in the first test; on a busy two-core machine that alone can take minutes.
pytestmark = [pytest.mark.multihost, pytest.mark.stack, pytest.mark.timeout(1500)]

# Tiny, but long enough on two cores to be caught mid-way; a checkpoint every 5 steps.
TRAIN = {"kind": "train", "dataset": "digits", "resources": {"num_gpus": 1}}
TRAIN_PARAMS = {"preset": "tiny", "batch_size": 8, "checkpoint_every": 5, "seed": 1}


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
    assert "stack.cli worker" in killed and "raylet" in killed, killed
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
