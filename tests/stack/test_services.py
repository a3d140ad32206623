"""The local Ray head's command line (stack/services.py), read by Ray's own `ray start` parser."""

from __future__ import annotations

import sys
from pathlib import Path

from ray.scripts.scripts import start as ray_start

from core.settings import Settings
from stack.services import free_ports, ray_head_argv

# The components `ray start` gives a fixed port when none is named: a head whose own port is
# one of those does not start.
FIXED = ("dashboard_port", "dashboard_agent_listen_port", "ray_client_server_port")


def fixed_ports(argv: list[str]) -> dict[str, int]:
    """The head's port and the fixed ports of `ray start`'s options as Ray parses `argv`
    (its defaults included)."""
    params = ray_start.make_context("start", argv[2:]).params
    ports = {name: params[name] for name in ("port", *FIXED) if params[name]}
    return {name: int(port) for name, port in ports.items()}


def test_the_heads_ports_differ_even_when_it_is_given_the_dashboard_agents_default(
    tmp_path: Path,
) -> None:
    settings = Settings(_env_file=None, var_dir=tmp_path)  # type: ignore[call-arg]
    # 52365 is the dashboard agent's default and lies in the kernel's range of free ports:
    # a head given it (as one once was in the test suite) would clash with its own agent.
    assert (
        fixed_ports(["ray", "start", "--head", "--port=52365"])["dashboard_agent_listen_port"]
        == 52365
    )
    for port in (52365, *free_ports(3)):
        ports = fixed_ports(ray_head_argv(settings, Path(sys.executable).parent, port))
        assert ports["port"] == port
        assert len(set(ports.values())) == len(ports), ports


def test_free_ports_are_different_and_leave_out_those_taken() -> None:
    first = free_ports(1)[0]
    ports = free_ports(20, taken={first})
    assert len(set(ports)) == 20
    assert first not in ports
