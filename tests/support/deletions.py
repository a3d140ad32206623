"""Helpers of the deletion tests (tests/api/test_api_deletions.py, the dashboard's in
tests/api/dashboard/): a finished job with two outputs, a model version as a training job leaves
it (weights in the store), and the files left under a folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask.testing import FlaskClient

from core.artifacts import ArtifactStore
from core.catalog import register_model
from core.db import Database
from core.settings import Settings
from core.tables import Model
from tests.support.api import echo, run_job, submit


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def finished_job(client: FlaskClient, database: Database, settings: Settings, key: str) -> str:
    job_id = str(submit(client, key, echo(message="hi")).get_json()["id"])
    run_job(database, settings, job_id, outputs={"a.txt": b"aaaa", "b.txt": b"bb"})
    return job_id


def trained_model(
    database: Database, settings: Settings, tenant_id: str, name: str, **lineage: Any
) -> Model:
    """A version as a training job leaves it: weights under models/<job> in the store."""
    store = ArtifactStore(settings.artifacts)
    job_id = f"00000000-0000-4000-8000-{abs(hash((name, str(lineage)))) % 10**12:012d}"
    folder = store.model_dir(job_id)
    store.put_bytes(f"{folder}/model.safetensors", b"w" * 100)
    store.put_bytes(f"{folder}/genq.json", b"{}")
    with database.transaction() as session:
        model = register_model(
            session,
            tenant_id=tenant_id,
            name=name,
            family="charlm",
            path=folder,
            job_id=job_id,
            **lineage,
        )
        session.expunge(model)
    return model
