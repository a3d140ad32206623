"""The local Ray head's command line (stack/services.py), read by Ray's own `ray start` parser."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
from ray.scripts.scripts import start as ray_start

from core.settings import Settings
from stack.services import free_ports, ports_in, ray_head_argv

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


def test_free_ports_lie_outside_the_kernels_range_for_outgoing_connections() -> None:
    # A port the kernel may hand to any process's next connection could be taken while the
    # Ray head is down between a crash and its restart; Ray's workers use 10002-19999.
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = free_ports(50)
    assert len(set(ports)) == 50
    assert all(20000 <= port < low or (low <= 21000 and port < 21000) for port in ports), ports
    for port in ports:  # each free when found: it binds now unless taken since
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def bound_band(width: int) -> tuple[range, list[socket.socket]]:
    """`width` consecutive ports of the service band, each bound here by one of the sockets."""
    for start in range(20000, 32000 - width, width):
        sockets: list[socket.socket] = []
        try:
            for port in range(start, start + width):
                sockets.append(socket.socket())
                sockets[-1].bind(("127.0.0.1", port))
            return range(start, start + width), sockets
        except OSError:
            for s in sockets:
                s.close()
    raise AssertionError("no free ports at all between 20000 and 32000")


def test_free_ports_skip_a_port_in_use_and_say_when_too_few_are_left() -> None:
    band, sockets = bound_band(3)
    busy = sockets.pop(0)  # the band's first port stays in use; the others are freed
    for s in sockets:
        s.close()
    with busy:
        for _ in range(20):  # whatever the random order, never the busy port
            assert sorted(free_ports(2, band=band)) == [band[1], band[2]]
        with pytest.raises(OSError, match="only 2 of 3 ports free"):
            free_ports(3, band=band)
        assert free_ports(1, band=band, taken={band[1]}) == [band[2]]


def test_a_restarted_heads_ports_avoid_the_ones_it_had(tmp_path: Path) -> None:
    # What the supervisor does at a restart: the same head port, and for the client server
    # and agent ports other than the old ones, which another process may hold by now.
    settings = Settings(_env_file=None, var_dir=tmp_path)  # type: ignore[call-arg]
    bin_dir = Path(sys.executable).parent
    first = ray_head_argv(settings, bin_dir, 25000)
    old = ports_in(first)
    named = ("port", "ray_client_server_port", "dashboard_agent_listen_port")
    assert old == {fixed_ports(first)[name] for name in named} and len(old) == 3
    for _ in range(20):
        again = ray_head_argv(settings, bin_dir, 25000, avoid=old)
        assert fixed_ports(again)["port"] == 25000
        assert ports_in(again) & old == {25000}
