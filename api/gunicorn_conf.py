"""gunicorn's hooks for `genq api`: a worker that exits is marked dead in prometheus_client's
multi-process folder, so its live-only figures leave the next scrape while its counters stay
summed in (api/instruments.py)."""

from __future__ import annotations

from typing import Any


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
