"""Ray nodes that genq starts: the one `genq node` runs on a GPU machine (or the head), and
the zero-resource one `genq worker` runs beside itself on a machine without a Ray node.

Ray 2.60's drivers reach the cluster through the raylet of their own machine (a unix socket
under that node's temp folder), so every genq process that talks to Ray — the Celery worker
(jobs, model checks, the cluster snapshot) — must run on a machine with a Ray node. The API and
the periodic scheduler never talk to Ray. A node binds to GENQ_NODE_IP when set, and takes the
cluster's token from RAY_AUTH_MODE=token and RAY_AUTH_TOKEN in its environment (Ray reads them;
the actors it starts inherit that environment, AWS_* settings of the artifact store included).

A worker's own node is started in its own process group, asks the kernel to stop it if the
worker dies (PR_SET_PDEATHSIG), and is stopped with the worker, by its process group only.

A Ray driver cannot outlive its cluster: when the head goes, the worker stops (`RayWatch`),
giving its running attempts back, and whatever supervises it (`genq up`, compose's restart
policy, systemd) starts it again; a new worker waits for the head to answer (`wait_for_gcs`)
before it joins, and finds the model pool there anew (workers/routing.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from core.settings import Settings
from workers.families.base import GPU_MEMORY_RESOURCE

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# What `ray start` prints once its node has registered with the GCS.
STARTED_LINE = b"Ray runtime started"
START_ATTEMPTS = 3


def ray_executable() -> str:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def node_argv(
    settings: Settings,
    *,
    head: bool = False,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    gpu_memory_gb: float | None = None,
) -> list[str]:
    """`ray start --block` for a node of this machine: the head (on GENQ_RAY_HEAD_PORT) or a
    node joining GENQ_RAY_ADDRESS, bound to GENQ_NODE_IP, declaring what it is given."""
    argv = [ray_executable(), "start", "--block", "--disable-usage-stats"]
    if head:
        argv += ["--head", f"--port={settings.ray_head_port}"]
        argv.append(f"--include-dashboard={'true' if settings.ray_dashboard else 'false'}")
        if settings.ray_dashboard and settings.node_ip:
            argv.append(f"--dashboard-host={settings.node_ip}")
    else:
        if not settings.ray_address:
            raise ValueError("GENQ_RAY_ADDRESS (the Ray head's host:port) is not set")
        argv.append(f"--address={settings.ray_address}")
    if settings.node_ip:
        argv.append(f"--node-ip-address={settings.node_ip}")
    if num_cpus is not None:
        argv.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        argv.append(f"--num-gpus={num_gpus}")
    if gpu_memory_gb:
        argv.append(f"--resources={json.dumps({GPU_MEMORY_RESOURCE: gpu_memory_gb})}")
    return argv


def gpu_node_argv(settings: Settings, *, head: bool = False) -> list[str]:
    """What `genq node` runs: the GPUs and GPU memory of this machine (GENQ_RAY_NUM_GPUS and
    GENQ_RAY_GPU_MEMORY_GB when set, else what CUDA sees here); a head declares no CPU unless
    GENQ_RAY_NUM_CPUS says otherwise, so that models run on the worker nodes."""
    num_gpus, memory_gb = settings.ray_num_gpus, settings.ray_gpu_memory_gb
    if num_gpus is None or (memory_gb is None and num_gpus > 0):
        from workers.devices import detect_gpus

        found = detect_gpus()
        if num_gpus is None:
            num_gpus = found.count
        if memory_gb is None and num_gpus == found.count and num_gpus > 0:
            memory_gb = found.memory_gb or None
    if not num_gpus:
        memory_gb = None  # GPU memory without a GPU would attract jobs that cannot run here
    num_cpus = settings.ray_num_cpus
    if head and num_cpus is None:
        num_cpus = 0
    return node_argv(
        settings, head=head, num_cpus=num_cpus, num_gpus=num_gpus, gpu_memory_gb=memory_gb
    )


def local_gcs_addresses() -> set[str]:
    """The GCS addresses (ip:port) that the raylets running on this machine belong to."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or Path(argv[0].decode(errors="replace")).name != "raylet":
            continue
        for arg in argv[1:]:
            if arg.startswith(b"--gcs-address="):
                found.add(arg.split(b"=", 1)[1].decode())
    return found


def resolve_address(address: str) -> str:
    host, _, port = address.rpartition(":")
    try:
        return f"{socket.gethostbyname(host)}:{port}"
    except OSError:
        return address


