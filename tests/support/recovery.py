"""What the tests that break genq and wait for it to recover share (the fault harness,
tests/support/faults.py; the namespace hosts, tests/support/multihost_genq.py; the supervision
tests, tests/stack/test_supervise.py): leases, heartbeats, reaping and retries of seconds, so that
a crash is recovered in seconds, and a wait for the recovery with a deadline, so that a hang fails
the test instead of holding it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

# Each harness adds its own settings to these (worker slots, attempts, webhooks...).
FAST_RECOVERY = {
    "GENQ_LEASE_TTL_S": "3",
    "GENQ_HEARTBEAT_INTERVAL_S": "1",
    "GENQ_REAP_INTERVAL_S": "0.5",
    "GENQ_RECONCILE_INTERVAL_S": "1",
    "GENQ_REPUBLISH_AFTER_S": "2",
    "GENQ_VISIBILITY_TIMEOUT_S": "60",
    "GENQ_RETRY_BACKOFF_BASE_S": "0.5",
    "GENQ_RETRY_BACKOFF_MAX_S": "2",
    "GENQ_PROGRESS_INTERVAL_S": "0",
    # Every poll reads SQL: a test that times a kill by a job's progress sees the step it is
    # at, not one up to a second old (the poll's cache: api/polling.py, tests/api/test_polling.py).
    "GENQ_STATUS_STALENESS_S": "0",
    "GENQ_LOG_LEVEL": "INFO",
}


def wait_until(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """`check()`'s first truthy value, looked for every 0.1 s; an AssertionError naming `what`
    once `timeout_s` has passed without one."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
