"""SQLite's writer queue and read transactions (core/db.py)."""

from __future__ import annotations

import fcntl
import os
import threading

from sqlalchemy import text

from core.db import Database
from core.settings import Settings


def make_db(tmp_path) -> Database:
    db = Database(Settings(var_dir=tmp_path))
    with db.transaction() as s:
        s.execute(text("CREATE TABLE t (x INTEGER)"))
    return db


def test_a_read_does_not_wait_for_an_open_write_transaction(tmp_path):
    db = make_db(tmp_path)
    inside, release = threading.Event(), threading.Event()

    def writer() -> None:
        with db.transaction() as s:
            s.execute(text("INSERT INTO t VALUES (1)"))
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=writer)
    thread.start()
    assert inside.wait(10)
    with db.read() as s:  # would block until `release` if reads queued behind writers
        seen = s.execute(text("SELECT count(*) FROM t")).scalar()
    still_writing = thread.is_alive()
    release.set()
    thread.join(10)
    assert seen == 0  # the writer had not committed: a snapshot, not a dirty read
    assert still_writing
    with db.read() as s:
        assert s.execute(text("SELECT count(*) FROM t")).scalar() == 1
    db.dispose()


def test_writers_queue_on_the_file_lock_shared_with_other_processes(tmp_path):
    db = make_db(tmp_path)
    lock_path = tmp_path / "genq.db.lock"
    assert lock_path.exists()
    # Another process's holder: a separate open file description of the same lock file.
    fd = os.open(lock_path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    entered, done = threading.Event(), threading.Event()

    def writer() -> None:
        with db.transaction() as s:
            entered.set()
            s.execute(text("INSERT INTO t VALUES (2)"))
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    waited = not entered.wait(0.5)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    assert done.wait(10)
    thread.join(10)
    assert waited, "the write transaction began while another holder had the lock"
    with db.read() as s:
        assert s.execute(text("SELECT x FROM t")).scalars().all() == [2]
    db.dispose()


def test_many_threads_writing_lose_no_update(tmp_path):
    db = make_db(tmp_path)
    with db.transaction() as s:
        s.execute(text("INSERT INTO t VALUES (0)"))

    def bump() -> None:
        for _ in range(25):
            with db.transaction() as s:  # read-modify-write: lost updates show up as a shortfall
                x = s.execute(text("SELECT x FROM t")).scalar_one()
                s.execute(text("UPDATE t SET x = :x"), {"x": x + 1})

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    with db.read() as s:
        assert s.execute(text("SELECT x FROM t")).scalar_one() == 200
    db.dispose()