def needs_own_node(settings: Settings) -> bool:
    """Whether `genq worker` must start a Ray node: GENQ_WORKER_RAY_NODE, and for `auto`, no
    raylet of the GENQ_RAY_ADDRESS cluster runs on this machine."""
    if settings.worker_ray_node == "local" or not settings.ray_address:
        return False
    if settings.worker_ray_node == "start":
        return True
    return not has_local_raylet(settings.ray_address)


def has_local_raylet(address: str) -> bool:
    """Whether a raylet of the cluster whose head is at `address` runs on this machine."""
    wanted = resolve_address(address)
    local = {resolve_address(a) for a in local_gcs_addresses()}
    if wanted.startswith("127."):
        # Ray registers a node started on 127.0.0.1 under the machine's own address.
        port = wanted.rpartition(":")[2]
        return any(a.rpartition(":")[2] == port for a in local)
    return wanted in local


def wait_for_local_raylet(address: str, timeout_s: float) -> None:
    """Wait until the node this driver uses (the head's own, on `genq up`) is up again."""
    deadline = time.monotonic() + timeout_s
    while not has_local_raylet(address):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no raylet of the Ray cluster at {address} runs on this machine")
        time.sleep(0.5)


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: a SIGKILLed worker leaves no node behind.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class RayNodeProcess:
    """A `ray start --block` child of this process, in its own process group."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.argv = argv
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 120.0) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - no threads run yet
            )
        log.info("started a Ray node (pid %d): %s", self.process.pid, " ".join(self.argv))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the Ray node exited with code {self.process.returncode}; "
                    f"see {self.log_path}:\n{self._tail(offset)}"
                )
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                if STARTED_LINE in f.read():
                    return
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"the Ray node did not start within {timeout_s:.0f} s")

    def _tail(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read()[-3000:].decode(errors="replace")

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to the node's process group (`ray start --block` stops its raylet), then
        SIGKILL after `grace_s`."""
        process = self.process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            log.warning("the Ray node did not stop in %.0f s; killing it", grace_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        self.process = None


def start_worker_node(settings: Settings) -> RayNodeProcess | None:
    """For `genq worker`: a node with no CPU and no GPU joining GENQ_RAY_ADDRESS, so that this
    driver has a raylet on its machine; None when one runs here already."""
    if not needs_own_node(settings):
        return None
    node = RayNodeProcess(
        node_argv(settings, num_cpus=0, num_gpus=0),
        settings.var_dir.resolve() / "logs" / "ray-node.log",
    )
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            node.start()
            return node
        except RuntimeError:
            # `ray start` gives a raylet 30 s to register; a busy head may need longer.
            if attempt == START_ATTEMPTS:
                raise
            log.warning("the Ray node did not start (attempt %d); starting it again", attempt)
    raise AssertionError("unreachable")


def is_gcs_reachable(address: str, timeout_s: float = 1.0) -> bool:
    """Whether the Ray head's GCS (host:port) accepts a TCP connection."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def wait_for_gcs(address: str, timeout_s: float) -> None:
    """Wait until the head answers (it may be restarting); ray.init would hang meanwhile."""
    deadline = time.monotonic() + timeout_s
    logged = False
    while not is_gcs_reachable(address):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Ray head at {address} did not answer within {timeout_s:.0f} s")
        if not logged:
            log.warning("waiting for the Ray head at %s", address)
            logged = True
        time.sleep(0.5)


class RayWatch(threading.Thread):
    """Looks at the Ray head every `every_s`; once it has not answered for `lost_after_s`,
    calls `on_lost` (once) and stops watching."""

    def __init__(
        self, address: str, lost_after_s: float, on_lost: Callable[[], None], every_s: float = 1.0
    ) -> None:
        super().__init__(name="ray-watch", daemon=True)
        self.address, self.lost_after_s, self.on_lost = address, lost_after_s, on_lost
        self.every_s = every_s
        self.stopped = threading.Event()

    def run(self) -> None:
        seen_at = time.monotonic()
        while not self.stopped.wait(self.every_s):
            if is_gcs_reachable(self.address):
                seen_at = time.monotonic()
            elif time.monotonic() - seen_at > self.lost_after_s:
                log.error(
                    "the Ray head at %s has not answered for %.0f s; stopping this worker",
                    self.address,
                    self.lost_after_s,
                )
                self.on_lost()
                return

    def stop(self) -> None:
        self.stopped.set()
