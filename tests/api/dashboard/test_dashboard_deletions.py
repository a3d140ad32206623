"""The dashboard's delete buttons and the tenants page, through Flask's test client on SQLite and
PostgreSQL: a job, a model version (despite its fine-tuned child) and a data set deleted with
the CSRF token only, built-ins offered no button, and a tenant's disk use and retention kept
across a save. The `/v1` deletions are tests/api/test_api_deletions.py's.
"""

from __future__ import annotations

import io
import re

from flask.testing import FlaskClient

from core.db import Database
from core.settings import Settings
from core.tables import Job, Model
from tests.support.api import Keys, bearer, count_rows
from tests.support.dashboard import audit, login
from tests.support.deletions import files_under, finished_job, trained_model


def test_the_dashboard_deletes_a_job_a_model_and_a_data_set(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    job_id = finished_job(client, database, settings, keys.acme)
    model = trained_model(database, settings, keys.acme_tenant, "poet")
    child = trained_model(database, settings, keys.acme_tenant, "poet", parent_id=model.id)
    form = {"name": "poems", "kind": "text", "file": (io.BytesIO(b"a poem\n"), "p.txt")}
    upload = client.post(
        "/v1/datasets", data=form, headers=bearer(keys.acme), content_type="multipart/form-data"
    )
    dataset_id = upload.get_json()["id"]
    token = login(client, keys.admin)

    page = client.get(f"/admin/jobs/{job_id}").get_data(as_text=True)
    assert f"/admin/jobs/{job_id}/delete" in page and "data-confirm=" in page
    # Without the CSRF token nothing happens.
    assert client.post(f"/admin/jobs/{job_id}/delete").status_code in (400, 403)
    assert count_rows(database, Job) == 1
    done = client.post(f"/admin/jobs/{job_id}/delete", data={"csrf_token": token})
    assert done.status_code == 302 and count_rows(database, Job) == 0
    assert files_under(settings.artifacts / "outputs" / keys.acme_tenant / job_id) == []

    models = client.get("/admin/models").get_data(as_text=True)
    assert 'data-delete-model="poet:1"' in models and "despite 1 fine-tuned" in models
    assert 'data-delete-model="echo:1"' not in models  # built in
    refused = client.post(f"/admin/models/{model.id}/delete", data={"csrf_token": token})
    assert refused.status_code == 409 and "force" in refused.get_data(as_text=True)
    forced = client.post(
        f"/admin/models/{model.id}/delete", data={"csrf_token": token, "force": "on"}
    )
    assert forced.status_code == 302
    with database.read() as session:
        assert session.get(Model, model.id) is None
        assert session.get_one(Model, child.id).parent_id is None

    datasets = client.get("/admin/datasets").get_data(as_text=True)
    assert 'data-delete-dataset="poems"' in datasets
    assert 'data-delete-dataset="digits"' not in datasets
    gone = client.post(f"/admin/datasets/{dataset_id}/delete", data={"csrf_token": token})
    assert gone.status_code == 302
    assert files_under(settings.artifacts / "datasets" / dataset_id) == []
    for action in ("job.delete", "model.delete", "dataset.delete"):
        (entry,) = audit(database, action)
        assert entry.detail["via"] == "dashboard"


def test_the_tenants_page_shows_disk_use_and_keeps_retention_across_a_save(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    finished_job(client, database, settings, keys.acme)
    token = login(client, keys.admin)
    page = client.get("/admin/tenants").get_data(as_text=True)
    assert re.search(r'data-disk="acme">Disk: 6 Bytes outputs', page), page
    form = {
        "csrf_token": token,
        "weight": "2",
        "budget_period_s": "86400",
        "over_quota": "reject",
        "preemptible": "yes",
        "may_opt_out": "no",
        "retain_outputs_days": "14",
        "retain_events_days": "0",
        "retain_jobs_days": "",
    }
    saved = client.post(f"/admin/tenants/{keys.acme_tenant}/quotas", data=form)
    assert saved.status_code == 302, saved.get_data(as_text=True)
    tenant = client.get("/v1/tenants/acme", headers=bearer(keys.admin)).get_json()
    assert tenant["retention"]["own"] == {"outputs_days": 14, "events_days": 0, "jobs_days": None}
    page = client.get("/admin/tenants").get_data(as_text=True)
    assert 'name="retain_outputs_days" size="4" value="14"' in page
    bad = client.post(
        f"/admin/tenants/{keys.acme_tenant}/quotas", data={**form, "retain_jobs_days": "x"}
    )
    assert bad.status_code == 422 and "retain_jobs_days" in bad.get_data(as_text=True)
