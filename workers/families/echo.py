"""The `echo` family's implementation: waits `delay_s` (emitting `progress_steps` progress
events along the way), then returns its message as a text output. No torch: it measures the
queue, not a model."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.errors import ModelError
from core.events import Event, Output, Progress
from workers.families.base import CanceledError, RunContext
from workers.families.echo_spec import EchoParams

# Longest sleep between two looks at the cancel flag.
CANCEL_POLL_S = 0.05


def _sleep(seconds: float, ctx: RunContext) -> None:
    """Sleep in short slices so a cancel is noticed within CANCEL_POLL_S."""
    end = time.monotonic() + seconds
    while True:
        if ctx.is_canceled():
            raise CanceledError(f"job {ctx.job_id} was canceled")
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, CANCEL_POLL_S))


class Echo:
    def generate(self, params: dict[str, Any], ctx: RunContext) -> Iterator[Event]:
        p = EchoParams.model_validate(params)
        if p.progress_steps:
            for step in range(1, p.progress_steps + 1):
                _sleep(p.delay_s / p.progress_steps, ctx)
                yield Progress(step, p.progress_steps)
        else:
            _sleep(p.delay_s, ctx)
        if p.fail:
            raise ModelError("echo was asked to fail")
        yield Output(
            name="output.txt",
            kind="text",
            content_type="text/plain; charset=utf-8",
            data=p.message.encode("utf-8"),
            meta={"chars": len(p.message)},
        )


def load(model_dir: Path | None, config: dict[str, Any], device: str) -> Echo:
    return Echo()
