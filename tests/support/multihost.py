"""Hosts made of Linux namespaces, for tests/stack/test_multihost.py.

A host is a network namespace with one veth on a bridge and its own address in a private
10.77.x.0/24 (x picked free on this machine), plus a PID and a mount namespace whose PID 1 is
tests/support/hostinit.py: its own tmpfs /tmp and /dev/shm, so no two hosts share a disk, a unix
socket or a process list. Its processes are started with `nsenter` into those namespaces;
SIGKILL to its PID 1 kills every process of the host, as a power cut would. The bridge's address
(.1) is the test's own, in the root namespace; nothing is routed anywhere else.

Everything made here is recorded and torn down by `Lab.close()` (processes by PID and process
group, namespaces, the bridge), even after a failure.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.recovery import wait_until

ROOT = Path(__file__).resolve().parents[2]
HOSTINIT = Path(__file__).resolve().parent / "hostinit.py"


class NamespacesUnavailableError(RuntimeError):
    """This machine cannot make the namespaces (not root, no `ip netns`, no unshare)."""


def _sh(*argv: str) -> str:
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {out.stderr.strip()}")
    return out.stdout


def pid_namespace(pid: int) -> str | None:
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/{pid}/ns/pid")
    return None


def pids_in_namespace(ns: str) -> list[int]:
    """Every live (not zombie) process whose PID namespace is `ns`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid_namespace(pid) != ns:
            continue
        with contextlib.suppress(OSError):
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(pid)
    return found


def command_line(pid: int) -> str:
    with contextlib.suppress(OSError):
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    return "?"


def command_name(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip()
    return "?"


def check_namespaces() -> None:
    """Raise NamespacesUnavailableError with the reason when hosts cannot be made here."""
    if sys.platform != "linux":
        raise NamespacesUnavailableError("Linux namespaces need Linux")
    if os.geteuid() != 0:
        raise NamespacesUnavailableError("making network namespaces needs root")
    for tool in ("ip", "unshare", "nsenter", "mount", "runuser", "redis-server"):
        if shutil.which(tool) is None:
            raise NamespacesUnavailableError(f"{tool} is not installed")
    if postgres_bin() is None:
        raise NamespacesUnavailableError("no PostgreSQL server binaries under /usr/lib/postgresql")
    name = f"gqprobe{os.getpid()}"
    try:
        _sh("ip", "netns", "add", name)
    except RuntimeError as exc:
        raise NamespacesUnavailableError(f"cannot make a network namespace: {exc}") from None
    try:
        _sh("ip", "netns", "exec", name, "unshare", "--pid", "--fork", "--mount", "true")
    except RuntimeError as exc:
        raise NamespacesUnavailableError(f"cannot make PID and mount namespaces: {exc}") from None
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    return found[-1].parent if found else None


def free_subnet() -> str:
    """A 10.77.x prefix that no interface of this machine uses."""
    used = _sh("ip", "-4", "-o", "addr")
    candidates = [x for x in range(256) if f"10.77.{x}." not in used]
    if not candidates:
        raise NamespacesUnavailableError("no free 10.77.x.0/24 subnet")
    return f"10.77.{random.choice(candidates)}"


@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Host:
    lab: Lab
    name: str
    ip: str
    netns: str
    init: subprocess.Popen[bytes] | None = None
    init_pid: int = 0
    veth: str = ""
    procs: list[Proc] = field(default_factory=list)
    boots: int = 0

    def boot(self) -> None:
        """Start the host's PID 1 (a fresh, empty disk each time)."""
        self.boots += 1
        self.init = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "--pid", "--fork", "--mount",
             "--propagation", "private", "--mount-proc", sys.executable, str(HOSTINIT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        assert self.init.stdout is not None
        line = self.init.stdout.readline().decode()
        if not line.startswith("host ready"):
            raise RuntimeError(f"host {self.name} did not boot: {line}{self.init.stdout.read()}")
        # PID 1 of the host is the only child of `unshare`; its PID here is what we signal.
        children = Path(f"/proc/{self.init.pid}/task/{self.init.pid}/children").read_text()
        self.init_pid = int(children.split()[0])

    @property
    def pid_ns(self) -> str:
        ns = pid_namespace(self.init_pid)
        assert ns is not None, f"host {self.name} is down"
        return ns

    def run(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        """Start `argv` on this host, its output in the test's folder."""
        log = self.lab.tmp / f"{self.name}-{name}-{self.boots}.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(
                ["nsenter", "-t", str(self.init_pid), "-n", "-m", "-p", "--", *argv],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )
        proc = Proc(name, process, log)
        self.procs.append(proc)
        self.lab.procs.append(proc)
        return proc

    def processes(self) -> list[int]:
        return pids_in_namespace(self.pid_ns)

    def kill(self) -> dict[int, str]:
        """Power cut: SIGKILL to the host's PID 1, which kills every process of the host.
        Returns the processes that were running (PID: command line); asserts that none of
        them is left."""
        ns = self.pid_ns
        victims = {pid: command_line(pid) for pid in pids_in_namespace(ns)}
        os.kill(self.init_pid, signal.SIGKILL)
        assert self.init is not None
        self.init.wait(30)
        wait_until(lambda: not any(p in victims for p in pids_in_namespace(ns)), 30,
                   f"every process of {self.name} to die")  # fmt: skip
        for proc in self.procs:
            proc.process.wait(30)  # the nsenter parents go with their children
        self.procs.clear()
        return victims


class Lab:
    """The bridge, the hosts and what runs on them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.tag = f"{os.getpid() % 100000:05d}"
        self.prefix = free_subnet()
        self.bridge = f"gq{self.tag}b"
        self.hosts: dict[str, Host] = {}
        self.procs: list[Proc] = []
        self._made_bridge = False
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        self._made_bridge = True
        try:
            _sh("ip", "addr", "add", f"{self.prefix}.1/24", "dev", self.bridge)
            _sh("ip", "link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise

    @property
    def gateway(self) -> str:
        return f"{self.prefix}.1"

    def add_host(self, name: str) -> Host:
        index = len(self.hosts) + 2
        netns = f"gq{self.tag}-{name}"
        outside, inside = f"gq{self.tag}h{index}", f"gq{self.tag}p{index}"
        ip = f"{self.prefix}.{index}"
        _sh("ip", "netns", "add", netns)
        host = Host(self, name, ip, netns, veth=outside)
        self.hosts[name] = host
        _sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        _sh("ip", "link", "set", outside, "master", self.bridge)
        _sh("ip", "link", "set", outside, "up")
        _sh("ip", "link", "set", inside, "netns", netns)
        ns = ["ip", "netns", "exec", netns]
        _sh(*ns, "ip", "link", "set", inside, "name", "eth0")
        _sh(*ns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        _sh(*ns, "ip", "link", "set", "eth0", "up")
        _sh(*ns, "ip", "link", "set", "lo", "up")
        host.boot()
        return host

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {p.log.name}\n{p.text()[-tail:]}" for p in self.procs)

    def close(self) -> None:
        for host in self.hosts.values():
            with contextlib.suppress(ProcessLookupError):
                if host.init_pid:
                    os.kill(host.init_pid, signal.SIGKILL)
            if host.init is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    host.init.wait(30)
        for proc in self.procs:
            if proc.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.process.pid, signal.SIGKILL)
                proc.process.wait(30)
        for host in self.hosts.values():
            subprocess.run(["ip", "link", "del", host.veth], capture_output=True)
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)
        if self._made_bridge:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


def port_open(ip: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((ip, port)) == 0
