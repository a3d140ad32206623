"""The Redis database allocator of the test harness (tests/support/databases.py) across test
sessions: a second session on the same Redis server, started as a separate process, is never
lent a number the first one holds, so it cannot empty a database in use; when every number is
held, a lease waits for one to be freed, and fails with the holders named if none is. The
tests run on a Redis server of their own (four databases), so they take no number from the
suite's other tests."""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support.databases import RedisDatabases
from tests.support.recovery import wait_until
from tests.support.stackproc import free_port

ROOT = Path(__file__).resolve().parent.parent

# Another session's test process: it leases `count` numbers, writes a key in each, prints
# them, and holds them until its stdin has a line (then releases the last one and prints it)
# or closes.
HOLDER = """
import sys
import redis
from tests.support.databases import RedisDatabases
allocator = RedisDatabases(sys.argv[1])
leases = [allocator.lease() for _ in range(int(sys.argv[2]))]
urls = [lease.__enter__() for lease in leases]
for url in urls:
    redis.Redis.from_url(url).set("owner", "other-session")
print(" ".join(url.rsplit("/", 1)[1] for url in urls), flush=True)
if sys.stdin.readline():
    leases.pop().__exit__(None, None, None)
    print("released", urls.pop().rsplit("/", 1)[1], flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def redis_server_url(tmp_path: Path) -> Iterator[str]:
    """A redis-server of this test's own with databases 0-3 (so 1-3 to lend)."""
    if shutil.which("redis-server") is None:  # the suite's Redis may be on another machine
        if os.environ.get("CI"):
            pytest.fail("redis-server is required under CI")
        pytest.skip("redis-server is not installed here")
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no", "--databases", "4", "--dir", str(tmp_path)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}"
    client = redis.Redis.from_url(url)

    def listening() -> bool:
        assert proc.poll() is None, "redis-server exited as it started"
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    try:
        wait_until(listening, 30, "redis-server to answer")
        yield url
    finally:
        client.close()
        proc.terminate()
        proc.wait(30)
        for number in range(1, 4):  # the lock files of a server no other test can reach
            RedisDatabases.lock_file(url, number).unlink(missing_ok=True)


@pytest.fixture
def other_session(redis_server_url: str) -> Iterator[subprocess.Popen[str]]:
    """Starts a holder as another session's process would run: the same xdist worker name as
    this one, so the old split by worker index would have lent both the same numbers."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs: list[subprocess.Popen[str]] = []

    def start(count: int) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, redis_server_url, str(count)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        return proc

    yield start  # type: ignore[misc]
    for proc in procs:
        if proc.poll() is None:
            proc.stdin.close()  # type: ignore[union-attr]
            proc.wait(30)


def held_numbers(proc: subprocess.Popen[str]) -> set[int]:
    line = proc.stdout.readline()  # type: ignore[union-attr]
    assert line, "the holder process ended before it leased its databases"
    return {int(n) for n in line.split()}


def test_a_second_session_is_never_lent_a_number_in_use(redis_server_url, other_session) -> None:  # type: ignore[no-untyped-def]
    holder = other_session(2)
    theirs = held_numbers(holder)
    allocator = RedisDatabases(redis_server_url)
    assert len(theirs) == 2 and not theirs & {0}
    with allocator.lease() as url:
        mine = int(url.rsplit("/", 1)[1])
        assert mine not in theirs and mine != 0
        # Our lease emptied its own database only: the other session's keys are all there.
        for number in theirs:
            assert (
                redis.Redis.from_url(f"{redis_server_url}/{number}").get("owner")
                == b"other-session"
            )


def test_a_lease_waits_for_a_number_to_be_freed(redis_server_url, other_session) -> None:  # type: ignore[no-untyped-def]
    allocator = RedisDatabases(redis_server_url, wait_s=0.5)
    holder = other_session(len(allocator.order))
    theirs = held_numbers(holder)
    assert theirs == set(allocator.order)
    with pytest.raises(pytest.fail.Exception, match=rf"pid {holder.pid}"), allocator.lease():
        pass
    # A patient lease started now waits, and gets the number the holder frees.
    patient = RedisDatabases(redis_server_url, wait_s=60)
    got: queue.Queue[int] = queue.Queue()

    def lease_one() -> None:
        with patient.lease() as url:
            got.put(int(url.rsplit("/", 1)[1]))

    waiter = threading.Thread(target=lease_one)
    waiter.start()
    holder.stdin.write("release one\n")  # type: ignore[union-attr]
    holder.stdin.flush()  # type: ignore[union-attr]
    released = holder.stdout.readline().split()  # type: ignore[union-attr]
    assert released[0] == "released" and int(released[1]) in theirs
    assert got.get(timeout=60) == int(released[1])
    waiter.join(30)
