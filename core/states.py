"""The job state machine: its states and the one table of legal changes.

scheduled ──▶ queued ──▶ running ──▶ succeeded
                 ▲          │  ├───▶ failed
                 └──────────┘  └───▶ canceling ──▶ canceled
(lease lost or transient error: back to queued with attempt+1; preempted at a checkpoint:
 back to queued without using an attempt (core/preemption.py); queued ──▶ canceled directly;
 a failed or canceled job may be retried: back to queued)
"""

from __future__ import annotations

from enum import StrEnum

from core.errors import IllegalTransitionError


class JobState(StrEnum):
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    RUNNING = "running"
    CANCELING = "canceling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


class JobKind(StrEnum):
    GENERATE = "generate"
    TRAIN = "train"
    FINETUNE = "finetune"


S = JobState
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.SCHEDULED: frozenset({S.QUEUED, S.CANCELED, S.FAILED}),
    # queued -> failed: its deadline passed or its attempts ran out before it could start.
    S.QUEUED: frozenset({S.RUNNING, S.CANCELED, S.FAILED}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELING, S.QUEUED}),
    # canceling -> failed: the attempt ended in an error before it noticed the cancel.
    S.CANCELING: frozenset({S.CANCELED, S.FAILED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset({S.QUEUED}),
    S.CANCELED: frozenset({S.QUEUED}),
}

TERMINAL: frozenset[JobState] = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELED})
ACTIVE: frozenset[JobState] = frozenset({S.RUNNING, S.CANCELING})


def is_terminal(state: JobState | str) -> bool:
    return JobState(state) in TERMINAL


def can_transition(old: JobState | str, new: JobState | str) -> bool:
    return JobState(new) in TRANSITIONS[JobState(old)]


def check_transition(old: JobState | str, new: JobState | str) -> None:
    if not can_transition(old, new):
        raise IllegalTransitionError(f"a {old} job cannot become {new}")


def sources_of(new: JobState) -> frozenset[JobState]:
    """Every state from which `new` may be entered: the WHERE clause of a conditional UPDATE."""
    return frozenset(old for old, targets in TRANSITIONS.items() if new in targets)
