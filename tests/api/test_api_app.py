"""The app as a whole: authentication, problem responses, health, the catalog endpoints and
the OpenAPI document."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from openapi_spec_validator import validate
from sqlalchemy import select, update

from api.app import create_app
from api.auth import key_cache
from core.catalog import register_model, resolve_dataset
from core.db import Database
from core.recovery import unpublished_jobs
from core.settings import Settings
from core.tables import ApiKey, Job, Tenant
from scheduler.enqueue import Publisher
from tests.support.api import (
    Keys,
    assert_problem,
    bearer,
    echo,
    submit,
)

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_api_loads_neither_torch_nor_ray(tmp_path: Path) -> None:
    code = (
        "import sys, api, api.app, api.wsgi\n"
        "from core.settings import Settings\n"
        f"s = Settings(_env_file=None, var_dir={str(tmp_path)!r})\n"
        "api.app.create_app(s)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'ray')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_missing_bad_and_revoked_keys_are_401(client: FlaskClient, keys: Keys) -> None:
    for headers in [
        {},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer "},
        bearer("gq_not-a-key-that-exists-anywhere"),
        bearer(keys.revoked),
    ]:
        response = client.get("/v1/jobs", headers=headers)
        assert assert_problem(response, 401)["type"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert_problem(client.post("/v1/jobs", json=echo()), 401)


def test_health_and_openapi_need_no_key(client: FlaskClient) -> None:
    response = client.get("/v1/health")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "checks": {"database": "ok", "broker": "ok"}}
    assert client.get("/v1/openapi.json").status_code == 200


def test_health_is_503_when_the_broker_is_down(settings: Settings, database: Database) -> None:
    down = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    publisher = Publisher(down)
    try:
        app = create_app(down, database=database, publisher=publisher)
        body = assert_problem(app.test_client().get("/v1/health"), 503)
        assert body["checks"] == {"database": "ok", "broker": "unreachable"}
        # A submission still succeeds: the row is the truth, the reconciler publishes later.
        with database.transaction() as session:
            from core.keys import create_key, get_or_create_tenant

            _, key = create_key(session, get_or_create_tenant(session, "solo"))
        response = submit(app.test_client(), key, echo())
        assert response.status_code == 202
        assert response.get_json()["state"] == "queued"
        # Committed as published, then unmarked when the broker refused it: the reconciler's
        # next round picks it up at once, without waiting for republish_after_s.
        job_id = response.get_json()["id"]
        with database.read() as session:
            assert session.get(Job, job_id).published_at is None  # type: ignore[union-attr]
            assert job_id in unpublished_jobs(session, older_than_s=3600)
    finally:
        publisher.close()


def test_openapi_document_is_valid(client: FlaskClient) -> None:
    doc = client.get("/v1/openapi.json").get_json()
    validate(doc)
    assert doc["openapi"].startswith("3.1")
    schemas = doc["components"]["schemas"]
    assert schemas["JobSubmission"]["additionalProperties"] is False
    assert "steps" in schemas["DdpmTrainParams"]["properties"]
    assert "message" in schemas["EchoGenerateParams"]["properties"]
    for path in [
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/retry",
        "/v1/jobs/{job_id}/events",
        "/v1/jobs/{job_id}/logs",
        "/v1/artifacts/{artifact_id}",
        "/v1/models",
        "/v1/models/{name}",
        "/v1/datasets",
        "/v1/families",
        "/v1/health",
        "/v1/openapi.json",
    ]:
        assert path in doc["paths"], path


def test_the_openapi_document_and_the_url_map_name_the_same_operations(
    app: Flask, client: FlaskClient
) -> None:
    # api/openapi_jobs.py and openapi_admin.py declare the operations apart from the views:
    # this holds them to the routes both ways (a route nobody documented, a documented route
    # nobody serves).
    doc = client.get("/v1/openapi.json").get_json()
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/admin"):  # the dashboard's HTML pages are not the API
            continue
        if rule.rule.startswith("/openai/"):
            # OpenAI's API, in OpenAI's shapes: OpenAI's own description covers it, and genq's
            # document leaves it out (docs/openai.md).
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        served |= {(method.lower(), path) for method in rule.methods - {"HEAD", "OPTIONS"}}
    documented = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert served - documented == set(), "served but not documented"
    assert documented - served == set(), "documented but not served"
    assert not any(path.startswith("/openai/") for path in doc["paths"])
    assert any(path.startswith("/v1/") for _, path in served)


def test_unknown_route_and_method_are_problems(client: FlaskClient, keys: Keys) -> None:
    body = assert_problem(client.get("/v1/nothing-here"), 404)
    assert body["type"] == "not-found"
    response = client.delete("/v1/jobs", headers=bearer(keys.acme))
    assert assert_problem(response, 405)["type"] == "method-not-allowed"
    assert "POST" in response.headers["Allow"]


def test_bad_json_body_is_400(client: FlaskClient, keys: Keys) -> None:
    response = client.post(
        "/v1/jobs",
        data=b'{"kind": "generate",',
        headers={**bearer(keys.acme), "Content-Type": "application/json"},
    )
    assert assert_problem(response, 400)["type"] == "bad-request"
    for raw in [b'{"kind": "generate", "priority": NaN}', b"[" * 30_000 + b"]" * 30_000]:
        response = client.post(
            "/v1/jobs",
            data=raw,
            headers={**bearer(keys.acme), "Content-Type": "application/json"},
        )
        assert_problem(response, 400)
    response = client.post("/v1/jobs", data=b"kind=generate", headers={**bearer(keys.acme)})
    assert assert_problem(response, 415)["type"] == "unsupported-media-type"


def test_a_body_over_the_limit_is_413(client: FlaskClient, keys: Keys, settings: Settings) -> None:
    big = echo(message="x" * settings.max_request_bytes)
    response = submit(client, keys.acme, big)
    assert assert_problem(response, 413)["type"] == "too-large"


def test_unexpected_errors_are_a_bare_500_with_the_request_id(
    app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    @app.get("/v1/explode")
    def explode() -> None:
        raise RuntimeError("secret internals")

    app.view_functions["explode"].genq_public = True  # type: ignore[attr-defined]
    response = app.test_client().get("/v1/explode", headers={"X-Request-ID": "req-123"})
    body = assert_problem(response, 500)
    assert response.headers["X-Request-ID"] == "req-123"
    assert "secret" not in response.get_data(as_text=True)
    assert "Traceback" not in response.get_data(as_text=True)
    assert "req-123" in body["detail"]
    assert any(getattr(r, "request_id", None) == "req-123" for r in caplog.records)


def test_every_response_has_a_request_id(client: FlaskClient, keys: Keys) -> None:
    assert client.get("/v1/health").headers["X-Request-ID"]
    assert client.get("/v1/jobs", headers=bearer(keys.acme)).headers["X-Request-ID"]
    unsafe = client.get("/v1/health", headers={"X-Request-ID": "bad id\twith spaces"})
    assert unsafe.headers["X-Request-ID"] != "bad id\twith spaces"


def test_models_and_datasets_are_tenant_scoped(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    with database.transaction() as session:
        digits = resolve_dataset(session, None, "digits")
        first = register_model(
            session,
            tenant_id=keys.acme_tenant,
            name="mine",
            family="ddpm",
            path="models/x",
            dataset_id=digits.id,
            job_id="job-1",
            metrics={"loss": 0.1},
        )
        register_model(
            session,
            tenant_id=keys.acme_tenant,
            name="mine",
            family="ddpm",
            path="models/y",
            parent_id=first.id,
        )
        register_model(
            session, tenant_id=keys.globex_tenant, name="theirs", family="ddpm", path="models/z"
        )

    acme = client.get("/v1/models", headers=bearer(keys.acme)).get_json()["items"]
    refs = [m["ref"] for m in acme]
    assert "echo:1" in refs and "theirs:1" not in refs
    assert [r for r in refs if r.startswith("mine:")] == ["mine:1", "mine:2"]
    mine1 = acme[refs.index("mine:1")]
    assert mine1["family"] == "ddpm" and mine1["metrics"] == {"loss": 0.1}
    assert mine1["lineage"] == {"dataset": "digits", "parent": None, "job": "job-1"}
    assert acme[refs.index("mine:2")]["lineage"]["parent"] == "mine:1"

    versions = client.get("/v1/models/mine", headers=bearer(keys.acme)).get_json()["items"]
    assert [m["version"] for m in versions] == [1, 2]
    assert_problem(client.get("/v1/models/theirs", headers=bearer(keys.acme)), 404)
    assert_problem(client.get("/v1/models/nope", headers=bearer(keys.acme)), 404)
    admin = client.get("/v1/models", headers=bearer(keys.admin)).get_json()["items"]
    assert {"echo:1", "mine:1", "mine:2", "theirs:1"} <= {m["ref"] for m in admin}

    datasets = client.get("/v1/datasets", headers=bearer(keys.globex)).get_json()["items"]
    assert ("digits", "images") in [(d["name"], d["kind"]) for d in datasets]

    # A tenant's own model is what its jobs run.
    job = submit(client, keys.acme, {"kind": "generate", "model": "mine"}).get_json()
    assert job["model"] == "mine:2" and job["family"] == "ddpm"
    assert job["params"]["num_images"] == 4
    assert_problem(submit(client, keys.acme, {"kind": "generate", "model": "theirs"}), 404)


def test_families_list_their_params_schemas(client: FlaskClient, keys: Keys) -> None:
    items = client.get("/v1/families", headers=bearer(keys.acme)).get_json()["items"]
    families = {f["name"]: f for f in items}
    assert families["echo"]["kinds"] == ["generate"]
    assert {"generate", "train"} <= set(families["ddpm"]["kinds"])
    assert families["ddpm"]["dataset_kinds"] == ["images"]
    assert families["ddpm"]["resources"]["num_gpus"] == 0.25
    assert families["ddpm"]["params"]["train"]["properties"]["steps"]["maximum"] == 1_000_000


def test_a_keys_last_use_is_recorded_at_most_once_a_minute(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    def last_used() -> datetime | None:
        with database.read() as session:
            key = session.scalar(select(ApiKey).where(ApiKey.tenant_id == acme_id))
            assert key is not None
            return key.last_used_at

    with database.read() as session:
        acme_id = session.scalar(select(Tenant.id).where(Tenant.name == "acme"))
    assert last_used() is None
    assert client.get("/v1/jobs", headers=bearer(keys.acme)).status_code == 200
    first = last_used()
    assert first is not None
    assert client.get("/v1/jobs", headers=bearer(keys.acme)).status_code == 200
    assert last_used() == first  # within the minute: no second write
    with database.transaction() as session:
        session.execute(
            update(ApiKey)
            .where(ApiKey.tenant_id == acme_id)
            .values(last_used_at=first - timedelta(minutes=2))
        )
    # The process trusts the key it checked for settings.auth_cache_s, last use included; as
    # once that has run out, it reads the key again.
    key_cache(client.application).keys.clear()
    assert client.get("/v1/jobs", headers=bearer(keys.acme)).status_code == 200
    later = last_used()
    assert later is not None and later >= first
