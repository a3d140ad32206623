"""The dashboard tests' settings (tests/api/dashboard/): tests/api's fixtures (database, broker,
publisher, app, client, keys) on settings with a session secret, and cluster snapshots that
outlast a test on a loaded machine."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {
        "secret_key": "test-secret-key-for-dashboard-sessions",
        "max_attempts": 3,
        # A snapshot lives three intervals: long enough to outlast a test on a loaded machine.
        "cluster_snapshot_interval_s": 60,
    }
