"""What the API serves is what its document says, field for field.

The contract test (tests/api/test_api_contract.py) checks generated requests' answers against the
document, but its objects are open (a client may meet fields added later), so a field a
builder serves and the document leaves out passes there. Here every object of the document
is closed (`additionalProperties: false` wherever it lists properties and says nothing else)
and real answers are checked against it: a finished job with outputs, logs and a placement, a
failed one, a batch, a schedule, keys, tenants, models, data sets, families, input files and
problems.
"""

from __future__ import annotations

import io
from typing import Any

from flask.testing import FlaskClient
from jsonschema import Draft202012Validator
from PIL import Image

from core.db import Database
from core.events import Placement
from core.leases import claim_job
from core.recording import record_placement
from core.settings import Settings
from core.states import JobState
from tests.support.api import (
    Keys,
    bearer,
    echo,
    run_job,
    submit,
)


def closed(schema: Any) -> Any:
    """`schema` with every object that lists its properties closed to any other."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: closed(value) for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def check(doc: dict[str, Any], response: Any, path: str, method: str) -> Any:
    """The answer's body, after checking it against the closed schema the document gives for
    its path, method, status and content type."""
    documented = doc["paths"][path][method]["responses"][str(response.status_code)]
    content_type = response.mimetype
    schema = documented["content"][content_type]["schema"]
    validator = Draft202012Validator(
        {**schema, "components": closed(doc["components"])},
    )
    body = response.get_json()
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(body)]
    assert not errors, (method, path, response.status_code, errors)
    return body


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (4, 3), "red").save(out, format="PNG")
    return out.getvalue()


def test_every_answer_is_the_documented_shape_and_nothing_more(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    doc = client.get("/v1/openapi.json").get_json()
    acme, admin = bearer(keys.acme), bearer(keys.admin)

    def get(path: str, template: str | None = None, headers: dict[str, str] = acme) -> Any:
        return check(doc, client.get(path, headers=headers), template or path, "get")

    # A job that ran to the end with an output, logs, metrics and a webhook.
    submitted = submit(client, keys.acme, {**echo(), "webhook": "https://example.com/hook"})
    job = check(doc, submitted, "/v1/jobs", "post")
    run_job(database, settings, job["id"], outputs={"out.txt": b"hello"})
    done = get(f"/v1/jobs/{job['id']}", "/v1/jobs/{job_id}")
    assert done["state"] == "succeeded" and done["outputs"] and done["webhook"]
    get(f"/v1/jobs/{job['id']}/logs", "/v1/jobs/{job_id}/logs")
    deliveries = get(f"/v1/jobs/{job['id']}/deliveries", "/v1/jobs/{job_id}/deliveries")
    assert deliveries["items"]

    # A failed one (its error), and a running one with its placement.
    failed = submit(client, keys.acme, echo()).get_json()
    run_job(database, settings, failed["id"], state=JobState.FAILED)
    assert get(f"/v1/jobs/{failed['id']}", "/v1/jobs/{job_id}")["error"]
    running = submit(client, keys.acme, echo()).get_json()
    with database.transaction() as session:
        lease = claim_job(session, running["id"], lease_ttl_s=60)
        assert lease is not None
        where = Placement("node-1", "10.0.0.1", "host-1", ["0"], "echo-replica-0", load_s=1.5)
        record_placement(session, lease, where.as_row())
    assert get(f"/v1/jobs/{running['id']}", "/v1/jobs/{job_id}")["placement"]
    page = get("/v1/jobs")
    assert len(page["items"]) == 3

    # A batch and a schedule, with what reads them back.
    response = client.post("/v1/batches", json={"jobs": [echo(), echo()]}, headers=acme)
    batch = check(doc, response, "/v1/batches", "post")
    get(f"/v1/batches/{batch['id']}", "/v1/batches/{batch_id}")
    schedule = {"name": "nightly", "cron": "0 3 * * *", "job": echo()}
    response = client.post("/v1/schedules", json=schedule, headers=acme)
    created = check(doc, response, "/v1/schedules", "post")
    get(f"/v1/schedules/{created['id']}", "/v1/schedules/{schedule_id}")
    get("/v1/schedules")

    # An uploaded input picture, a data set, and the catalog.
    picture = {"file": (io.BytesIO(png()), "red.png")}
    response = client.post("/v1/files", data=picture, headers=acme)
    stored = check(doc, response, "/v1/files", "post")
    assert stored["width"] == 4
    get(f"/v1/files/{stored['id']}", "/v1/files/{file_id}")
    upload = {"name": "poems", "kind": "text", "file": (io.BytesIO(b"a poem"), "poems.txt")}
    check(doc, client.post("/v1/datasets", data=upload, headers=acme), "/v1/datasets", "post")
    get("/v1/datasets")
    models = get("/v1/models")
    get(f"/v1/models/{models['items'][0]['name']}", "/v1/models/{name}")
    get("/v1/families")

    # Tenants, keys and the admin's views.
    get("/v1/tenants", headers=admin)
    get("/v1/tenants/acme", "/v1/tenants/{ref}")
    get("/v1/keys", headers=admin)
    response = client.post("/v1/keys", json={"tenant": "acme", "scope": "read"}, headers=admin)
    key = check(doc, response, "/v1/keys", "post")
    get(f"/v1/keys/{key['id']}", "/v1/keys/{key_id}", headers=admin)
    get("/v1/webhook-secret")
    get("/v1/admin/dropped-messages", headers=admin)
    get("/v1/health/live")

    # Problems: the plain one, and the one that names each bad field.
    missing = client.get("/v1/jobs/nope", headers=acme)
    assert check(doc, missing, "/v1/jobs/{job_id}", "get")["status"] == 404
    invalid = check(doc, submit(client, keys.acme, {"kind": "dance"}), "/v1/jobs", "post")
    assert invalid["errors"]


def test_a_field_the_document_leaves_out_is_caught(client: FlaskClient, keys: Keys) -> None:
    # The check above would pass anything if `closed` closed nothing.
    doc = client.get("/v1/openapi.json").get_json()
    schema = closed(doc["components"])["schemas"]["Job"]
    assert schema["additionalProperties"] is False
    job = submit(client, keys.acme, echo()).get_json()
    validator = Draft202012Validator({"$ref": "#/components/schemas/Job", **closed(doc)})
    assert validator.is_valid(job)
    assert not validator.is_valid({**job, "undocumented": 1})
