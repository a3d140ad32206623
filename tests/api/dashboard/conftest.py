"""The dashboard tests' settings (tests/api/dashboard/): tests/api's fixtures (database, broker,
publisher, app, client, keys) on settings with a session secret, and cluster snapshots that
outlast a test on a loaded machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import Settings
from tests.support.api import BACKENDS, make_settings


@pytest.fixture(params=BACKENDS)
def settings(request: pytest.FixtureRequest, tmp_path: Path, redis_db_url: str) -> Settings:
    return make_settings(
        request,
        tmp_path,
        redis_db_url,
        secret_key="test-secret-key-for-dashboard-sessions",
        max_attempts=3,
        # A snapshot lives three intervals: long enough to outlast a test on a loaded machine.
        cluster_snapshot_interval_s=60,
    )
