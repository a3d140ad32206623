"""A real `genq up` in a subprocess, for end-to-end tests: its URL, an admin key, a small HTTP
client, and a check that Ctrl-C leaves no process behind (`running_stack`, the start -> stop ->
kill sequence every stack fixture shares)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def json_lines(text: str) -> list[dict[str, Any]]:
    """The lines of `text` that are JSON objects (log records), in order."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return found


def is_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class StackProcess:
    def __init__(self, var_dir: Path, env: dict[str, str]) -> None:
        self.var_dir = var_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = var_dir.parent / "genq-up.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("GENQ_")},
            "GENQ_VAR_DIR": str(var_dir),
            "GENQ_PORT": str(self.port),
            "GENQ_API_WORKERS": "1",
            "GENQ_WORKER_CONCURRENCY": "4",
            # One Celery worker, whatever the machine's cores (tests that want more say so).
            "GENQ_WORKER_PROCESSES": "1",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.admin_key = ""
        self.session = requests.Session()

    def start(self, timeout_s: float = 120) -> None:
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stack.cli", "up"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            if "Press Ctrl-C to stop." in text:
                # With GENQ_ADMIN_KEY set, that is the key and none is printed.
                self.admin_key = self.env.get("GENQ_ADMIN_KEY", "")
                for line in text.splitlines():
                    if "Admin key:" in line:
                        self.admin_key = line.split("Admin key:")[1].strip()
                assert self.admin_key, "no admin key printed on first start"
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"genq up exited:\n{text[-4000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"genq up did not start:\n{self.log_path.read_text()[-4000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON lines of the stack's log (GENQ_LOG_FORMAT=json), in order."""
        return json_lines(self.log_text())

    def worker_pids(self) -> set[int]:
        """The Celery workers `genq up` runs now (its `stack.cli worker` processes)."""
        assert self.process is not None
        found = set()
        for pid in descendants(self.process.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"stack.cli" in cmdline and b"worker" in cmdline:
                found.add(pid)
        return found

    def stop(self) -> tuple[int, set[int]]:
        """Ctrl-C; returns the exit code and the processes still alive afterwards."""
        assert self.process is not None
        # A kept-alive connection would hold the API's worker up to 2 s (gunicorn's linger
        # for a request that may be on its way); this client has none in flight.
        self.session.close()
        tree = descendants(self.process.pid)
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(120)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(is_alive(p) for p in tree):
            time.sleep(0.2)
        return code, {p for p in tree if is_alive(p)}

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            for pid in descendants(self.process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.process.kill()
            self.process.wait()

    # -- HTTP ------------------------------------------------------------------------------------

    def events(self, job_id: str) -> list[tuple[str, dict[str, Any], str]]:
        """The job's events straight from the stack's SQLite file (type, data, created_at), in
        order: fresher than a poll, which may be up to GENQ_STATUS_STALENESS_S old."""
        with contextlib.closing(sqlite3.connect(self.var_dir / "genq.db", timeout=30)) as db:
            rows = db.execute(
                "SELECT type, data, created_at FROM job_event WHERE job_id = ? ORDER BY id",
                (job_id,),
            ).fetchall()
        return [(kind, json.loads(data), at) for kind, data, at in rows]

    def call(self, method: str, path: str, key: str | None = None, **kw: Any) -> requests.Response:
        headers = kw.pop("headers", {})
        if key is None:
            key = self.admin_key
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return self.session.request(method, self.url + path, headers=headers, timeout=30, **kw)

    def submit(self, body: dict[str, Any], key: str | None = None, **kw: Any) -> dict[str, Any]:
        response = self.call("POST", "/v1/jobs", key, json=body, **kw)
        assert response.status_code == 202, response.text
        return dict(response.json())

    def wait(
        self,
        job_id: str,
        states: set[str] | None = None,
        timeout_s: float = 180,
        key: str | None = None,
    ) -> dict[str, Any]:
        states = states or {"succeeded", "failed", "canceled"}
        deadline = time.monotonic() + timeout_s
        while True:
            job = dict(self.call("GET", f"/v1/jobs/{job_id}", key).json())
            if job["state"] in states:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']}: {job}")
            time.sleep(0.2)


@contextlib.contextmanager
def running_stack(
    var_dir: Path, env: dict[str, str], *, check_leftovers: bool = True
) -> Iterator[StackProcess]:
    """A started `genq up` for the `with` block (a module fixture's, usually). When the block ends
    without an error, Ctrl-C must stop the stack with exit code 0 and, with `check_leftovers`,
    leave none of its processes alive; however it ends, whatever is left is killed, so a failed
    test or assertion leaves no stack behind for the next module."""
    proc = StackProcess(var_dir, env)
    try:
        proc.start()
        yield proc
        code, alive = proc.stop()
        assert code == 0, proc.log_text()[-3000:]
        if check_leftovers:
            assert not alive, f"processes left after Ctrl-C: {alive}"
    finally:
        proc.kill()
