"""`alembic upgrade head` on SQLite and PostgreSQL matches the tables in core, and every
migration's downgrade works."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

import migrations
from core.db import make_engine
from core.settings import Settings
from core.tables import Base


def test_upgrade_has_no_drift_and_downgrade_works(empty_database_url: str, tmp_path: Path) -> None:
    settings = Settings(var_dir=tmp_path, database_url=empty_database_url)
    migrations.upgrade(settings)
    engine = make_engine(settings.db_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
            assert set(Base.metadata.tables) <= set(inspect(conn).get_table_names())
        migrations.downgrade(settings, "base")
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) == {"alembic_version"}
        migrations.upgrade(settings)
        with engine.connect() as conn:
            assert set(Base.metadata.tables) <= set(inspect(conn).get_table_names())
    finally:
        engine.dispose()
