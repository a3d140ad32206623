"""The child processes of `genq up`: what the supervisor knows of each (`Child`: its command,
how it is stopped, its restarts), the environment each gets (only the secrets it needs; Ray's
processes none), how one is started in its own process group with the stop signals unblocked,
how it is signalled, and the backoff before a child that keeps exiting is started again. The
supervisor (stack/supervisor.py) decides when; this module does it to one child.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

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
# A child that ran this long before it exited starts a new backoff streak.
STABLE_S = 60.0


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


class ChildExitedError(RuntimeError):
    pass


def restart_delay_s(streak: int, base_s: float, cap_s: float) -> float:
    """The wait before the `streak`-th restart in a row: base, 2*base, 4*base..., capped."""
    return float(min(cap_s, base_s * 2 ** max(0, streak - 1)))


def role_of(name: str) -> str:
    """What a child is, by its name: a second Celery worker `worker-2` is a `worker`."""
    return name.split("-", 1)[0]


def child_env(env: dict[str, str], name: str) -> dict[str, str]:
    """The environment of the child `name`, out of the stack's `env`: only the secrets its
    role needs."""
    role = role_of(name)
    if role == "ray":
        return {k: v for k, v in env.items() if not k.startswith("GENQ_") or k in RAY_NODE_SETTINGS}
    return {k: v for k, v in env.items() if k not in SECRET_USERS or role in SECRET_USERS[k]}


def start_process(
    name: str, argv: list[str], env: dict[str, str], log_dir: Path, log_file: bool
) -> subprocess.Popen[bytes]:
    """Start the child `name` in its own process group, its output into `log_dir`/`name`.log
    (`log_file`) or the supervisor's own."""
    out = None
    if log_file:
        log_dir.mkdir(parents=True, exist_ok=True)
        out = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives with the child
    try:
        return subprocess.Popen(
            argv,
            env=child_env(env, name),
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


def _unblock_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def send_stop(child: Child) -> None:
    """The child's stop signal, to its process group or its leader alone."""
    with contextlib.suppress(ProcessLookupError):
        if child.signal_group:
            os.killpg(child.process.pid, child.stop_signal)
        else:
            os.kill(child.process.pid, child.stop_signal)


def kill_group(child: Child) -> None:
    """SIGKILL to the child's process group: what its leader left there goes with it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.process.pid, signal.SIGKILL)
