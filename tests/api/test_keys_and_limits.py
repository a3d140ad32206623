"""Keys, scopes, rate limits and sessions through the API in this process, with a real Redis
(the limits are counted there) on SQLite and PostgreSQL.

- keys: creation with a scope and an expiry, listing, exact revocation by id and by prefix;
- rate limits: per key and per tenant with 429, Retry-After and the IETF RateLimit fields, a
  tenant's own limit set by PATCH, failed authentication throttled per address, and two app
  instances (two API processes) sharing the count;
- dashboard sessions: logout, "log out everywhere" and revocation end a copied cookie.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from api.app import create_app
from api.auth import key_cache
from core.db import Database
from core.errors import ConflictError, InvalidInputError
from core.keys import create_key, find_key_by_prefix, get_or_create_tenant
from core.settings import Settings
from core.tables import ApiKey, utcnow
from scheduler.enqueue import Publisher
from tests.support.api import (
    Keys,
    assert_problem,
    bearer,
    echo,
    submit,
)
from tests.support.dashboard import csrf_of, login

# Windows of 40 and 60 s: no test here may pass or fail by how fast the machine is.
RATE = {"rate_limit_per_s": 0.1, "rate_limit_burst": 4}
TENANT_RATE = {"tenant_rate_limit_per_s": 0.1, "tenant_rate_limit_burst": 6}


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {
        "rate_limits": True,
        "auth_failures_per_min": 5,
        "secret_key": "test-secret-key-for-sessions",
        **RATE,
        **TENANT_RATE,
    }


@pytest.fixture
def app(settings: Settings, database: Database, publisher: Publisher) -> Flask:  # noqa: F811
    return create_app(settings, database=database, publisher=publisher)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def get_jobs(client: FlaskClient, key: str) -> Any:
    return client.get("/v1/jobs", headers=bearer(key))


# -- keys ----------------------------------------------------------------------------------------


def test_admin_creates_lists_and_revokes_keys_with_scopes(client, keys: Keys) -> None:  # noqa: F811
    made = client.post(
        "/v1/keys",
        json={"tenant": "acme", "scope": "read", "label": "dashboards"},
        headers=bearer(keys.admin),
    )
    assert made.status_code == 201, made.get_data(as_text=True)
    key = made.get_json()
    assert key["scope"] == "read" and key["tenant_id"] == keys.acme_tenant
    assert key["key"].startswith(key["prefix"]) and made.headers["Location"].endswith(key["id"])
    # A read-only key reads but may not write.
    assert get_jobs(client, key["key"]).status_code == 200
    problem = assert_problem(submit(client, key["key"], echo()), 403)
    assert "read-only" in problem["detail"]
    # A tenant's key lists only its tenant's keys, never the key itself.
    listed = client.get("/v1/keys", headers=bearer(keys.acme)).get_json()["items"]
    assert {k["tenant_id"] for k in listed} == {keys.acme_tenant}
    assert key["id"] in {k["id"] for k in listed} and all("key" not in k for k in listed)
    assert client.get("/v1/keys", headers=bearer(keys.globex)).get_json()["items"] != listed
    # Only an admin creates or revokes; another tenant's key id is a 404 to a tenant.
    assert_problem(client.post("/v1/keys", json={"tenant": "acme"}, headers=bearer(keys.acme)), 403)
    assert_problem(client.get(f"/v1/keys/{key['id']}", headers=bearer(keys.globex)), 404)
    assert_problem(client.delete(f"/v1/keys/{key['id']}", headers=bearer(keys.acme)), 403)
    revoked = client.delete(f"/v1/keys/{key['id']}", headers=bearer(keys.admin))
    assert revoked.status_code == 200 and revoked.get_json()["revoked_at"]
    assert_problem(get_jobs(client, key["key"]), 401)


def test_key_creation_refuses_bad_input_naming_the_field(client, keys: Keys) -> None:  # noqa: F811
    for body, field in [
        ({"tenant": "acme", "scope": "root"}, "scope"),
        ({"tenant": "acme", "expires_at": "2020-01-01T00:00:00Z"}, "expires_at"),
        ({"tenant": "acme", "expires_at": "2999-01-01T00:00:00"}, "expires_at"),  # no zone
        ({"tenant": ""}, "tenant"),
        ({"tenant": "acme", "extra": 1}, "extra"),
    ]:
        problem = assert_problem(
            client.post("/v1/keys", json=body, headers=bearer(keys.admin)), 422
        )
        assert problem["errors"][0]["field"] == field, problem


def test_an_expired_key_is_401(client, keys: Keys, database: Database) -> None:  # noqa: F811
    with database.transaction() as session:
        tenant = get_or_create_tenant(session, "acme")
        row, raw = create_key(session, tenant, expires_at=utcnow() + timedelta(hours=1))
        key_id = row.id
    assert get_jobs(client, raw).status_code == 200
    with database.transaction() as session:
        found = session.get(ApiKey, key_id)
        assert found is not None
        found.expires_at = utcnow() - timedelta(seconds=1)
    # Changed in SQL behind the process's back: it reads the key again once its trust of the
    # checked key (settings.auth_cache_s) runs out, as now.
    key_cache(client.application).keys.clear()
    assert "expired" in assert_problem(get_jobs(client, raw), 401)["detail"]


def test_revocation_by_prefix_is_literal_and_exact(database: Database) -> None:  # noqa: F811
    with database.transaction() as session:
        tenant = get_or_create_tenant(session, "acme")
        one, _ = create_key(session, tenant, raw="gq_ab_defghijklmnopqrstuvwxyz")
        create_key(session, tenant, raw="gq_abXdefghijklmnopqrstuvwxyz")
        create_key(session, tenant, raw="gq_zz0000000000000000000000")
    with database.transaction() as session:
        # `_` is a character of keys, matched as itself: not "any character".
        assert find_key_by_prefix(session, "gq_ab_").id == one.id
        with pytest.raises(ConflictError, match="2 keys start with"):
            find_key_by_prefix(session, "gq_ab")
        for pattern in ("gq_%", "gq_a*", "gq_a?", "gq_[a]"):
            with pytest.raises(InvalidInputError, match="no patterns"):
                find_key_by_prefix(session, pattern)
        with pytest.raises(InvalidInputError, match="at least"):
            find_key_by_prefix(session, "gq_")


# -- rate limits ---------------------------------------------------------------------------------


def fields(response: Any) -> dict[str, str]:
    return {k: response.headers.get(k, "") for k in ("RateLimit", "RateLimit-Policy")}


def test_a_key_past_its_burst_gets_429_with_retry_after_and_ietf_fields(client, keys) -> None:  # noqa: F811
    answers = [get_jobs(client, keys.acme) for _ in range(RATE["rate_limit_burst"])]
    assert [r.status_code for r in answers] == [200] * 4
    assert fields(answers[0])["RateLimit-Policy"] == '"key";q=4;w=40'
    assert re.fullmatch(r'"key";r=3;t=[0-9]+', fields(answers[0])["RateLimit"])
    refused = get_jobs(client, keys.acme)
    problem = assert_problem(refused, 429)
    assert problem["type"] == "rate-limited" and problem["policy"] == "key"
    assert 1 <= int(refused.headers["Retry-After"]) <= 40
    assert fields(refused)["RateLimit-Policy"] == '"key";q=4;w=40'
    assert fields(refused)["RateLimit"].startswith('"key";r=0;t=')
    # Another tenant's key is not affected, and admin keys are never limited.
    assert get_jobs(client, keys.globex).status_code == 200
    assert all(get_jobs(client, keys.admin).status_code == 200 for _ in range(10))


def test_the_tenant_limit_counts_all_its_keys_and_an_admin_sets_its_own(
    client,
    keys: Keys,  # noqa: F811
    database: Database,  # noqa: F811
) -> None:
    with database.transaction() as session:
        acme = get_or_create_tenant(session, "acme")
        extra = [create_key(session, acme)[1] for _ in range(2)]
    # Three keys of one tenant, 3 requests each: the tenant's 6 run out before any key's 4.
    codes = [get_jobs(client, k).status_code for k in [keys.acme, *extra] for _ in range(3)]
    assert codes.count(200) == 6 and codes.count(429) == 3
    refused = assert_problem(get_jobs(client, extra[1]), 429)
    assert refused["policy"] == "tenant"
    # An admin gives the tenant more (one key's own limit still applies).
    changed = client.patch(
        "/v1/tenants/globex",
        json={"rate_limit_per_s": 0.5, "rate_limit_burst": 200},
        headers=bearer(keys.admin),
    )
    assert changed.status_code == 200
    assert changed.get_json()["rate_limit"] == {"per_s": 0.5, "burst": 200, "is_default": False}
    with database.transaction() as session:
        globex = get_or_create_tenant(session, "globex")
        many = [create_key(session, globex)[1] for _ in range(3)]
    codes = [get_jobs(client, k).status_code for k in many for _ in range(3)]
    assert codes == [200] * 9
    bad = client.patch(
        "/v1/tenants/globex", json={"rate_limit_burst": 0}, headers=bearer(keys.admin)
    )
    assert assert_problem(bad, 422)["errors"][0]["field"] == "rate_limit_burst"


def test_two_api_processes_share_the_count(
    settings: Settings,
    database: Database,  # noqa: F811
    client,
    keys: Keys,  # noqa: F811
) -> None:
    other_publisher = Publisher(settings)
    other = create_app(settings, database=database, publisher=other_publisher).test_client()
    try:
        codes = [
            (client if i % 2 else other).get("/v1/jobs", headers=bearer(keys.acme)).status_code
            for i in range(6)
        ]
    finally:
        other_publisher.close()
    assert codes == [200, 200, 200, 200, 429, 429]


def test_failed_keys_are_throttled_per_address(client, keys: Keys, broker) -> None:  # noqa: F811
    wrong = [get_jobs(client, f"gq_wrong{i:030d}").status_code for i in range(5)]
    assert wrong == [401] * 5
    refused = get_jobs(client, "gq_wrong-again-000000000000000000")
    assert assert_problem(refused, 429)["policy"] == "auth"
    assert int(refused.headers["Retry-After"]) >= 1
    # The address is refused before its key is looked at, a right key included...
    assert assert_problem(get_jobs(client, keys.acme), 429)["policy"] == "auth"
    # ...but another address is not, and a missing key is not a guess.
    other = client.get(
        "/v1/jobs", headers=bearer(keys.acme), environ_base={"REMOTE_ADDR": "127.0.0.9"}
    )
    assert other.status_code == 200
    assert client.get("/v1/health").status_code in (200, 503)  # public: never throttled


def test_a_redis_that_does_not_answer_lets_requests_through(
    settings: Settings,
    database: Database,  # noqa: F811
    keys: Keys,  # noqa: F811
) -> None:
    down = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    publisher = Publisher(down)  # noqa: F811
    try:
        app = create_app(down, database=database, publisher=publisher)
        response = app.test_client().get("/v1/jobs", headers=bearer(keys.acme))
    finally:
        publisher.close()
    assert response.status_code == 200
    assert "RateLimit" not in response.headers


# -- dashboard sessions --------------------------------------------------------------------------


def copied(app: Flask, original: FlaskClient) -> FlaskClient:
    """A second browser holding a copy of the first one's session cookie."""
    thief = app.test_client()
    cookie = original.get_cookie("genq_admin", path="/admin")
    assert cookie is not None
    thief.set_cookie("genq_admin", cookie.value, path="/admin")
    return thief


