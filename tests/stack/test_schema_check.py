"""`genq api`, `genq worker` and `genq scheduler` read the database's schema revision when they
start (stack/cli.py): on a schema older than their code they stop at once, naming both
revisions and `genq migrate`; on one that a newer genq migrated they start, with a warning.
`genq migrate --check` says where the schema stands and changes nothing, and `genq migrate`
leaves a newer genq's schema as it is. Real processes on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

import migrations
from core.db import make_engine
from core.settings import Settings
from tests.support.recovery import wait_until
from tests.support.stackproc import ROOT, free_port

pytestmark = pytest.mark.stack

OLDER = "0012"
NEWER = "9999"  # a revision id none of this genq's migrations has


def _env(database_url: str, var_dir: Path, redis_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    env.update(GENQ_DATABASE_URL=database_url, GENQ_VAR_DIR=str(var_dir))
    if redis_url:
        env["GENQ_REDIS_URL"] = redis_url
    return env


def _genq(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """A genq command to its end: a process that started its service would run until the
    timeout, which fails the test."""
    return subprocess.run(
        [sys.executable, "-m", "stack.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _settings(database_url: str, var_dir: Path) -> Settings:
    return Settings(_env_file=None, var_dir=var_dir, database_url=database_url)  # type: ignore[call-arg]


def _sql(settings: Settings, statement: str) -> list[tuple[object, ...]]:
    engine = make_engine(settings.db_url)
    try:
        with engine.begin() as connection:
            result = connection.execute(text(statement))
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        engine.dispose()


def _head(settings: Settings) -> str:
    return migrations.schema_state(settings).head


@pytest.mark.parametrize("process", ["api", "worker", "scheduler"])
def test_a_process_does_not_start_on_an_older_schema(
    process: str, empty_database_url: str, redis_db_url: str, tmp_path: Path
) -> None:
    settings = _settings(empty_database_url, tmp_path)
    migrations.upgrade(settings, OLDER)
    out = _genq(_env(empty_database_url, tmp_path, redis_db_url), process)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"genq {process} did not start" in out.stderr
    assert f"revision {OLDER} and this genq needs {_head(settings)}" in out.stderr
    assert "run `genq migrate`" in out.stderr
    assert _sql(settings, "SELECT version_num FROM alembic_version") == [(OLDER,)]


def test_a_process_does_not_start_on_a_database_without_the_schema(tmp_path: Path) -> None:
    """A worker pointed at a SQLite file that does not exist (a typo in GENQ_DATABASE_URL)
    stops, and the file is not made."""
    missing = tmp_path / "typo" / "genq.db"
    out = _genq(_env(f"sqlite:///{missing}", tmp_path), "worker")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "genq worker did not start" in out.stderr
    assert "has no genq schema yet: run `genq migrate`" in out.stderr
    assert not missing.parent.exists()


def test_migrate_check_says_where_the_schema_stands_and_changes_nothing(
    empty_database_url: str, tmp_path: Path
) -> None:
    settings = _settings(empty_database_url, tmp_path)
    env = _env(empty_database_url, tmp_path)
    head = _head(settings)

    check = _genq(env, "migrate", "--check")
    assert check.returncode == 1
    assert "has no genq schema yet" in check.stdout

    migrations.upgrade(settings, OLDER)
    check = _genq(env, "migrate", "--check")
    assert check.returncode == 1
    assert f"is at revision {OLDER} and this genq needs {head}" in check.stdout
    assert _sql(settings, "SELECT version_num FROM alembic_version") == [(OLDER,)]

    migrate = _genq(env, "migrate")
    assert migrate.returncode == 0, migrate.stderr
    check = _genq(env, "migrate", "--check")
    assert check.returncode == 0
    assert f"is up to date (revision {head})" in check.stdout


def test_migrate_leaves_a_newer_genqs_schema_as_it_is(
    empty_database_url: str, tmp_path: Path
) -> None:
    settings = _settings(empty_database_url, tmp_path)
    env = _env(empty_database_url, tmp_path)
    assert _genq(env, "migrate").returncode == 0
    keys = _sql(settings, "SELECT id, key_hash FROM api_key")
    assert len(keys) == 1  # the first admin key
    _sql(settings, f"UPDATE alembic_version SET version_num = '{NEWER}'")

    check = _genq(env, "migrate", "--check")
    assert check.returncode == 1
    assert f"is at revision {NEWER}, which a newer genq made" in check.stdout

    migrate = _genq(env, "migrate")
    assert migrate.returncode == 1
    assert "which a newer genq made" in migrate.stderr
    assert "upgrade genq here to migrate it" in migrate.stderr
    assert "Traceback" not in migrate.stderr
    assert _sql(settings, "SELECT version_num FROM alembic_version") == [(NEWER,)]
    assert _sql(settings, "SELECT id, key_hash FROM api_key") == keys


def test_a_process_starts_on_a_newer_genqs_schema_with_a_warning(
    database_url: str, redis_db_url: str, tmp_path: Path
) -> None:
    """genq's migrations only add tables and columns that may be empty or have defaults, so
    an older process runs on a newer schema (a rolling upgrade): it says so and starts."""
    settings = _settings(database_url, tmp_path)
    _sql(settings, f"UPDATE alembic_version SET version_num = '{NEWER}'")
    log = tmp_path / "scheduler.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "stack.cli", "scheduler"],
            env=_env(database_url, tmp_path, redis_db_url),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(
            lambda: "periodic scheduler started" in log.read_text() or process.poll() is not None,
            60,
            "the scheduler to start",
        )
        assert process.poll() is None, log.read_text()
        text_ = log.read_text()
        assert f"genq scheduler: the database ({migrations.schema_state(settings).url})" in text_
        assert f"is at revision {NEWER}, which a newer genq made" in text_
        assert text_.index("newer genq made") < text_.index("periodic scheduler started")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log.read_text()


def test_migrate_check_on_a_database_it_cannot_reach_says_so(tmp_path: Path) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/genq"  # nothing listens there
    check = _genq(_env(url, tmp_path), "migrate", "--check")
    assert check.returncode == 1
    assert "Error: could not read the database's schema" in check.stderr
    assert "Traceback" not in check.stderr
