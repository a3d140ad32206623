"""How long `genq up` takes to start and to stop, and the CPU its processes spend doing it.

    .venv/bin/python bench/stack_lifecycle.py [--runs 3] [--hold-s 3] [--no-job]
                                              [--checkout NAME=PATH ...] [--kind KIND]

Each run starts a `genq up` (SQLite, the embedded Redis, a local Ray head with 2 CPUs, one API
worker: what the stack tests start) in a fresh folder, and measures

- start: from the command to "Press Ctrl-C to stop.";
- first job (unless --no-job): from there to an `echo` job succeeded (the Celery worker on Ray);
- stop: from Ctrl-C (SIGINT) to the last of its processes gone.

CPU is user + system time of every process below this one: this script makes itself their
subreaper, so a process orphaned on the way (Ray's, gunicorn's) is reaped here and its CPU
counted too; live ones are read from /proc. With several --checkout options the runs alternate
between them (each `genq up` imports that folder's code: PYTHONPATH and the working folder),
so that a baseline and a change meet the same load on a shared machine. Figures are printed and
written to bench/results/<kind>-<UTC time>.json (default kind: stack-lifecycle).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import checkouts_of  # noqa: E402

TICK_S = 1 / os.sysconf("SC_CLK_TCK")
PR_SET_CHILD_SUBREAPER = 36
READY = "Press Ctrl-C to stop."


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def below(pid: int) -> dict[int, list[str]]:
    """Every process below `pid`: its stat fields after the command name."""
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stats[int(entry.name)] = (entry / "stat").read_text().rsplit(")", 1)[1].split()
    children: dict[int, list[int]] = {}
    for p, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(p)
    found: dict[int, list[str]] = {}
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found[child] = stats[child]
                todo.append(child)
    return found


class CpuMeter:
    """The CPU of every process below this one, sampled from /proc every `every_s` seconds in
    a thread of its own: each process's latest user + system time, summed over every process
    seen. (A parent's cutime would miss the children of one that ignores SIGCHLD, and the
    first run of this script, summing cutimes, found less CPU in all than at the start.) What
    a process spends in the last `every_s` of its life, and a process shorter than that, is
    missed."""

    def __init__(self, every_s: float = 0.05) -> None:
        self.every_s = every_s
        self.seen: dict[tuple[int, str], tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def sample(self) -> None:
        for pid, fields in below(os.getpid()).items():
            key = (pid, fields[19])  # the start time tells a reused pid apart
            cpu = (int(fields[11]) + int(fields[12])) * TICK_S
            with self._lock:
                name = self.seen[key][0] if key in self.seen else process_name(pid)
                self.seen[key] = (name, cpu)

    def total_s(self) -> float:
        self.sample()
        with self._lock:
            return sum(cpu for _, cpu in self.seen.values())

    def by_name(self) -> dict[str, float]:
        out: dict[str, float] = {}
        with self._lock:
            for name, cpu in self.seen.values():
                out[name] = round(out.get(name, 0.0) + cpu, 2)
        return dict(sorted(out.items(), key=lambda item: -item[1]))


def process_name(pid: int) -> str:
    """What a process of the stack is, from its command line."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    line = " ".join(argv)
    for marker, name in (
        ("stack.cli up", "genq up"),
        ("stack.cli worker", "celery worker"),
        ("stack.cli scheduler", "scheduler"),
        ("stack.cli api", "api"),
        ("gunicorn", "api"),
        ("ray start", "ray start"),
        ("redis-server", "redis"),
    ):
        if marker in line:
            return name
    if argv[0].startswith("ray::"):
        return argv[0].split()[0]
    words = [w for w in argv if w]
    for i, word in enumerate(words):
        if word == "-m" and i + 1 < len(words):
            return f"ray: {words[i + 1]}"
        if word.endswith(".py") or (i == 0 and not Path(word).name.startswith("python")):
            return f"ray: {Path(word).name}" if "/ray/" in line else Path(word).name
    return Path(words[0]).name if words else "?"


def alive_below() -> list[int]:
    return [p for p, fields in below(os.getpid()).items() if fields[0] != "Z"]


def reap_all() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.02)