def is_logged_in(client: FlaskClient) -> bool:
    return client.get("/admin/").status_code == 200


@pytest.mark.parametrize("ending", ["logout", "everywhere", "api-everywhere", "revoke"])
def test_a_copied_cookie_stops_working_when_the_session_ends(
    app: Flask,
    keys: Keys,  # noqa: F811
    database: Database,  # noqa: F811
    ending: str,  # noqa: F811
) -> None:
    browser = app.test_client()
    token = login(browser, keys.admin)
    thief = copied(app, browser)
    assert is_logged_in(thief)
    if ending == "logout":
        assert browser.post("/admin/logout", data={"csrf_token": token}).status_code == 302
    elif ending == "everywhere":
        assert browser.post("/admin/sessions/end", data={"csrf_token": token}).status_code == 302
    elif ending == "api-everywhere":
        ended = app.test_client().delete("/v1/admin/sessions", headers=bearer(keys.admin))
        assert ended.get_json() == {"ended": 1}
    else:
        with database.transaction() as session:
            key_id = session.query(ApiKey.id).filter(ApiKey.is_admin.is_(True)).scalar()
        assert (
            app.test_client().delete(f"/v1/keys/{key_id}", headers=bearer(keys.admin)).status_code
            == 200
        )
    assert not is_logged_in(thief)
    assert not is_logged_in(browser)


def test_every_dashboard_page_sends_security_headers(app: Flask, keys: Keys) -> None:  # noqa: F811
    browser = app.test_client()
    login(browser, keys.admin)
    for path in ("/admin/", "/admin/jobs", "/admin/login", "/admin/no-such-page"):
        response = browser.get(path)
        assert response.headers["X-Frame-Options"] == "DENY", path
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"], path
        assert "script-src 'self'" in response.headers["Content-Security-Policy"], path
        assert response.headers["X-Content-Type-Options"] == "nosniff", path


def test_failed_dashboard_logins_are_throttled(app: Flask, broker: redis.Redis) -> None:
    browser = app.test_client()
    token = csrf_of(browser.get("/admin/login").get_data(as_text=True))
    codes = [
        browser.post("/admin/login", data={"key": f"gq_bad{i}", "csrf_token": token}).status_code
        for i in range(6)
    ]
    assert codes == [401] * 5 + [429]
