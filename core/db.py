"""Engines and sessions for SQLite and PostgreSQL, built from settings.

SQLite allows one writer at a time. Its own wait for the write lock (the busy handler) sleeps
and retries with growing pauses of up to 100 ms, so under a few concurrent writers most of a
request's time went to sleeping while the lock was already free. genq therefore queues writers
itself: a write transaction first takes a lock of this process (threads queue on it) and then an
OS file lock next to the database file (processes queue on it; the kernel wakes the next waiter
the moment it is released, and frees it if the holder dies), and only then sends
`BEGIN IMMEDIATE`, which by then finds the write lock free. Read-only work uses
`Database.read()`: a deferred `BEGIN`, which in WAL mode never waits for a writer.

PostgreSQL needs none of this: both kinds of transaction are ordinary ones.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings
from core.usage import HALF_LIFE_INFO, POLICY_INFO

log = logging.getLogger(__name__)
T = TypeVar("T")

# Connection execution option: this connection's transactions only read.
READ_ONLY = "genq_read_only"


def make_engine(url: str, *, echo: bool = False) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url, echo=echo, connect_args={"check_same_thread": False, "timeout": 30}
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):  # type: ignore[no-untyped-def]
            read_only = conn.get_execution_options().get(READ_ONLY, False)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return create_engine(url, echo=echo, pool_pre_ping=True, pool_size=10, max_overflow=20)


def is_transient_db_error(exc: BaseException) -> bool:
    """A database error that says nothing about the work: the connection was lost or closed
    (a restart, `pg_terminate_backend`, a network cut), the server refused a connection, or
    SQLite was busy. Another try, on a fresh connection, may well succeed."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError | InterfaceError)


def retry_transient(work: Callable[[], T], *, within_s: float, what: str, base_s: float = 0.1) -> T:
    """Run `work` (which opens its own transaction) and run it again, after a growing pause
    with jitter, while it fails with a transient database error and `within_s` has not passed;
    then the last error is raised. Only for work that is safe to repeat: a try whose commit was
    lost in flight may have been applied."""
    deadline = time.monotonic() + within_s
    pause_s = base_s
    while True:
        try:
            return work()
        except Exception as exc:
            if not is_transient_db_error(exc) or time.monotonic() + pause_s > deadline:
                raise
            log.warning("%s: transient database error, trying again: %s", what, exc)
        time.sleep(pause_s * (0.5 + random.random() / 2))
        pause_s = min(pause_s * 2, 2.0)


class WriterQueue:
    """Lets one write transaction at a time into a SQLite file, across the threads of this
    process (an RLock) and across processes (flock on `<database>.lock`). Re-entrant in one
    thread, so a nested write transaction behaves as it would without the queue."""

    def __init__(self, lock_path: Path) -> None:
        self._path = lock_path
        self._lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None
        self._pid = os.getpid()

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                fcntl.flock(self._file(), fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(self._file(), fcntl.LOCK_UN)

    def _file(self) -> int:
        # A forked child must not share its parent's open file description: flock would then
        # treat both processes as one holder.
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            self._pid = os.getpid()
        return self._fd

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None


class Database:
    """An engine and its session factory; one per process, built by the entry point."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.writers: WriterQueue | None = None
        if settings.db_url.startswith("sqlite:///"):
            path = Path(settings.db_url[len("sqlite:///") :])
            path.parent.mkdir(parents=True, exist_ok=True)
            self.writers = WriterQueue(path.with_name(path.name + ".lock"))
        self.engine = make_engine(settings.db_url)
        # The fair share's policy and half-life travel in each session's info (core/usage.py).
        info = {
            POLICY_INFO: settings.fair_share,
            HALF_LIFE_INFO: settings.fair_share_half_life_s,
        }
        self.sessions = sessionmaker(self.engine, expire_on_commit=False, info=info)
        self._read_sessions = sessionmaker(
            self.engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False, info=info
        )

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose work is committed on success and rolled back on any error."""
        if self.writers is None:
            with self.sessions() as session, session.begin():
                yield session
            return
        with self.writers.held(), self.sessions() as session, session.begin():
            yield session

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """`transaction` for Core statements only: a connection, without an ORM session (its
        unit of work and statement handling cost more than a few prebuilt INSERTs)."""
        if self.writers is None:
            with self.engine.begin() as conn:
                yield conn
            return
        with self.writers.held(), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reads only: a consistent snapshot that never waits for a writer
        (on SQLite). Writing through it is a bug; SQLite may refuse it as busy."""
        with self._read_sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
        if self.writers is not None:
            self.writers.close()
