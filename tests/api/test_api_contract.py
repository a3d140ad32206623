"""The API against its own OpenAPI document, and input that once ended as a 500.

Schemathesis reads `/v1/openapi.json` and sends generated requests to every operation (in
process, through the WSGI app, on SQLite and on PostgreSQL): valid ones from the schemas, and
ones just outside them. Each answer must be documented (status, content type, body schema) and
none may be a server error. Generation is derandomized, so a run is repeatable; a failure prints
the request that caused it.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import schemathesis
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.openapi import document
from core.db import Database
from core.settings import Settings
from core.tables import ApiKey, Dataset, Job, Model, Schedule
from tests.support.api import (
    Keys,
    assert_problem,
    bearer,
    count_rows,
    echo,
    submit,
)

# The document as the app serves it with the test settings' page size (tests.support.api).
contract = schemathesis.openapi.from_dict(document(limit_max=20))


@contract.parametrize()
@hypothesis_settings(
    max_examples=30,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_as_its_document_says(
    case: schemathesis.Case, app: Flask, keys: Keys
) -> None:
    # An admin key reaches every operation, the admin-only ones included.
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    if case.path == "/v1/health/ready":
        # No worker or scheduler runs here: its documented answer is the 503 problem.
        checks.remove(not_a_server_error)
    case.call_and_validate(app=app, headers=bearer(keys.admin), checks=checks)


# -- numbers that arrive as text ------------------------------------------------------------------

# '²' passes str.isdigit() but not int(); 2**31 is past PostgreSQL's INTEGER (model versions),
# 2**63 past any SQL integer; 5,000 digits past what int() reads from a string at all.
NOT_NUMBERS = ["²", str(2**31), str(2**63), "9" * 5000]


@pytest.mark.parametrize("raw", NOT_NUMBERS)
def test_a_number_sql_or_int_would_refuse_is_a_4xx_naming_it(
    client: FlaskClient, keys: Keys, database: Database, raw: str
) -> None:
    job = submit(client, keys.acme, echo()).get_json()
    headers = bearer(keys.acme)

    for path in ("/v1/jobs", "/v1/dead-letter"):
        response = client.get(path, query_string={"limit": raw}, headers=headers)
        assert [e["field"] for e in assert_problem(response, 422)["errors"]] == ["limit"]

    if raw != str(2**31):  # (a valid event id: the stream would wait for the job to end)
        events = f"/v1/jobs/{job['id']}/events"
        response = client.get(events, query_string={"last_event_id": raw}, headers=headers)
        assert [e["field"] for e in assert_problem(response, 422)["errors"]] == ["last_event_id"]

    # A model version that cannot exist is a model that does not exist, and nothing is stored.
    response = submit(client, keys.acme, {"kind": "generate", "model": f"echo:{raw}"})
    if len(raw) < 100:
        assert f"echo:{raw}" in assert_problem(response, 404)["detail"]
    else:  # past the field's length limit
        assert [e["field"] for e in assert_problem(response, 422)["errors"]] == ["model"]
    assert count_rows(database, Job) == 1
    response = client.post(f"/v1/models/echo/{raw}/check", headers=bearer(keys.admin))
    assert_problem(response, 404)


def upload_text(client: FlaskClient, key: str, name: str, text: bytes) -> Any:
    return client.post(
        "/v1/datasets",
        data={"name": name, "kind": "text", "file": (io.BytesIO(text), "poems.txt")},
        headers=bearer(key),
        content_type="multipart/form-data",
    )


def test_a_data_set_name_with_a_trailing_newline_is_refused(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    # re.match with `$` lets "name\n" through; the name becomes a folder in the artifact store.
    built_in = count_rows(database, Dataset)
    response = upload_text(client, keys.acme, "poems\n", b"a poem")
    assert [e["field"] for e in assert_problem(response, 422)["errors"]] == ["name"]
    assert count_rows(database, Dataset) == built_in


# -- what every body operation may answer before it reads the body -------------------------------


def test_a_body_that_is_not_json_is_a_documented_400_or_415(
    client: FlaskClient, keys: Keys
) -> None:
    doc = client.get("/v1/openapi.json").get_json()
    with_body = [
        (path, method)
        for path, operations in doc["paths"].items()
        for method, operation in operations.items()
        if "requestBody" in operation
    ]
    assert ("/v1/tenants/{ref}", "patch") in with_body
    for path, method in with_body:
        documented = doc["paths"][path][method]["responses"]
        assert {"400", "413", "415"} <= set(documented), (method, path)

    admin = bearer(keys.admin)
    unsent = client.patch("/v1/tenants/acme", data="weight=2", headers=admin)
    assert_problem(unsent, 415)
    broken = client.patch(
        "/v1/tenants/acme", data="{", headers={**admin, "Content-Type": "application/json"}
    )
    assert_problem(broken, 400)


ECHO = {"kind": "generate", "model": "echo", "params": {}}


# -- the NUL character ------------------------------------------------------------------------

# (method, path, JSON body, extra headers, query, the field the 422 names). PostgreSQL stores
# NUL in neither text nor jsonb: each of these was a 500 there before api/inputs.py.
WITH_NUL = [
    ("POST", "/v1/jobs", {**ECHO, "params": {"message": "a\x00b"}}, {}, {}, "params.message"),
    ("POST", "/v1/jobs", {**ECHO, "model": "ec\x00ho"}, {}, {}, "model"),
    ("POST", "/v1/jobs", {**ECHO, "webhook": "https://a\x00.example/"}, {}, {}, "webhook"),
    ("POST", "/v1/jobs", ECHO, {"Idempotency-Key": "k\x00"}, {}, "Idempotency-Key"),
    ("GET", "/v1/jobs", None, {}, {"model": "a\x00"}, "model"),
    ("GET", "/v1/jobs/a\x00b", None, {}, {}, "job_id"),
    (
        "POST",
        "/v1/schedules",
        {"name": "n", "cron": "0 3 * * *", "job": {**ECHO, "params": {"message": "\x00"}}},
        {},
        {},
        "job.params.message",
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "query", "field"),
    WITH_NUL,
    ids=[f"{m} {p!r} {f}" for m, p, _, _, _, f in WITH_NUL],
)
def test_a_nul_character_anywhere_is_a_422_naming_the_field(
    client: FlaskClient,
    keys: Keys,
    database: Database,
    method: str,
    path: str,
    body: Any,
    headers: dict[str, str],
    query: dict[str, str],
    field: str,
) -> None:
    response = client.open(
        path,
        method=method,
        json=body,
        query_string=query,
        headers={**bearer(keys.acme), **headers},
    )
    errors = assert_problem(response, 422)["errors"]
    assert errors == [{"field": field, "message": "must not contain the NUL character (U+0000)"}]
    assert count_rows(database, Job) == 0 and count_rows(database, Schedule) == 0


def test_nul_in_a_dashboard_form_or_a_text_data_set_is_refused(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    from tests.support.dashboard import login

    built_in = count_rows(database, Dataset)
    upload = upload_text(client, keys.acme, "poems", b"a\x00poem")
    assert [e["field"] for e in assert_problem(upload, 422)["errors"]] == ["file"]
    assert count_rows(database, Dataset) == built_in

    token = login(client, keys.admin)
    keys_before = count_rows(database, ApiKey)
    form = {"csrf_token": token, "tenant": "acme", "label": "ci\x00"}
    response = client.post("/admin/keys", data=form)
    assert response.status_code == 422 and "label" in response.get_data(as_text=True)
    assert count_rows(database, ApiKey) == keys_before


# -- times that parse but fall outside the years 1-9999 once in UTC -----------------------------

OUT_OF_RANGE = ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"]


@pytest.mark.parametrize("moment", OUT_OF_RANGE)
def test_a_time_outside_the_years_1_to_9999_in_utc_is_a_422(
    client: FlaskClient, keys: Keys, database: Database, moment: str
) -> None:
    # Python's datetime cannot convert them to UTC (OverflowError): they were 500s.
    for field in ("run_at", "deadline"):
        response = submit(client, keys.acme, {**ECHO, field: moment})
        assert [e["field"] for e in assert_problem(response, 422)["errors"]] == [field]
    assert count_rows(database, Job) == 0
    # The 9999 one in UTC is fine: a job that will wait (long) for its time.
    later = submit(client, keys.acme, {**ECHO, "run_at": "9999-12-31T23:59:59+00:00"})
    assert later.status_code == 202 and later.get_json()["state"] == "scheduled"

    from tests.support.dashboard import login

    login(client, keys.admin)
    for field in ("since", "until"):
        page = client.get("/admin/jobs", query_string={field: moment})
        assert page.status_code == 422 and field in page.get_data(as_text=True)


def test_a_model_folder_the_file_system_cannot_look_up_is_a_422(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    # A path component past 255 bytes makes stat() fail with ENAMETOOLONG: it was a 500.
    models_before = count_rows(database, Model)
    for path in ("/tmp/" + "a" * 300 + "/unet", "b" * 300):
        body = {"name": "sd", "family": "diffusers", "path": path}
        response = client.post("/v1/models", json=body, headers=bearer(keys.admin))
        assert [e["field"] for e in assert_problem(response, 422)["errors"]] == ["path"]
    assert count_rows(database, Model) == models_before


def test_a_data_set_name_longer_than_its_column_is_a_422(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    # 129-255 characters passed the name check but not PostgreSQL's VARCHAR(128): a 500, after
    # the files were unpacked.
    built_in = count_rows(database, Dataset)
    response = upload_text(client, keys.acme, "d" * 129, b"a poem")
    assert [e["field"] for e in assert_problem(response, 422)["errors"]] == ["name"]
    assert count_rows(database, Dataset) == built_in
    assert not list(settings.artifacts.rglob("d" * 129))
    assert upload_text(client, keys.acme, "d" * 128, b"a poem").status_code == 201


def test_the_diffusion_parameters_and_the_input_upload_are_documented() -> None:
    doc = document(limit_max=20)
    schemas = doc["components"]["schemas"]
    generate = schemas["DiffusersGenerateParams"]["properties"]
    assert {"image", "mask", "strength", "negative_prompt", "scheduler", "preview_every"} <= set(
        generate
    )
    assert {"ddim", "euler", "dpm++_2m"} <= set(generate["scheduler"]["enum"])
    finetune = schemas["DiffusersFinetuneParams"]["properties"]
    assert {"rank", "alpha", "steps", "learning_rate", "batch_size", "resolution", "seed"} <= set(
        finetune
    )
    assert "post" in doc["paths"]["/v1/files"] and "get" in doc["paths"]["/v1/files/{file_id}"]
    kinds = doc["paths"]["/v1/datasets"]["post"]["requestBody"]["content"]
    assert "captioned_images" in str(kinds)
