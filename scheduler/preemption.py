"""The scheduler's side of preemption (core/preemption.py decides who and records it): the
periodic round that asks running training jobs to make room, and the stopper the runner gives
a trainer's lease keeper, which asks the trainer to stop at its next checkpoint and kills it
when the grace is over (it then resumes from its last checkpoint).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from core.db import Database
from core.preemption import Preemption, preempt_for_waiting
from core.settings import Settings

log = logging.getLogger(__name__)


def preempt_round(settings: Settings, database: Database) -> list[Preemption]:
    """One round of the periodic scheduler: mark the jobs to preempt (their runners act)."""
    if not settings.preemption:
        return []
    with database.transaction() as session:
        made = preempt_for_waiting(
            session,
            preempt_after_s=settings.preempt_after_s,
            grace_s=settings.preemption_grace_s,
            max_preemptions=settings.max_preemptions,
        )
    for p in made:
        log.info("preempting for job %s", p.by_job_id, extra={"job_id": p.job_id})
    return made


class TrainerPreempter:
    """The lease keeper's `on_preempt` for a trainer: ask it to stop at its next checkpoint,
    and kill it if it has not after `grace_s` (the attempt ends as preempted either way;
    scheduler/outcomes.py requeues it). `cancel()` once the attempt has ended."""

    def __init__(self, trainer: Any, grace_s: float, job_id: str, attempt: str = "") -> None:
        self.trainer, self.grace_s, self.job_id = trainer, grace_s, job_id
        self.attempt = attempt  # the lease token the request names
        self._timer: threading.Timer | None = None
        self._ended = threading.Event()

    def __call__(self) -> None:
        self.trainer.preempt.remote(self.attempt)
        self._timer = threading.Timer(self.grace_s, self._kill)
        self._timer.daemon = True
        self._timer.start()

    def _kill(self) -> None:
        if self._ended.is_set():
            return
        # Imported here: the periodic scheduler imports this module for preempt_round and runs
        # on the API host, which has no Ray node and must not load Ray
        # (tests/stack/test_multihost.py).
        import ray

        log.warning("no checkpoint within the grace; stopping the trainer",
                    extra={"job_id": self.job_id})  # fmt: skip
        ray.kill(self.trainer)

    def cancel(self) -> None:
        self._ended.set()
        if self._timer is not None:
            self._timer.cancel()
