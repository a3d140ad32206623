"""The admin dashboard's actions through Flask's test client, on SQLite and PostgreSQL with a real
Redis behind a real Publisher: cancel, retry (republished), priority and keys (created, shown
once, revoked; the admin's own key ends its session) through the core services with an audit
row each, and `PATCH /v1/jobs/{id}`'s priority.
"""

from __future__ import annotations

import re

import redis
import sqlalchemy as sa
from flask.testing import FlaskClient

from core.db import Database
from core.leases import claim_job
from core.settings import Settings
from core.states import JobState
from core.tables import ApiKey
from tests.support.api import Keys, bearer, echo, queue_depth, run_job, submit
from tests.support.dashboard import audit, job_row, login


def test_cancel_a_running_job_from_the_dashboard(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    job_id = submit(client, keys.acme, echo(delay_s=60)).get_json()["id"]
    with database.transaction() as session:
        assert claim_job(session, job_id, lease_ttl_s=60) is not None
    token = login(client, keys.admin)
    page = client.get(f"/admin/jobs/{job_id}").get_data(as_text=True)
    assert 'id="cancel"' in page
    client.post(f"/admin/jobs/{job_id}/cancel", data={"csrf_token": token})
    assert job_row(database, job_id).state == "canceling"
    [entry] = audit(database, "job.cancel")
    assert entry.target_id == job_id and entry.detail == {"from": "running", "to": "canceling"}
    assert entry.key_prefix == keys.admin[:11] and entry.tenant_id is not None


def test_retry_a_failed_job_republishes_it(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings, broker: redis.Redis
) -> None:
    job_id = submit(client, keys.acme, echo()).get_json()["id"]
    run_job(database, settings, job_id, state=JobState.FAILED)
    before = queue_depth(broker, "generate")
    token = login(client, keys.admin)
    client.post(f"/admin/jobs/{job_id}/retry", data={"csrf_token": token})
    assert job_row(database, job_id).state == "queued"
    assert queue_depth(broker, "generate") == before + 1
    assert len(audit(database, "job.retry")) == 1
    # Retrying it again (now queued) is refused and recorded nowhere.
    again = client.post(f"/admin/jobs/{job_id}/retry", data={"csrf_token": token})
    assert again.status_code == 409
    assert len(audit(database, "job.retry")) == 1


def test_change_priority_from_the_dashboard(
    client: FlaskClient, keys: Keys, database: Database, broker: redis.Redis
) -> None:
    job_id = submit(client, keys.acme, echo()).get_json()["id"]
    token = login(client, keys.admin)
    for bad in ("x", "12", "-1", "", "²", "9" * 5000):  # '²' passes str.isdigit, not int()
        response = client.post(
            f"/admin/jobs/{job_id}/priority", data={"csrf_token": token, "priority": bad}
        )
        assert response.status_code == 422, bad
        assert "priority" in response.get_data(as_text=True)
    assert job_row(database, job_id).priority == 5
    assert broker.llen("generate:4") == 1  # priority 5 -> Celery step 4
    client.post(f"/admin/jobs/{job_id}/priority", data={"csrf_token": token, "priority": "9"})
    assert job_row(database, job_id).priority == 9
    # Not republished: a message is only a token for a free slot, and the claim reads the
    # priority from SQL (core/fairness.py).
    assert broker.llen("generate:4") == 1 and broker.llen("generate") == 0
    [entry] = audit(database, "job.priority")
    assert entry.detail == {"from": 5, "to": 9, "via": "dashboard"}


def test_patch_priority_over_the_api(
    client: FlaskClient, keys: Keys, database: Database, broker: redis.Redis
) -> None:
    job_id = submit(client, keys.acme, echo()).get_json()["id"]
    path = f"/v1/jobs/{job_id}"
    for body in ({"priority": 10}, {"priority": "8"}, {"priority": True}, {"priority": 8, "x": 1}):
        response = client.patch(path, json=body, headers=bearer(keys.acme))
        assert response.status_code == 422, body
        assert response.get_json()["errors"][0]["field"] == "priority"
    assert client.patch(path, json={"priority": 8}, headers=bearer(keys.globex)).status_code == 404
    assert job_row(database, job_id).priority == 5
    response = client.patch(path, json={"priority": 8}, headers=bearer(keys.acme))
    assert response.status_code == 200 and response.get_json()["priority"] == 8
    # No new message: the one token already queued serves the job at its new priority.
    assert broker.llen("generate:4") == 1 and broker.llen("generate:1") == 0
    [entry] = audit(database, "job.priority")
    assert entry.detail == {"from": 5, "to": 8, "via": "api"}
    assert entry.tenant_id == keys.acme_tenant
    with database.transaction() as session:
        assert claim_job(session, job_id, lease_ttl_s=60) is not None
    running = client.patch(path, json={"priority": 1}, headers=bearer(keys.acme))
    assert running.status_code == 409
    assert job_row(database, job_id).priority == 8


def test_create_a_key_shown_once_then_revoke_it(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    token = login(client, keys.admin)
    response = client.post(
        "/admin/keys", data={"csrf_token": token, "tenant": "initech", "label": "ci"}
    )
    assert response.status_code == 201
    assert response.headers["Cache-Control"] == "no-store"
    raw = re.search(r'id="new-key"[^>]*>(gq_[^<]+)<', response.get_data(as_text=True))
    assert raw is not None
    new_key = raw.group(1)
    assert client.get("/v1/jobs", headers=bearer(new_key)).status_code == 200
    tenants_page = client.get("/admin/tenants").get_data(as_text=True)
    assert new_key not in tenants_page and new_key[:11] in tenants_page
    [created] = audit(database, "key.create")
    assert created.detail["tenant"] == "initech" and created.detail["is_admin"] is False
    client.post(f"/admin/keys/{created.target_id}/revoke", data={"csrf_token": token})
    assert client.get("/v1/jobs", headers=bearer(new_key)).status_code == 401
    assert [e.target_id for e in audit(database, "key.revoke")] == [created.target_id]
    bad = client.post("/admin/keys", data={"csrf_token": token, "tenant": ""})
    assert bad.status_code == 422 and "tenant" in bad.get_data(as_text=True)


def test_revoking_the_admins_own_key_ends_the_session(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    token = login(client, keys.admin)
    with database.transaction() as session:
        key = session.scalar(sa.select(ApiKey).where(ApiKey.prefix == keys.admin[:11]))
        assert key is not None
        key_id = key.id
    client.post(f"/admin/keys/{key_id}/revoke", data={"csrf_token": token})
    assert client.get("/admin/").status_code == 302
