"""PID 1 of a namespace host (tests/support/multihost.py): it gives the host a disk of its own (a
tmpfs on /tmp and on /dev/shm, so no unix socket, Ray session or cache is shared with another
host), says so on stdout, then reaps the orphans of the host until it is SIGKILLed, which the
kernel turns into a SIGKILL of every process of the host.

A checkout (or its virtualenv) that itself lies under /tmp, as a CI clone may, is bound back at
its own path inside the new /tmp: it is the program every host runs, not a disk they share."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HIDDEN = (Path("/tmp"), Path("/dev/shm"))


def program_folders() -> list[tuple[int, Path]]:
    """The checkout and the virtualenv where the tmpfs would hide them, each opened (so it can
    be bound back once hidden), outermost first."""
    found: list[Path] = []
    for path in sorted({ROOT, Path(sys.prefix).resolve()}, key=lambda p: len(p.parts)):
        hidden = any(path.is_relative_to(h) for h in HIDDEN)
        if hidden and not any(path.is_relative_to(f) for f in found):
            found.append(path)
    return [(os.open(path, os.O_PATH | os.O_DIRECTORY), path) for path in found]


if __name__ == "__main__":
    kept = program_folders()
    for target in HIDDEN:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", target], check=True)
    for fd, path in kept:
        path.mkdir(parents=True, exist_ok=True)
        source = f"/proc/{os.getpid()}/fd/{fd}"
        subprocess.run(
            ["mount", "--no-canonicalize", "--bind", source, str(path)], check=True, pass_fds=(fd,)
        )
        os.close(fd)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    print("host ready", os.getpid(), flush=True)
    sys.stdout.close()
    while True:
        try:
            os.wait()
        except ChildProcessError:  # nothing to reap yet
            time.sleep(0.5)
