"""The Ray nodes genq starts (scheduler/raynode.py): what `genq node` declares, when
`genq worker` starts a node of its own, and that such a node lives and dies with its worker.
A real Ray node starting and joining is covered by tests/stack/test_multihost.py; here the process
handling runs on a stand-in child that prints Ray's start line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from core.settings import Settings
from scheduler.raynode import (
    RayNodeProcess,
    RayWatch,
    gpu_node_argv,
    is_gcs_reachable,
    local_gcs_addresses,
    needs_own_node,
    node_argv,
)
from stack.cli import main as genq_cli

ROOT = Path(__file__).resolve().parents[2]
STAND_IN = ["sh", "-c", "echo 'Ray runtime started.'; exec sleep 600"]


def _settings(**kw: object) -> Settings:
    return Settings(_env_file=None, **kw)  # type: ignore[call-arg,arg-type]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_dead(pid: int, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_a_gpu_node_declares_its_gpus_memory_and_address() -> None:
    settings = _settings(
        ray_address="10.0.0.2:6379", node_ip="10.0.0.7", ray_num_gpus=1, ray_gpu_memory_gb=80
    )
    argv = gpu_node_argv(settings)
    assert argv[1:3] == ["start", "--block"]
    assert "--address=10.0.0.2:6379" in argv and "--node-ip-address=10.0.0.7" in argv
    assert "--num-gpus=1" in argv
    resources = json.loads(next(a for a in argv if a.startswith("--resources="))[12:])
    assert resources == {"gpu_memory_gb": 80.0}
    assert not any(a.startswith("--num-cpus") for a in argv)  # Ray counts this machine's CPUs


def test_a_node_without_gpus_declares_no_gpu_memory() -> None:
    # On this machine CUDA sees no GPU: nothing is declared that would attract GPU jobs.
    argv = gpu_node_argv(_settings(ray_address="10.0.0.2:6379", ray_gpu_memory_gb=80))
    assert "--num-gpus=0" in argv
    assert not any(a.startswith("--resources=") for a in argv)


def test_the_head_declares_no_cpu_and_listens_on_its_port() -> None:
    argv = gpu_node_argv(_settings(ray_head_port=6380, ray_num_gpus=0), head=True)
    assert "--head" in argv and "--port=6380" in argv and "--num-cpus=0" in argv
    assert not any(a.startswith("--address") for a in argv)


def test_a_worker_node_needs_the_head_address() -> None:
    with pytest.raises(ValueError, match="GENQ_RAY_ADDRESS"):
        node_argv(_settings())
    result = CliRunner().invoke(genq_cli, ["node"], env={"GENQ_RAY_ADDRESS": ""})
    assert result.exit_code == 2 and "GENQ_RAY_ADDRESS" in result.output


def test_when_a_worker_starts_its_own_node() -> None:
    address = "10.255.255.1:6379"  # a cluster no raylet on this machine belongs to
    assert needs_own_node(_settings(ray_address=address))
    assert needs_own_node(_settings(ray_address=address, worker_ray_node="start"))
    assert not needs_own_node(_settings(ray_address=address, worker_ray_node="local"))
    assert not needs_own_node(_settings())  # `genq up` without an address: its own head


def test_a_raylet_of_the_cluster_on_this_machine_is_used() -> None:
    # A stand-in process named raylet, with the flag a real raylet carries.
    flag = "--gcs-address=10.255.255.1:6379"
    fake = subprocess.Popen(
        ["bash", "-c", f'exec -a /opt/ray/raylet {sys.executable} -c "import time; '
                       f'time.sleep(600)" {flag}'],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while "10.255.255.1:6379" not in local_gcs_addresses():
            assert time.monotonic() < deadline, "the stand-in raylet was not found"
            time.sleep(0.05)
        assert not needs_own_node(_settings(ray_address="10.255.255.1:6379"))
        assert needs_own_node(_settings(ray_address="10.255.255.1:6380"))
        # `start` starts one whatever runs here.
        assert needs_own_node(_settings(ray_address="10.255.255.1:6379", worker_ray_node="start"))
    finally:
        fake.kill()
        fake.wait()


def test_the_node_is_stopped_by_its_process_group(tmp_path: Path) -> None:
    node = RayNodeProcess(STAND_IN, tmp_path / "node.log")
    node.start(timeout_s=30)
    assert node.process is not None
    pid = node.process.pid
    assert os.getpgid(pid) == pid  # its own group: a signal to the worker's group misses it
    node.stop(grace_s=10)
    assert _wait_dead(pid)


def test_a_node_that_exits_at_start_is_reported(tmp_path: Path) -> None:
    node = RayNodeProcess(["sh", "-c", "echo no head there; exit 3"], tmp_path / "node.log")
    with pytest.raises(RuntimeError, match="(?s)code 3.*no head there"):
        node.start(timeout_s=30)


def test_a_sigkilled_worker_takes_its_node_with_it(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from scheduler.raynode import RayNodeProcess\n"
        f"node = RayNodeProcess({STAND_IN!r}, Path(sys.argv[1]))\n"
        "node.start(timeout_s=30)\n"
        "print(node.process.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    worker = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "node.log")],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        assert worker.stdout is not None
        node_pid = int(worker.stdout.readline())
        assert _alive(node_pid)
        os.killpg(worker.pid, signal.SIGKILL)  # the worker's group only: not the node's
        worker.wait(30)
        assert _wait_dead(node_pid), "the node outlived its worker"
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


@pytest.mark.parametrize(
    ("field", "value"),
    [("node_ip", "10.0.0.1; reboot"), ("node_ip", ""), ("worker_ray_node", "sometimes"),
     ("ray_head_port", 0), ("ray_num_gpus", -1), ("ray_gpu_memory_gb", 0)],
)  # fmt: skip
def test_bad_node_settings_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        _settings(**{field: value})


def test_the_ray_watch_calls_on_lost_once_the_head_stops_answering() -> None:
    head = socket.socket()
    head.bind(("127.0.0.1", 0))
    head.listen()
    address = f"127.0.0.1:{head.getsockname()[1]}"
    assert is_gcs_reachable(address)
    lost = threading.Event()
    watch = RayWatch(address, lost_after_s=0.5, on_lost=lost.set, every_s=0.1)
    watch.start()
    try:
        assert not lost.wait(1.0)  # answering: never lost
        head.close()
        assert not is_gcs_reachable(address)
        assert lost.wait(10)
        watch.join(5)
        assert not watch.is_alive()  # it stops watching once it has said so
    finally:
        watch.stop()
        head.close()
