"""Deleting jobs, outputs, model versions and data sets through `/v1` (api/deletions.py), the
Python client and on object storage: what goes (rows and files, counted before and after), what
is refused (409 while in use, 403 for a built-in, 404 for another tenant's), and the audit
entries and counters each leaves. The dashboard's delete buttons are
tests/api/dashboard/test_dashboard_deletions.py's."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask.testing import FlaskClient

from core.artifacts import ArtifactStore
from core.db import Database
from core.deletion import read_counters
from core.settings import Settings
from core.states import JobState
from core.tables import Artifact, Dataset, Job, JobEvent, Model
from tests.support.api import Keys, assert_problem, bearer, count_rows, echo, submit
from tests.support.dashboard import audit
from tests.support.deletions import files_under, finished_job, trained_model


def test_a_finished_job_is_deleted_with_its_events_and_outputs(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    job_id = finished_job(client, database, settings, keys.acme)
    other = finished_job(client, database, settings, keys.acme)
    outputs = settings.artifacts / "outputs" / keys.acme_tenant
    assert len(files_under(outputs / job_id)) == 2 and len(files_under(outputs / other)) == 2
    events_before = count_rows(database, JobEvent)

    # Another tenant's job is not there for globex; a read-only answer is not a deletion.
    assert_problem(client.delete(f"/v1/jobs/{job_id}", headers=bearer(keys.globex)), 404)
    response = client.delete(f"/v1/jobs/{job_id}", headers=bearer(keys.acme))
    assert response.status_code == 204, response.get_data(as_text=True)

    assert files_under(outputs / job_id) == [] and len(files_under(outputs / other)) == 2
    with database.read() as session:
        assert session.get(Job, job_id) is None
        assert session.scalar(sa.select(sa.func.count()).where(JobEvent.job_id == job_id)) == 0
        assert session.scalar(sa.select(sa.func.count()).where(Artifact.job_id == job_id)) == 0
        assert session.get(Job, other) is not None
        counters = read_counters(session)
    assert count_rows(database, JobEvent) < events_before
    assert count_rows(database, Artifact) == 2  # the other job's
    (entry,) = audit(database, "job.delete")
    assert entry.target_id == job_id and entry.tenant_id == keys.acme_tenant
    assert entry.detail["files"] == 2 and entry.detail["bytes"] == 6 and entry.detail["jobs"] == 1
    assert counters["api"]["jobs"] == 1 and counters["api"]["bytes"] == 6
    assert_problem(client.get(f"/v1/jobs/{job_id}", headers=bearer(keys.acme)), 404)
    assert_problem(client.delete(f"/v1/jobs/{job_id}", headers=bearer(keys.acme)), 404)


def test_a_job_that_has_not_finished_is_not_deleted(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    job_id = submit(client, keys.acme, echo()).get_json()["id"]
    problem = assert_problem(client.delete(f"/v1/jobs/{job_id}", headers=bearer(keys.admin)), 409)
    assert "cancel it first" in problem["detail"] and problem["state"] == "queued"
    assert count_rows(database, Job) == 1
    client.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(keys.acme))
    assert client.delete(f"/v1/jobs/{job_id}", headers=bearer(keys.admin)).status_code == 204
    assert count_rows(database, Job) == 0
    (entry,) = audit(database, "job.delete")
    assert entry.detail["via"] == "api" and entry.tenant_id != keys.acme_tenant  # the admin


def test_one_output_is_deleted_alone(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    job_id = finished_job(client, database, settings, keys.acme)
    outputs = client.get(f"/v1/jobs/{job_id}", headers=bearer(keys.acme)).get_json()["outputs"]
    first = next(o for o in outputs if o["name"] == "a.txt")
    assert_problem(client.delete(f"/v1/artifacts/{first['id']}", headers=bearer(keys.globex)), 404)

    response = client.delete(f"/v1/artifacts/{first['id']}", headers=bearer(keys.acme))
    assert response.status_code == 204
    folder = settings.artifacts / "outputs" / keys.acme_tenant / job_id
    assert [p.name for p in files_under(folder)] == ["b.txt"]
    left = client.get(f"/v1/jobs/{job_id}", headers=bearer(keys.acme)).get_json()["outputs"]
    assert [o["name"] for o in left] == ["b.txt"]
    assert_problem(client.get(f"/v1/artifacts/{first['id']}", headers=bearer(keys.acme)), 404)
    (entry,) = audit(database, "artifact.delete")
    assert entry.detail["bytes"] == 4 and entry.detail["job_id"] == job_id


def test_an_output_of_a_running_job_is_not_deleted(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    job_id = finished_job(client, database, settings, keys.acme)
    with database.transaction() as session:  # as if it had been retried and started again
        session.execute(sa.update(Job).where(Job.id == job_id).values(state="running"))
    (output, _) = client.get(f"/v1/jobs/{job_id}", headers=bearer(keys.acme)).get_json()["outputs"]
    assert_problem(client.delete(f"/v1/artifacts/{output['id']}", headers=bearer(keys.acme)), 409)
    assert count_rows(database, Artifact) == 2


def test_a_model_version_in_use_or_with_children_is_refused_until_asked(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    parent = trained_model(database, settings, keys.acme_tenant, "poet")
    child = trained_model(database, settings, keys.acme_tenant, "poet", parent_id=parent.id)
    weights = settings.artifacts / parent.path  # type: ignore[operator]
    job = submit(client, keys.acme, {"kind": "generate", "model": "poet:1", "params": {}})
    assert job.status_code == 202, job.get_json()
    acme = bearer(keys.acme)

    assert_problem(client.delete("/v1/models/poet/1", headers=bearer(keys.globex)), 404)
    in_use = assert_problem(client.delete("/v1/models/poet/1", headers=acme), 409)
    assert in_use["job_ids"] == [job.get_json()["id"]]
    client.post(f"/v1/jobs/{job.get_json()['id']}/cancel", headers=acme)

    parent_of = assert_problem(client.delete("/v1/models/poet/1", headers=acme), 409)
    assert parent_of["children"] == ["poet:2"] and "force=true" in parent_of["detail"]
    bad = assert_problem(client.delete("/v1/models/poet/1?force=maybe", headers=acme), 422)
    assert bad["errors"][0]["field"] == "force"
    assert len(files_under(weights)) == 2

    assert client.delete("/v1/models/poet/1?force=true", headers=acme).status_code == 204
    assert files_under(weights) == []
    child_weights = settings.artifacts / child.path  # type: ignore[operator]
    assert len(files_under(child_weights)) == 2  # the child keeps its own weights
    with database.read() as session:
        assert session.get(Model, parent.id) is None
        kept = session.get_one(Model, child.id)
        assert kept.parent_id is None
        # The canceled job that named it is kept, without the link.
        assert session.get_one(Job, job.get_json()["id"]).model_id is None
    shown = client.get(f"/v1/jobs/{job.get_json()['id']}", headers=acme).get_json()
    assert shown["state"] == "canceled" and shown["model"] is None
    (entry,) = audit(database, "model.delete")
    assert entry.detail["ref"] == "poet:1" and entry.detail["orphaned"] == ["poet:2"]
    assert entry.detail["files"] == 2 and entry.detail["models"] == 1


def test_built_in_models_and_data_sets_are_not_deleted(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    assert_problem(client.delete("/v1/models/echo/1", headers=bearer(keys.acme)), 403)
    assert_problem(client.delete("/v1/models/echo/1", headers=bearer(keys.admin)), 409)
    assert_problem(client.delete("/v1/models/echo/x", headers=bearer(keys.admin)), 404)
    with database.read() as session:
        digits = session.scalar(sa.select(Dataset.id).where(Dataset.name == "digits"))
    assert_problem(client.delete(f"/v1/datasets/{digits}", headers=bearer(keys.acme)), 403)
    assert_problem(client.delete(f"/v1/datasets/{digits}", headers=bearer(keys.admin)), 409)


def test_a_tenants_own_version_wins_over_a_built_in_of_the_same_name(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    own = trained_model(database, settings, keys.acme_tenant, "echo")
    assert own.version == 1
    assert client.delete("/v1/models/echo/1", headers=bearer(keys.acme)).status_code == 204
    with database.read() as session:
        left = session.scalars(sa.select(Model).where(Model.name == "echo")).all()
    assert [m.tenant_id for m in left] == ["system"]


def test_a_data_set_in_use_is_refused_then_deleted_with_its_files(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    acme = bearer(keys.acme)
    form = {"name": "poems", "kind": "text", "file": (io.BytesIO(b"a poem\n" * 10), "p.txt")}
    upload = client.post(
        "/v1/datasets", data=form, headers=acme, content_type="multipart/form-data"
    )
    assert upload.status_code == 201, upload.get_json()
    dataset_id = upload.get_json()["id"]
    folder = settings.artifacts / "datasets" / dataset_id
    assert files_under(folder)
    body = {"kind": "train", "family": "charlm", "dataset": "poems", "name": "poet"}
    job = submit(client, keys.acme, body)
    assert job.status_code == 202, job.get_json()

    assert_problem(client.delete(f"/v1/datasets/{dataset_id}", headers=bearer(keys.globex)), 404)
    refused = assert_problem(client.delete(f"/v1/datasets/{dataset_id}", headers=acme), 409)
    assert refused["job_ids"] == [job.get_json()["id"]]
    assert files_under(folder)

    client.post(f"/v1/jobs/{job.get_json()['id']}/cancel", headers=acme)
    assert client.delete(f"/v1/datasets/{dataset_id}", headers=acme).status_code == 204
    assert files_under(folder) == []
    listed = client.get("/v1/datasets", headers=acme).get_json()["items"]
    assert "poems" not in [d["name"] for d in listed]
    (entry,) = audit(database, "dataset.delete")
    assert entry.detail["name"] == "poems" and entry.detail["files"] >= 1


def test_tenants_show_retention_and_disk_use_and_admins_set_retention(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    finished_job(client, database, settings, keys.acme)
    tenant = client.get("/v1/tenants/acme", headers=bearer(keys.acme)).get_json()
    assert tenant["disk"] == {"outputs_bytes": 6, "datasets_bytes": 0, "models_bytes": 0}
    assert tenant["retention"]["outputs_days"] is None  # the default: forever

    change = {"retain_outputs_days": 7, "retain_jobs_days": 0}
    assert_problem(client.patch("/v1/tenants/acme", json=change, headers=bearer(keys.acme)), 403)
    changed = client.patch("/v1/tenants/acme", json=change, headers=bearer(keys.admin))
    assert changed.status_code == 200, changed.get_json()
    retention = changed.get_json()["retention"]
    assert retention["outputs_days"] == 7 and retention["jobs_days"] is None
    assert retention["own"] == {"outputs_days": 7, "events_days": None, "jobs_days": 0}
    bad = client.patch(
        "/v1/tenants/acme", json={"retain_events_days": -1}, headers=bearer(keys.admin)
    )
    assert assert_problem(bad, 422)["errors"][0]["field"] == "retain_events_days"
    listed = client.get("/v1/tenants", headers=bearer(keys.admin)).get_json()["items"]
    assert {t["name"]: t["disk"]["outputs_bytes"] for t in listed}["acme"] == 6


def test_a_read_only_key_deletes_nothing(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    from core.keys import KeyScope, create_key
    from core.tables import Tenant

    job_id = finished_job(client, database, settings, keys.acme)
    with database.transaction() as session:
        _, raw = create_key(session, session.get_one(Tenant, keys.acme_tenant), scope=KeyScope.READ)
    assert_problem(client.delete(f"/v1/jobs/{job_id}", headers=bearer(raw)), 403)
    assert count_rows(database, Job) == 1
    assert (
        client.get(f"/v1/jobs/{job_id}", headers=bearer(raw)).get_json()["state"]
        == JobState.SUCCEEDED
    )


# -- the Python client ---------------------------------------------------------------------------


def test_the_client_deletes_through_the_api(
    app: Any, client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    import httpx

    from genq_client import Client
    from genq_client.errors import Conflict, NotFound

    job_id = finished_job(client, database, settings, keys.acme)
    trained_model(database, settings, keys.acme_tenant, "poet")
    transport = httpx.WSGITransport(app=app)
    with Client("http://genq", keys.acme, transport=transport, max_retries=0) as genq:
        job = genq.get_job(job_id)
        genq.delete_output(job.outputs[0])
        assert len(genq.get_job(job_id).outputs) == 1
        genq.delete_job(job_id)
        with pytest.raises(NotFound):
            genq.get_job(job_id)
        queued = genq.submit(model="poet:1")
        with pytest.raises(Conflict):
            genq.delete_model("poet", 1)
        genq.cancel(queued.id)
        genq.delete_model("poet", 1, force=True)
        assert "poet" not in [m.name for m in genq.list_models()]
        with pytest.raises(NotFound):
            genq.delete_dataset("no-such-id")


# -- object storage ------------------------------------------------------------------------------


@pytest.fixture
def s3_app(
    tmp_path: Path, s3_url: str, redis_db_url: str
) -> Iterator[tuple[Any, Database, ArtifactStore]]:
    """The API on SQLite with its artifact store in a new bucket of the moto server."""
    from api.app import create_app
    from core.catalog import ensure_builtins
    from core.tables import Base
    from scheduler.enqueue import Publisher

    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        var_dir=tmp_path / "var",
        database_url=f"sqlite:///{tmp_path / 'genq.db'}",
        redis_url=redis_db_url,
        artifact_url=s3_url,
        rate_limits=False,
    )
    db = Database(settings)
    Base.metadata.create_all(db.engine)
    with db.transaction() as session:
        ensure_builtins(session)
    publisher = Publisher(settings)
    app = create_app(settings, database=db, publisher=publisher)
    yield app, db, ArtifactStore.from_settings(settings)
    publisher.close()
    db.dispose()


def test_deleting_on_object_storage_removes_the_objects_from_the_bucket(
    s3_app: tuple[Any, Database, ArtifactStore],
) -> None:
    import boto3

    from core.events import Output
    from core.keys import create_key, get_or_create_tenant
    from core.leases import claim_job, finish_job
    from core.recording import record_output

    app, database, store = s3_app
    bucket = store.backend.bucket  # type: ignore[attr-defined]

    def objects() -> set[str]:
        pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return {item["Key"] for page in pages for item in page.get("Contents", [])}

    with database.transaction() as session:
        tenant = get_or_create_tenant(session, "acme")
        _, key = create_key(session, tenant)
        tenant_id = tenant.id
    client = app.test_client()
    jobs = [submit(client, key, echo()).get_json()["id"] for _ in range(2)]
    for job_id in jobs:
        with database.transaction() as session:
            lease = claim_job(session, job_id, lease_ttl_s=60)
        assert lease is not None
        for name in ("a.txt", "b.txt"):
            stored = store.write_output(tenant_id, job_id, name, name.encode() * 3)
            with database.transaction() as session:
                record_output(session, lease, Output(name, "text", "text/plain", b""), stored)
        store.put_bytes(f"{store.checkpoint_prefix(job_id)}/step-1.pt", b"c" * 10)
        with database.transaction() as session:
            finish_job(session, lease, JobState.SUCCEEDED)
    before = objects()
    assert len(before) == 6

    first, second = jobs
    (output, _) = client.get(f"/v1/jobs/{second}", headers=bearer(key)).get_json()["outputs"]
    assert client.delete(f"/v1/artifacts/{output['id']}", headers=bearer(key)).status_code == 204
    assert client.delete(f"/v1/jobs/{first}", headers=bearer(key)).status_code == 204
    # Left: the second job's other output and its checkpoint.
    assert objects() == {k for k in before if second in k and not k.endswith(output["name"])}
    assert len(objects()) == 2
    (entry,) = audit(database, "job.delete")
    assert entry.detail["files"] == 3 and entry.detail["bytes"] == 15 + 15 + 10
