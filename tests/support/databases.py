"""The test databases the root conftest.py hands out: PostgreSQL databases made and dropped for
this test process (`PgDatabases`: a template migrated once, copied per test, dropped on a thread
of its own), and the Redis database numbers lent to one test at a time, none shared between
xdist workers (`RedisDatabases`).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import uuid
from collections.abc import Iterator

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
    whatever else uses the server; of the others, xdist worker i of n owns the numbers n*k + i
    + 1, so no two workers share one, and inside a worker a number is lent to one test at a
    time. A test that needs more numbers than its worker owns fails saying so (start Redis with
    more `--databases`, or run fewer workers)."""

    def __init__(self, server_url: str) -> None:
        import redis

        client = redis.Redis.from_url(server_url)
        try:
            total = int(client.config_get("databases")["databases"])
        except redis.ResponseError:  # CONFIG may be renamed away; 16 is Redis's default
            total = 16
        finally:
            client.close()
        worker, workers = xdist_worker()
        self.server_url = server_url
        self.free = [n for n in range(1, total) if (n - 1) % workers == worker]
        self.owned = len(self.free)

    def acquire(self) -> int:
        if not self.free:
            pytest.fail(
                f"this test process owns {self.owned} Redis databases and all are in use: "
                "start Redis with more --databases or run fewer xdist workers"
            )
        return self.free.pop(0)

    def release(self, number: int) -> None:
        self.free.insert(0, number)

    def url(self, number: int) -> str:
        return f"{self.server_url}/{number}"

    @contextlib.contextmanager
    def lease(self) -> Iterator[str]:
        """A database number for the block (its URL), empty at the start, flushed at the end."""
        import redis

        number = self.acquire()
        url = self.url(number)
        client = redis.Redis.from_url(url)
        client.flushdb()
        try:
            yield url
        finally:
            client.flushdb()
            client.close()
            self.release(number)
