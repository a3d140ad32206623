"""The services `genq up` runs itself when the settings name none: the local Ray head and the
embedded Redis. This module writes their command lines and the environment the Ray head and its
drivers need (token auth, loopback only, no drain), and says when the head has started; the
supervisor (stack/supervisor.py) starts and stops them as children like any other.
"""

from __future__ import annotations

import json
import random
import secrets
import socket
from collections.abc import Callable, Collection
from pathlib import Path

from core.settings import Settings
from workers.families.base import GPU_MEMORY_RESOURCE

# Where the Ray head's ports are chosen: above Ray's own range for its workers (10002-19999)
# and below the range the kernel hands out to outgoing connections and to bind(port 0), read
# from /proc. A port chosen there cannot be taken by some process's next connection while the
# head is down between a crash and its restart, which would leave the head failing at every
# restart (seen in CI with the client server's port, 51355).
SERVICE_PORTS_FROM = 20000
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def service_port_band() -> range:
    """The ports `free_ports` chooses from: from 20000 up to the kernel's ephemeral range."""
    try:
        low = int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default range starts there
    return range(SERVICE_PORTS_FROM, max(low, SERVICE_PORTS_FROM + 1000))


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int, *, taken: Collection[int] = (), band: range | None = None) -> list[int]:
    """`count` different free ports of `band` (`service_port_band()`), none of them in
    `taken`, tried in a random order (two stacks starting at once seldom try the same one):
    the sockets that find them stay bound until all are found, so none is handed out twice."""
    band = band if band is not None else service_port_band()
    candidates = [port for port in band if port not in taken]
    random.shuffle(candidates)
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        for port in candidates:
            if len(ports) == count:
                break
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use
                s.close()
                continue
            sockets.append(s)
            ports.append(port)
    finally:
        for s in sockets:
            s.close()
    if len(ports) < count:
        raise OSError(f"only {len(ports)} of {count} ports free in {band.start}-{band.stop - 1}")
    return ports


def redis_argv(executable: str, socket_path: Path, var_dir: Path) -> list[str]:
    """The embedded Redis: a unix socket only (no TCP port), nothing saved to disk."""
    return [
        executable,
        "--port",
        "0",
        "--unixsocket",
        str(socket_path),
        "--unixsocketperm",
        "700",
        "--dir",
        str(var_dir),
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
    ]


def ray_head_env(var_dir: Path) -> dict[str, str]:
    """What the Ray head and its drivers need in their environment (the token is made once and
    kept in `var_dir`)."""
    token_file = var_dir / "ray_token"
    if not token_file.exists():
        token_file.write_text(secrets.token_hex(32))
        token_file.chmod(0o600)
    return {
        # Token auth: other local users cannot join or drive this Ray cluster.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token_file.read_text().strip(),
        # The worker is stopped before Ray, so there is nothing to drain: stop at once.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        # The local head is this machine's alone: its node address stays 127.0.0.1, and then
        # every Ray server (GCS, raylet, object manager, agents, metrics exporter) listens on
        # loopback only. Without this `ray start` swaps 127.0.0.1 for the machine's address and
        # the C++ servers listen on every interface. (Ray's switch for it is named after the
        # platforms where it is the default; it means "single-node, loopback".)
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }


def ports_in(argv: list[str]) -> set[int]:
    """The ports a command line names (`--...-port=N`, `--port=N`)."""
    return {
        int(value)
        for flag, _, value in (arg.partition("=") for arg in argv)
        if flag.startswith("--") and flag.endswith("port") and value.isdigit()
    }


def ray_head_argv(
    settings: Settings, bin_dir: Path, port: int, *, avoid: Collection[int] = ()
) -> list[str]:
    """`ray start --head` on `port`, with the resources the settings declare; its client
    server and agent get free ports other than `port` and those in `avoid`."""
    client_port, agent_port = free_ports(2, taken={port, *avoid})
    argv = [
        str(bin_dir / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        "--disable-usage-stats",
        f"--include-dashboard={'true' if settings.ray_dashboard else 'false'}",
        # Not the log monitor: it forwards the actors' output to drivers that ask for it,
        # and the worker does not (log_to_driver=False).
        "--include-log-monitor=false",
        # The Ray Client server (ray://), which genq does not use either, cannot be left
        # out (`ray start` starts it whenever grpc imports); it gets a port of its own
        # instead of 10001, which every head on this machine would share (gRPC binds it
        # with SO_REUSEPORT, so a connection could reach another stack's).
        f"--ray-client-server-port={client_port}",
        # The dashboard agent's HTTP port, whose default (52365) lies among the ports the
        # kernel hands out: `ray start` refuses to run when the head's port, chosen free, is
        # that very one ("trying to use a port number 52365 that is used by other
        # components"), as it once was in the test suite.
        f"--dashboard-agent-listen-port={agent_port}",
    ]
    if not settings.ray_dashboard:
        # Nor the autoscaler's monitor (one machine: no node to add), whose report only
        # `ray status` and Ray's dashboard show; it also outlives the 1 s that `ray start`
        # gives each of its processes on SIGTERM.
        argv.append("--no-monitor")
    if settings.ray_num_cpus is not None:
        argv.append(f"--num-cpus={settings.ray_num_cpus}")
    if settings.ray_num_gpus is not None:
        argv.append(f"--num-gpus={settings.ray_num_gpus}")
    if settings.ray_gpu_memory_gb is not None:
        memory = {GPU_MEMORY_RESOURCE: settings.ray_gpu_memory_gb}
        argv.append(f"--resources={json.dumps(memory)}")
    return argv


def ray_head_started(ray_log: Path, offset: int, has_exited: Callable[[], bool]) -> bool:
    """Whether the head `ray start` wrote to `ray_log` (from `offset`) has started; raises if
    it exited first."""
    if has_exited():
        raise RuntimeError(f"ray exited early; see {ray_log}")
    with open(ray_log, "rb") as f:
        f.seek(offset)
        return b"Ray runtime started" in f.read()
