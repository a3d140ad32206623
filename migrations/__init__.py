"""Alembic migrations for genq's tables; `genq migrate` runs them (`upgrade head`).

`schema_state` tells where a database stands against this genq's migrations: `genq api`,
`genq worker` and `genq scheduler` read it when they start, so a process never runs on a
schema older than its code (docs/operating.md, "Upgrading").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy.engine import Connection, make_url

from core.db import READ_ONLY, make_engine
from core.settings import Settings

HERE = Path(__file__).resolve().parent


class SchemaError(RuntimeError):
    """The database's schema is not one this genq can run on, or migrate."""


@dataclass(frozen=True)
class SchemaState:
    """Where a database's schema stands: `current` is its revision (None: no genq schema yet),
    `head` this genq's newest, `known` whether this genq has `current` among its own (a newer
    genq's migrations leave a revision it does not know)."""

    url: str
    current: str | None
    head: str
    known: bool

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head

    @property
    def ahead(self) -> bool:
        """Migrated by a newer genq."""
        return self.current is not None and not self.known

    def describe(self) -> str:
        if self.up_to_date:
            return f"the database ({self.url}) is up to date (revision {self.head})"
        if self.current is None:
            return f"the database ({self.url}) has no genq schema yet: run `genq migrate`"
        if self.ahead:
            return (
                f"the database ({self.url}) is at revision {self.current}, which a newer genq"
                f" made; this genq's newest is {self.head}"
            )
        return (
            f"the database ({self.url}) is at revision {self.current} and this genq needs"
            f" {self.head}: run `genq migrate`"
        )


def alembic_config(settings: Settings) -> Config:
    config = Config()
    config.set_main_option("script_location", str(HERE))
    config.set_main_option("version_locations", str(HERE / "versions"))
    # Interpolation in ini-style options: escape % in passwords.
    config.set_main_option("sqlalchemy.url", settings.db_url.replace("%", "%%"))
    return config


def schema_state(settings: Settings) -> SchemaState:
    """Read the database's revision (one query). A SQLite file that does not exist has no
    schema and is not created. Raises SQLAlchemy's errors when the database cannot be read."""
    script = ScriptDirectory.from_config(alembic_config(settings))
    head = script.get_current_head()
    assert head is not None
    url = settings.db_url
    current: str | None = None
    path = _sqlite_path(url)
    if path is None or path.exists():
        engine = make_engine(url)
        try:
            # (read-only: on SQLite a plain transaction would take the write lock)
            with engine.connect().execution_options(**{READ_ONLY: True}) as connection:
                current = _current_revision(connection)
        finally:
            engine.dispose()
    try:
        known = current is None or script.get_revision(current) is not None
    except CommandError:  # a revision id this genq's scripts do not have
        known = False
    return SchemaState(
        url=make_url(url).render_as_string(hide_password=True),
        current=current,
        head=head,
        known=known,
    )


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Migrate to `revision`. A database a newer genq has migrated is left as it is
    (SchemaError): these scripts cannot tell where its revision stands."""
    path = _sqlite_path(settings.db_url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    state = schema_state(settings)
    if state.ahead:
        raise SchemaError(f"{state.describe()}; upgrade genq here to migrate it")
    command.upgrade(alembic_config(settings), revision)


def downgrade(settings: Settings, revision: str) -> None:
    command.downgrade(alembic_config(settings), revision)


def _current_revision(connection: Connection) -> str | None:
    """The revision in the database's `alembic_version`. Alembic's context says at INFO which
    dialect it found whenever it is set up; at each process start that is noise, so it is
    quieted here (a migration's own lines are not)."""
    logger = logging.getLogger("alembic.runtime.migration")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        return MigrationContext.configure(connection).get_current_revision()
    finally:
        logger.setLevel(level)


def _sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases and for SQLite in memory)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)
