"""The admin dashboard's session through Flask's test client, on SQLite and PostgreSQL with a real
Redis behind a real Publisher: admin login and its strict httponly cookie (audited), a tenant
or revoked key refused, CSRF on every POST, the session never authenticating `/v1`, logout, and
one generated secret key shared by processes that start together.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from flask.testing import FlaskClient

from core.db import Database
from core.tables import ApiKey
from tests.support.api import Keys, bearer, echo, submit
from tests.support.dashboard import audit, csrf_of, job_row, login


def test_admin_login_sets_a_strict_httponly_cookie_and_is_audited(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    assert client.get("/admin/").status_code == 302  # not logged in: to the login page
    token = csrf_of(client.get("/admin/login").get_data(as_text=True))
    response = client.post("/admin/login", data={"key": keys.admin, "csrf_token": token})
    assert response.status_code == 302 and response.headers["Location"] == "/admin/"
    cookie = response.headers["Set-Cookie"]
    assert "genq_admin=" in cookie and "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie and "Path=/admin" in cookie
    assert "Secure" not in cookie  # plain http here; https requests get Secure
    page = client.get("/admin/")
    assert page.status_code == 200 and "Celery workers" in page.get_data(as_text=True)
    [entry] = audit(database, "login")
    assert entry.key_prefix == keys.admin[:11]


def test_secure_cookie_over_https(client: FlaskClient, keys: Keys) -> None:
    token = csrf_of(client.get("/admin/login", base_url="https://localhost").get_data(True))
    response = client.post(
        "/admin/login",
        data={"key": keys.admin, "csrf_token": token},
        base_url="https://localhost",
    )
    assert response.status_code == 302
    assert "Secure" in response.headers["Set-Cookie"]


def test_a_tenant_key_or_a_revoked_key_cannot_log_in(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    token = csrf_of(client.get("/admin/login").get_data(as_text=True))
    refused = client.post("/admin/login", data={"key": keys.acme, "csrf_token": token})
    assert refused.status_code == 403
    assert "not an admin key" in refused.get_data(as_text=True)
    revoked = client.post("/admin/login", data={"key": keys.revoked, "csrf_token": token})
    assert revoked.status_code == 401
    empty = client.post("/admin/login", data={"key": "", "csrf_token": token})
    assert empty.status_code == 422
    assert client.get("/admin/").status_code == 302  # still logged out
    assert audit(database, "login") == []


def test_login_without_a_csrf_token_is_refused(client: FlaskClient, keys: Keys) -> None:
    client.get("/admin/login")
    response = client.post("/admin/login", data={"key": keys.admin})
    assert response.status_code == 403
    assert client.get("/admin/").status_code == 302


def test_a_post_without_or_with_a_wrong_token_changes_nothing(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    job_id = submit(client, keys.acme, echo(message="hi")).get_json()["id"]
    token = login(client, keys.admin)
    for data in ({}, {"csrf_token": "forged"}, {"csrf_token": token[:-1]}, {"csrf_token": "é"}):
        response = client.post(f"/admin/jobs/{job_id}/cancel", data=data)
        assert response.status_code == 403
        assert "CSRF" in response.get_data(as_text=True)
    with database.transaction() as session:
        key = session.scalar(sa.select(ApiKey).where(ApiKey.prefix == keys.acme[:11]))
        assert key is not None
        key_id = key.id
    response = client.post(f"/admin/keys/{key_id}/revoke")
    assert response.status_code == 403
    assert job_row(database, job_id).state == "queued"
    assert client.get("/v1/jobs", headers=bearer(keys.acme)).status_code == 200
    assert audit(database, "job.cancel") == [] and audit(database, "key.revoke") == []
    # The same post with the session's token works.
    ok = client.post(f"/admin/jobs/{job_id}/cancel", data={"csrf_token": token})
    assert ok.status_code == 302
    assert job_row(database, job_id).state == "canceled"


def test_the_session_cookie_does_not_authenticate_the_api(client: FlaskClient, keys: Keys) -> None:
    login(client, keys.admin)
    cookie = client.get_cookie("genq_admin", path="/admin")
    assert cookie is not None
    # The cookie's path keeps browsers from sending it to /v1; sent anyway, it is ignored.
    response = client.get("/v1/jobs", headers={"Cookie": f"genq_admin={cookie.value}"})
    assert response.status_code == 401
    assert response.mimetype == "application/problem+json"
    posted = client.post("/v1/jobs", json=echo(), headers={"Cookie": f"genq_admin={cookie.value}"})
    assert posted.status_code == 401


def test_logout_ends_the_session(client: FlaskClient, keys: Keys, database: Database) -> None:
    token = login(client, keys.admin)
    assert client.post("/admin/logout", data={"csrf_token": token}).status_code == 302
    assert client.get("/admin/").status_code == 302
    assert client.get("/admin/live/jobs?ids=x").status_code == 401
    assert len(audit(database, "logout")) == 1


def test_processes_starting_together_share_one_generated_secret_key(tmp_path: Path) -> None:
    # Sessions signed by one gunicorn worker must verify in the others.
    import subprocess
    import sys

    code = (
        "import sys; from core.settings import Settings; "
        "print(Settings(_env_file=None, var_dir=sys.argv[1]).read_secret_key())"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    keys = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(keys) == 1 and len(keys.pop()) >= 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret_key"]
