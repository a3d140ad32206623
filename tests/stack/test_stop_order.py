"""The order in which `genq up` stops its children (Stack.stop), with stand-ins for them: small
processes named as the real ones that write down each stop signal they get.

The API, the scheduler and the two workers are signalled together (each waits to see the others
signalled before it exits: stopped one after another, the first would wait alone); the Ray
head only once its drivers, both workers, have exited, and by its leader alone (`ray start`
stops its own processes); Redis last; and what a leader leaves in its process group is killed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from core.settings import Settings
from stack.supervisor import Stack
from tests.support.stackproc import is_alive

# argv: name, log, the names to wait for on SIGTERM (comma-separated), "1" to start a
# grandchild in the same process group that ignores SIGTERM.
STAND_IN = r"""
import os, signal, subprocess, sys, time

name, log, peers, grandchild = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]

def note(line):
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, (line + "\n").encode())
    os.close(fd)

def on_term(*_):
    note(f"term {name}")
    deadline = time.monotonic() + 10
    wanted = {f"term {p}" for p in peers.split(",") if p}
    while not wanted <= set(open(log).read().splitlines()):
        if time.monotonic() > deadline:
            note(f"alone {name}")
            break
        time.sleep(0.05)
    note(f"exit {name}")
    os._exit(0)

signal.signal(signal.SIGTERM, on_term)
if grandchild == "1":
    code = (
        "import os, signal, sys, time\n"
        "def on_term(*_):\n"
        "    fd = os.open(sys.argv[2], os.O_WRONLY | os.O_APPEND)\n"
        "    os.write(fd, f'term {sys.argv[1]}-child\\n'.encode())\n"
        "signal.signal(signal.SIGTERM, on_term)\n"
        "fd = os.open(sys.argv[2], os.O_WRONLY | os.O_APPEND)\n"
        "os.write(fd, f'child {sys.argv[1]} {os.getpid()}\\n'.encode())\n"
        "while True:\n"
        "    time.sleep(1)\n"
    )
    subprocess.Popen([sys.executable, "-c", code, name, log])
note(f"ready {name}")
while True:
    time.sleep(1)
"""


def test_children_stop_together_and_each_after_those_that_use_it(tmp_path: Path) -> None:
    log = tmp_path / "signals.log"
    log.touch()
    stack = Stack(Settings(_env_file=None, var_dir=tmp_path / "var"))  # type: ignore[call-arg]
    # Two workers, as GENQ_WORKER_PROCESSES=2 starts them: Ray waits for both.
    front = ("worker", "worker-2", "scheduler", "api")

    def spawn(name: str, peers: tuple[str, ...] = (), **kw: object) -> None:
        grandchild = "1" if name == "ray" else "0"
        argv = [sys.executable, "-c", STAND_IN, name, str(log), ",".join(peers), grandchild]
        stack.spawn(name, argv, **kw)

    # In the order `genq up` starts them.
    spawn("ray", signal_group=False)
    spawn("redis")
    for name in front:
        spawn(name, front)
    try:
        deadline = time.monotonic() + 60
        while True:
            lines = log.read_text().splitlines()
            if sum(line.startswith(("ready ", "child ")) for line in lines) == len(front) + 3:
                break
            assert time.monotonic() < deadline, lines
            time.sleep(0.05)
        (grandchild,) = (int(line.split()[2]) for line in lines if line.startswith("child "))
        stack.stop()
    finally:
        stack.stop()  # nothing left to stop unless the first one failed

    lines = log.read_text().splitlines()
    assert not [line for line in lines if line.startswith("alone ")], lines
    assert lines.index("term ray") > max(lines.index(f"exit {n}") for n in front[:2]), lines
    assert lines.index("term redis") > max(lines.index(f"exit {n}") for n in front), lines
    # `ray start` alone got SIGTERM; what it left in its group was killed with it.
    assert "term ray-child" not in lines, lines
    deadline = time.monotonic() + 10
    while is_alive(grandchild):
        assert time.monotonic() < deadline, f"pid {grandchild} of ray's group is alive"
        time.sleep(0.05)
    assert stack.children == []
