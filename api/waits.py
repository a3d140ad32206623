"""Synchronous calls: reading `Prefer: wait` (RFC 7240, as Replicate uses it) and waiting in
the request for jobs to finish.

A waiting request holds a server thread, as an event stream does, so it takes one of the
process's stream slots (`Genq.streams`) for as long as it waits; with none free it does not
wait. The wait polls the job rows, each poll its own short read transaction, so no
transaction stays open while the caller waits.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from sqlalchemy import select

from core.db import Database
from core.errors import InvalidInputError
from core.states import is_terminal
from core.tables import Job

# `Prefer: wait` with no number waits this long (Replicate's default), or the cap if lower.
DEFAULT_WAIT_S = 60
_WAIT = re.compile(r"^wait(?:\s*=\s*(\S*))?$", re.IGNORECASE)


def prefer_wait_s(header: str | None, cap_s: int) -> int | None:
    """Seconds the caller asks to wait (`Prefer: wait` or `wait=N`), capped at `cap_s` (the
    `Preference-Applied` header tells the caller what was applied); None when it asks
    nothing. Other preferences in the header are ignored, as RFC 7240 allows."""
    if not header:
        return None
    for token in re.split(r"[,;]", header):
        match = _WAIT.match(token.strip())
        if match is None:
            continue
        raw = match.group(1)
        if raw is None:
            return min(DEFAULT_WAIT_S, cap_s)
        if not raw.isdigit() or not 1 <= int(raw) <= 24 * 3600:
            raise InvalidInputError.one(
                "Prefer", f"wait={raw} is not a number of seconds (wait=1 to wait={cap_s})"
            )
        return min(int(raw), cap_s)
    return None


@contextmanager
def wait_slot(slots: threading.BoundedSemaphore) -> Iterator[bool]:
    """One of the process's stream slots while the block runs; yields False (and holds
    nothing) when all are taken."""
    got = slots.acquire(blocking=False)
    try:
        yield got
    finally:
        if got:
            slots.release()


def wait_for_jobs(
    database: Database, job_ids: Sequence[str], *, timeout_s: float, poll_s: float
) -> bool:
    """Wait until every job in `job_ids` is terminal (True) or `timeout_s` passes (False)."""
    deadline = time.monotonic() + timeout_s
    pending = list(job_ids)
    while True:
        with database.read() as session:
            states = session.execute(select(Job.id, Job.state).where(Job.id.in_(pending))).all()
        pending = [job_id for job_id, state in states if not is_terminal(state)]
        if not pending:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(poll_s, left))
