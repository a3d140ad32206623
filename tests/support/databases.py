"""The test databases the root conftest.py hands out: PostgreSQL databases made and dropped for
this test process (`PgDatabases`: a template migrated once, copied per test, dropped on a thread
of its own), and the Redis database numbers lent to one test at a time, none shared between
test processes, of this session or another (`RedisDatabases`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url


def xdist_worker() -> tuple[int, int]:
    """(this process's index, how many processes run tests): (0, 1) without xdist."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(name.removeprefix("gw")), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def pg_engine(url: str):  # type: ignore[no-untyped-def]
    return create_engine(
        url.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT"
    )


def _pg_database_url(server_url: str, name: str) -> str:
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


class PgDatabases:
    """Creates and drops this test process's PostgreSQL databases. Drops run on a thread of
    their own (a DROP ... WITH (FORCE) can take a second on a busy server and holds up no
    test); the session's end waits for the last one."""

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        self.admin = pg_engine(server_url)
        worker, _ = xdist_worker()
        # Unique per process and run: two sessions (or workers) on one server never collide.
        self.prefix = f"genq_t{worker}_{uuid.uuid4().hex[:8]}"
        self.count = 0
        self.template: str | None = None
        self._drops: queue.Queue[str | None] = queue.Queue()
        self._dropper = threading.Thread(target=self._drop_loop, name="pg-drops", daemon=True)
        self._dropper.start()

    def create(self, template: str | None = None) -> str:
        self.count += 1
        name = f"{self.prefix}_{self.count}"
        clause = f' TEMPLATE "{template}"' if template else ""
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"{clause}'))
        return name

    def migrated(self) -> str:
        """A new database at the migrations' head, copied from this process's template (made
        and migrated on first use)."""
        if self.template is None:
            import migrations
            from core.settings import Settings

            name = self.create()
            url = _pg_database_url(self.server_url, name)
            migrations.upgrade(Settings(_env_file=None, database_url=url))  # type: ignore[call-arg]
            self.template = name
        return self.create(self.template)

    def url(self, name: str) -> str:
        return _pg_database_url(self.server_url, name)

    def drop(self, name: str) -> None:
        self._drops.put(name)

    def _drop_loop(self) -> None:
        while (name := self._drops.get()) is not None:
            with self.admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def close(self) -> None:
        if self.template is not None:
            self._drops.put(self.template)
        self._drops.put(None)
        self._dropper.join(300)
        self.admin.dispose()


class RedisDatabases:
    """Redis database numbers for tests that run at the same time. Database 0 is left to
    whatever else uses the server; each of the others is lent to one test at a time, across
    every test process on this machine: a lease holds an exclusive `flock` on a file named
    after the server and the number (in the temporary folder), so neither the xdist workers of
    one session nor two sessions at once (two checkouts, or a single module run beside
    `make test`) are ever lent the same number, and none empties a database another is using.
    The lock goes with the process that holds it, so a killed test process frees its numbers.
    Worker i of n tries the numbers n*k + i + 1 first, so the workers of one session seldom
    reach for the same one. When every number is taken, a lease waits for one to be freed;
    after `wait_s` it fails naming the processes that hold them."""

    def __init__(self, server_url: str, wait_s: float = 900.0) -> None:
        import redis

        client = redis.Redis.from_url(server_url)
        try:
            total = int(client.config_get("databases")["databases"])
        except redis.ResponseError:  # CONFIG may be renamed away; 16 is Redis's default
            total = 16
        finally:
            client.close()
        worker, workers = xdist_worker()
        numbers = range(1, total)
        mine = [n for n in numbers if (n - 1) % workers == worker]
        self.order = mine + [n for n in numbers if n not in mine]
        self.server_url = server_url
        self.wait_s = wait_s

    @staticmethod
    def lock_file(server_url: str, number: int) -> Path:
        """The file whose lock lends `number` of this server, for every process here."""
        url = make_url(server_url)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{url.host or 'localhost'}-{url.port or 6379}")
        return Path(tempfile.gettempdir()) / f"genq-test-redis-{slug}-db{number}.lock"

    def _try(self, number: int) -> int | None:
        """An open descriptor holding the number's lock, or None when another holds it."""
        path = self.lock_file(self.server_url, number)
        try:
            fd, writable = os.open(path, os.O_RDWR | os.O_CREAT, 0o666), True
        except PermissionError:  # another user's file: a lock needs no write access
            fd, writable = os.open(path, os.O_RDONLY), False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if writable:  # who holds it, for the message of a lease that waited too long
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    def _holders(self) -> list[str]:
        holders = []
        for number in self.order:
            with contextlib.suppress(OSError):
                pid = self.lock_file(self.server_url, number).read_text().strip()
                holders.append(f"{number}: pid {pid or '?'}")
        return holders

    def acquire(self) -> tuple[int, int]:
        """(a database number, the descriptor whose lock holds it)."""
        deadline = time.monotonic() + self.wait_s
        while True:
            for number in self.order:
                fd = self._try(number)
                if fd is not None:
                    return number, fd
            if time.monotonic() > deadline:
                pytest.fail(
                    f"all {len(self.order)} Redis databases of {self.server_url} stayed in use "
                    f"for {self.wait_s:.0f} s ({', '.join(self._holders())}): start Redis with "
                    "more --databases, run fewer xdist workers, or give the other session a "
                    "Redis of its own"
                )
            time.sleep(0.2)  # a lock to be freed: flock cannot wait on any one of several

    def release(self, fd: int) -> None:
        os.close(fd)

    def url(self, number: int) -> str:
        return f"{self.server_url}/{number}"

    @contextlib.contextmanager
    def lease(self) -> Iterator[str]:
        """A database number for the block (its URL), empty at the start, flushed at the end."""
        import redis

        number, fd = self.acquire()
        try:
            url = self.url(number)
            client = redis.Redis.from_url(url)
            client.flushdb()
            try:
                yield url
            finally:
                client.flushdb()
                client.close()
        finally:
            self.release(fd)