def request(url: str, key: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    req.add_header("Authorization", f"Bearer {key}")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=30) as response:
        return dict(json.loads(response.read()))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_run(checkout: Path, hold_s: float, job: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="stack-lifecycle-") as tmp:
        port = free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("GENQ_")},
            "PYTHONPATH": str(checkout),
            "GENQ_VAR_DIR": f"{tmp}/var",
            "GENQ_PORT": str(port),
            "GENQ_API_WORKERS": "1",
            "GENQ_WORKER_CONCURRENCY": "4",
            "GENQ_RAY_NUM_CPUS": "2",
        }
        log_path = Path(tmp) / "genq-up.log"
        meter = CpuMeter()
        meter.start()
        began = time.monotonic()
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "stack.cli", "up"],
                env=env,
                cwd=checkout,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            while READY not in (text := log_path.read_text(errors="replace")):
                if process.poll() is not None or time.monotonic() - began > 300:
                    raise RuntimeError(f"genq up did not start:\n{text[-3000:]}")
                time.sleep(0.02)
            ready = time.monotonic()
            cpu_ready = meter.total_s()
            start_by_name = meter.by_name()
            result: dict[str, Any] = {"start_s": ready - began, "start_cpu_s": cpu_ready}
            if job:
                key = re.search(r"Admin key:\s+(\S+)", text)
                assert key, text[-2000:]
                base = f"http://127.0.0.1:{port}/v1"
                body = {"kind": "generate", "model": "echo", "params": {"delay_s": 0}}
                job_id = request(f"{base}/jobs", key.group(1), body)["id"]
                while (state := request(f"{base}/jobs/{job_id}", key.group(1))["state"]) not in (
                    "succeeded",
                    "failed",
                    "canceled",
                ):
                    time.sleep(0.02)
                assert state == "succeeded", state
                result["first_job_s"] = time.monotonic() - ready
            time.sleep(hold_s)
            stopping = time.monotonic()
            cpu_stopping = meter.total_s()
            by_name_stopping = meter.by_name()
            process.send_signal(signal.SIGINT)
            code = process.wait(180)
            result["stop_up_exit_s"] = time.monotonic() - stopping
            while alive_below():
                if time.monotonic() - stopping > 180:
                    raise RuntimeError(f"processes left after Ctrl-C: {alive_below()}")
                time.sleep(0.02)
            result["stop_s"] = time.monotonic() - stopping
            # What `genq up` says of each child's stop (from the code that logs it).
            result["stop_log"] = [
                line.split("stack.supervisor: ", 1)[1]
                for line in log_path.read_text(errors="replace").splitlines()
                if "stack.supervisor: " in line and ("stop" in line or "killing" in line)
            ]
            total = meter.total_s()
            reap_all()
            result["stop_cpu_s"] = total - cpu_stopping
            result["total_cpu_s"] = total
            result["start_cpu_by_process"] = start_by_name
            result["stop_cpu_by_process"] = {
                name: round(cpu - by_name_stopping.get(name, 0.0), 2)
                for name, cpu in meter.by_name().items()
                if cpu - by_name_stopping.get(name, 0.0) >= 0.01
            }
            result["exit_code"] = code
            return result
        finally:
            meter.stop()
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            for pid in alive_below():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            reap_all()


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": len(runs)}
    for figure in runs[0]:
        if figure in ("exit_code", "stop_log") or figure.endswith("_by_process"):
            continue
        values = [r[figure] for r in runs]
        out[figure] = {
            "median": round(statistics.median(values), 3),
            "min": round(min(values), 3),
            "max": round(max(values), 3),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per checkout")
    parser.add_argument("--hold-s", type=float, default=3.0, help="up this long before Ctrl-C")
    parser.add_argument("--no-job", action="store_true", help="no echo job after the start")
    parser.add_argument(
        "--checkout",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help=f"a folder whose code to run (repeatable; default: current={ROOT})",
    )
    parser.add_argument("--kind", default="stack-lifecycle", help="the result file's prefix")
    args = parser.parse_args(argv)
    checkouts = checkouts_of(args.checkout, ROOT)
    become_subreaper()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in checkouts}
    for i in range(args.runs):
        for name, checkout in checkouts.items():
            result = one_run(checkout, args.hold_s, not args.no_job)
            runs[name].append(result)
            shown = "  ".join(f"{k} {v:.2f}" for k, v in result.items() if isinstance(v, float))
            print(f"{name} run {i + 1}: {shown}  (exit {result['exit_code']})", flush=True)
            print(f"  start CPU by process: {result['start_cpu_by_process']}", flush=True)
            print(f"  stop CPU by process: {result['stop_cpu_by_process']}", flush=True)
            print(f"  stop: {'; '.join(result['stop_log'])}", flush=True)
    data: dict[str, Any] = {
        "bench": "stack_lifecycle",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "hold_s": args.hold_s,
        **{name: summary(results) for name, results in runs.items()},
        # The last run of each checkout, per process (not in the summary tables).
        "by_process": {
            name: {
                "start": results[-1]["start_cpu_by_process"],
                "stop": results[-1]["stop_cpu_by_process"],
                "stop_log": results[-1]["stop_log"],
            }
            for name, results in runs.items()
        },
    }
    print(json.dumps(data, indent=2))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = ROOT / "bench" / "results" / f"{args.kind}-{stamp}.json"
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
