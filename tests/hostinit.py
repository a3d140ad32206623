"""PID 1 of a namespace host (tests/multihost.py): it gives the host a disk of its own (a
tmpfs on /tmp and on /dev/shm, so no unix socket, Ray session or cache is shared with another
host), says so on stdout, then reaps the orphans of the host until it is SIGKILLed, which the
kernel turns into a SIGKILL of every process of the host."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

if __name__ == "__main__":
    for target in ("/tmp", "/dev/shm"):
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", target], check=True)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    print("host ready", os.getpid(), flush=True)
    sys.stdout.close()
    while True:
        try:
            os.wait()
        except ChildProcessError:  # nothing to reap yet
            time.sleep(0.5)
