"""Stopping a training attempt at its next checkpoint, for preemption (core/preemption.py).

Every training family checkpoints atomically into its checkpoint folder (write, then rename)
and resumes from there when restarted. So the trainer needs no help from the family to stop
at a checkpoint: once a stop is asked, it compares the folder's files (name, inode, size,
modification time) with what they were when asked, after each event the family yields, and
stops the family's generator as soon as a new checkpoint has landed. The attempt then raises
PreemptedError; the scheduler requeues the job, and its next attempt resumes from that
checkpoint. A family that does not checkpoint within the grace is killed by the scheduler and
resumes from its previous checkpoint.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

from core.events import Event, Log
from workers.families.base import PreemptedError

Signature = frozenset[tuple[str, int, int, int]]
# Logged by the attempt when it learns of the request (the job's history shows from when).
NOTICE = "preempted: stopping at the next checkpoint"


def folder_signature(folder: Path) -> Signature:
    """What identifies the files of a checkpoint folder now (an atomic rename changes it)."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return frozenset()
    out = set()
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # replaced while we looked
            continue
        out.add((entry.name, st.st_ino, st.st_size, st.st_mtime_ns))
    return frozenset(out)


class CheckpointStop:
    """A stop request for one attempt: `request()` (from another thread) notes the folder as it
    is; `until_checkpoint` ends the attempt after the next checkpoint written since."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self._asked = threading.Event()
        self._mark: Signature = frozenset()

    def request(self) -> None:
        if self._asked.is_set():
            return
        self._mark = folder_signature(self.folder) if self.folder is not None else frozenset()
        self._asked.set()

    def is_requested(self) -> bool:
        return self._asked.is_set()

    def has_new_checkpoint(self) -> bool:
        if not self._asked.is_set() or self.folder is None:
            return False
        return folder_signature(self.folder) - self._mark != frozenset()

    def until_checkpoint(self, events: Iterator[Event], job_id: str) -> Iterator[Event]:
        """Pass the family's events through; once a stop is asked (said in a Log event) and a
        new checkpoint has been written, close the family's generator and raise
        PreemptedError."""
        told = False
        try:
            for event in events:
                yield event
                if self.is_requested() and not told:
                    told = True
                    yield Log(NOTICE)
                if self.has_new_checkpoint():
                    raise PreemptedError(f"job {job_id} stopped at a checkpoint to make room")
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
