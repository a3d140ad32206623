"""POST/GET /v1/jobs, listing, cancel and retry, against SQLite and PostgreSQL with a real
Redis broker behind the publisher."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
import redis
from flask.testing import FlaskClient

from core.db import Database
from core.settings import Settings
from core.states import JobState
from core.tables import Job
from tests.support.api import (
    Keys,
    assert_problem,
    bearer,
    count_rows,
    echo,
    queue_depth,
    run_job,
    submit,
)


def test_submit_returns_202_location_and_the_job(
    client: FlaskClient, keys: Keys, broker: redis.Redis
) -> None:
    response = submit(client, keys.acme, echo(message="hi"))
    assert response.status_code == 202
    job = response.get_json()
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["kind"] == "generate"
    assert job["state"] == "queued"
    assert job["model"] == "echo:1"
    assert job["family"] == "echo"
    # Stored with the family's defaults filled in.
    assert job["params"] == {"message": "hi", "delay_s": 0.0, "progress_steps": 0, "fail": False}
    assert job["priority"] == 5
    assert job["queue_position"] == 0
    assert job["attempt"] == 0 and job["max_attempts"] == 3
    assert job["progress"] == {"step": 0, "total": 0, "message": ""}
    assert job["outputs"] == [] and job["error"] is None
    assert job["created_at"].endswith("Z") and job["started_at"] is None
    assert job["eta_s"] is None and job["result_model"] is None

    fetched = client.get(response.headers["Location"], headers=bearer(keys.acme))
    assert fetched.status_code == 200
    assert fetched.get_json() == job


def test_a_queued_job_leaves_one_message_on_its_queue(
    client: FlaskClient, keys: Keys, broker: redis.Redis, database: Database
) -> None:
    job = submit(client, keys.acme, echo()).get_json()
    assert queue_depth(broker, "generate") == 1
    # genq priority 5 is Celery priority 4, which Redis keeps in the list "generate:4".
    assert broker.llen("generate:4") == 1
    assert queue_depth(broker, "train") == 0
    with database.transaction() as session:
        assert session.get(Job, job["id"]).published_at is not None  # type: ignore[union-attr]

    submit(client, keys.acme, {**echo(), "priority": 9})
    assert broker.llen("generate") == 1  # the most urgent step has the bare queue name


def test_a_scheduled_job_is_not_published(
    client: FlaskClient, keys: Keys, broker: redis.Redis
) -> None:
    run_at = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    response = submit(client, keys.acme, {**echo(), "run_at": run_at})
    assert response.status_code == 202
    job = response.get_json()
    assert job["state"] == "scheduled"
    assert job["queue_position"] is None
    assert datetime.fromisoformat(job["run_at"]) == datetime.fromisoformat(run_at)
    assert queue_depth(broker, "generate") == 0


def test_queue_position_counts_higher_priority_and_older_jobs(
    client: FlaskClient, keys: Keys, settings: Settings
) -> None:
    first = submit(client, keys.acme, echo()).get_json()
    urgent = submit(client, keys.globex, {**echo(), "priority": 8}).get_json()
    low = submit(client, keys.acme, {**echo(), "priority": 0}).get_json()
    # Positions may lag the queue by the documented staleness (the first submit's queue
    # figures are reused for a while): past it they are exact.
    time.sleep(settings.status_staleness_s)
    get = lambda job_id, key: client.get(f"/v1/jobs/{job_id}", headers=bearer(key)).get_json()  # noqa: E731
    assert get(urgent["id"], keys.globex)["queue_position"] == 0
    assert get(first["id"], keys.acme)["queue_position"] == 1
    assert get(low["id"], keys.acme)["queue_position"] == 2


def test_idempotency_key_returns_the_same_job(
    client: FlaskClient, keys: Keys, database: Database, broker: redis.Redis
) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = submit(client, keys.acme, echo(message="a"), **headers)
    again = submit(client, keys.acme, echo(message="a"), **headers)
    assert first.status_code == 202
    assert again.status_code == 200
    assert again.headers["Idempotency-Replayed"] == "true"
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.headers["Location"] == first.headers["Location"]
    assert count_rows(database, Job) == 1
    assert queue_depth(broker, "generate") == 1

    # Another tenant's key space is its own.
    other = submit(client, keys.globex, echo(message="a"), **headers)
    assert other.status_code == 202
    assert count_rows(database, Job) == 2


def test_idempotency_key_with_another_body_is_a_conflict(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    submit(client, keys.acme, echo(message="a"), **{"Idempotency-Key": "k1"})
    response = submit(client, keys.acme, echo(message="b"), **{"Idempotency-Key": "k1"})
    assert assert_problem(response, 409)["type"] == "conflict"
    assert count_rows(database, Job) == 1


def test_idempotency_key_too_long_is_invalid(client: FlaskClient, keys: Keys) -> None:
    response = submit(client, keys.acme, echo(), **{"Idempotency-Key": "k" * 256})
    body = assert_problem(response, 422)
    assert body["errors"][0]["field"] == "Idempotency-Key"


def test_invalid_params_name_the_field(client: FlaskClient, keys: Keys, database: Database) -> None:
    response = submit(client, keys.acme, echo(delay_s=-1, progress_steps="3", nope=1))
    body = assert_problem(response, 422)
    assert body["type"] == "invalid-input"
    fields = {e["field"] for e in body["errors"]}
    # Strict: a string is not silently turned into a number.
    assert fields == {"params.delay_s", "params.progress_steps", "params.nope"}
    assert all(e["message"] for e in body["errors"])
    assert count_rows(database, Job) == 0


def test_top_level_fields_are_checked(client: FlaskClient, keys: Keys) -> None:
    body = assert_problem(submit(client, keys.acme, {**echo(), "colour": "red"}), 422)
    assert [e["field"] for e in body["errors"]] == ["colour"]

    body = assert_problem(submit(client, keys.acme, {**echo(), "priority": 10}), 422)
    assert [e["field"] for e in body["errors"]] == ["priority"]
    body = assert_problem(submit(client, keys.acme, {**echo(), "priority": "5"}), 422)
    assert [e["field"] for e in body["errors"]] == ["priority"]

    body = assert_problem(submit(client, keys.acme, {"kind": "paint", "model": "echo"}), 422)
    assert [e["field"] for e in body["errors"]] == ["kind"]

    body = assert_problem(submit(client, keys.acme, {"kind": "generate"}), 422)
    assert [e["field"] for e in body["errors"]] == ["model"]

    naive = {**echo(), "run_at": "2030-01-01T00:00:00"}
    body = assert_problem(submit(client, keys.acme, naive), 422)
    assert [e["field"] for e in body["errors"]] == ["run_at"]

    past = {**echo(), "deadline": "2000-01-01T00:00:00Z"}
    body = assert_problem(submit(client, keys.acme, past), 422)
    assert [e["field"] for e in body["errors"]] == ["deadline"]

    hook = {**echo(), "webhook": "ftp://example.com/x", "webhook_events": ["start", "nope"]}
    body = assert_problem(submit(client, keys.acme, hook), 422)
    assert {e["field"] for e in body["errors"]} == {"webhook", "webhook_events.1"}

    body = assert_problem(submit(client, keys.acme, ["not", "an", "object"]), 422)
    assert [e["field"] for e in body["errors"]] == ["body"]


def test_webhook_and_deadline_are_stored(client: FlaskClient, keys: Keys) -> None:
    deadline = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    body = {
        **echo(),
        "webhook": "https://example.com/hook",
        "webhook_events": ["completed", "start"],
        "deadline": deadline.isoformat(),
    }
    job = submit(client, keys.acme, body).get_json()
    assert job["webhook"] == "https://example.com/hook"
    assert job["webhook_events"] == ["completed", "start"]
    assert datetime.fromisoformat(job["deadline"]) == deadline


def test_unknown_model_is_404_naming_it(client: FlaskClient, keys: Keys) -> None:
    body = assert_problem(submit(client, keys.acme, {"kind": "generate", "model": "nosuch"}), 404)
    assert "nosuch" in body["detail"]
    body = assert_problem(submit(client, keys.acme, {"kind": "generate", "model": "echo:7"}), 404)
    assert "echo:7" in body["detail"]


def test_train_checks_family_dataset_and_name(client: FlaskClient, keys: Keys) -> None:
    train = {
        "kind": "train",
        "family": "ddpm",
        "dataset": "digits",
        "name": "my-digits",
        "params": {"preset": "tiny", "steps": 10},
    }
    response = submit(client, keys.acme, train)
    assert response.status_code == 202, response.get_json()
    job = response.get_json()
    assert (job["kind"], job["family"], job["dataset"], job["name"]) == (
        "train",
        "ddpm",
        "digits",
        "my-digits",
    )
    assert job["params"]["batch_size"] == 64
    assert job["model"] is None

    body = assert_problem(submit(client, keys.acme, {**train, "family": "nope"}), 422)
    assert [e["field"] for e in body["errors"]] == ["family"]
    body = assert_problem(submit(client, keys.acme, {**train, "family": "echo"}), 422)
    assert [e["field"] for e in body["errors"]] == ["family"]  # echo cannot train
    assert_problem(submit(client, keys.acme, {**train, "dataset": "nosuch"}), 404)
    body = assert_problem(submit(client, keys.acme, {**train, "name": "bad name!"}), 422)
    assert [e["field"] for e in body["errors"]] == ["name"]
    body = assert_problem(submit(client, keys.acme, {**train, "model": "echo"}), 422)
    assert [e["field"] for e in body["errors"]] == ["model"]
    missing = {"kind": "train", "family": "ddpm"}
    body = assert_problem(submit(client, keys.acme, missing), 422)
    assert {e["field"] for e in body["errors"]} == {"dataset", "name"}
    body = assert_problem(submit(client, keys.acme, {**train, "params": {"steps": 0}}), 422)
    assert [e["field"] for e in body["errors"]] == ["params.steps"]


def test_finetune_on_a_family_without_finetune_is_invalid(client: FlaskClient, keys: Keys) -> None:
    body = {"kind": "finetune", "model": "echo", "dataset": "digits", "name": "x"}
    problem = assert_problem(submit(client, keys.acme, body), 422)
    assert [e["field"] for e in problem["errors"]] == ["model"]


def test_another_tenants_job_is_404_and_admin_sees_it(client: FlaskClient, keys: Keys) -> None:
    job = submit(client, keys.acme, echo()).get_json()
    url = f"/v1/jobs/{job['id']}"
    assert_problem(client.get(url, headers=bearer(keys.globex)), 404)
    assert_problem(client.post(f"{url}/cancel", headers=bearer(keys.globex)), 404)
    assert_problem(client.get(f"{url}/logs", headers=bearer(keys.globex)), 404)
    assert_problem(client.get(f"{url}/events", headers=bearer(keys.globex)), 404)
    assert client.get(url, headers=bearer(keys.admin)).get_json()["id"] == job["id"]
    listed = client.get("/v1/jobs", headers=bearer(keys.globex)).get_json()
    assert listed["items"] == []
    listed = client.get("/v1/jobs", headers=bearer(keys.admin)).get_json()
    assert [j["id"] for j in listed["items"]] == [job["id"]]
    assert_problem(client.get("/v1/jobs/not-a-job", headers=bearer(keys.acme)), 404)


def test_list_pages_through_every_job_once(client: FlaskClient, keys: Keys) -> None:
    ids = [submit(client, keys.acme, echo(message=str(i))).get_json()["id"] for i in range(7)]
    submit(client, keys.globex, echo())
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        query = {"limit": "3", **({"cursor": cursor} if cursor else {})}
        response = client.get("/v1/jobs", query_string=query, headers=bearer(keys.acme))
        assert response.status_code == 200
        page = response.get_json()
        seen += [j["id"] for j in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == list(reversed(ids))  # newest first, no duplicates, no gaps


def test_list_filters(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    done = submit(client, keys.acme, echo()).get_json()["id"]
    queued = submit(client, keys.acme, echo()).get_json()["id"]
    canceled = submit(client, keys.acme, echo()).get_json()["id"]
    client.post(f"/v1/jobs/{canceled}/cancel", headers=bearer(keys.acme))
    train = {"kind": "train", "family": "ddpm", "dataset": "digits", "name": "m"}
    trained = submit(client, keys.acme, train).get_json()["id"]
    run_job(database, settings, done)

    def listed(**query: str) -> list[str]:
        response = client.get("/v1/jobs", query_string=query, headers=bearer(keys.acme))
        assert response.status_code == 200, response.get_json()
        return [j["id"] for j in response.get_json()["items"]]

    assert listed(state="queued") == [trained, queued]
    assert listed(state="succeeded,canceled") == [canceled, done]
    assert listed(kind="train") == [trained]
    assert listed(model="echo") == [canceled, queued, done]
    assert listed(model="nosuch") == []
    assert listed(state="queued", kind="generate") == [queued]

    for query, field in [
        ({"state": "queued,sleeping"}, "state"),
        ({"kind": "paint"}, "kind"),
        ({"limit": "0"}, "limit"),
        ({"limit": "21"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"cursor": "!!!"}, "cursor"),
        ({"state": ""}, "state"),
    ]:
        response = client.get("/v1/jobs", query_string=query, headers=bearer(keys.acme))
        assert [e["field"] for e in assert_problem(response, 422)["errors"]] == [field]


def test_cancel_queued_then_again_is_a_conflict(
    client: FlaskClient, keys: Keys, broker: redis.Redis
) -> None:
    job = submit(client, keys.acme, echo()).get_json()
    response = client.post(f"/v1/jobs/{job['id']}/cancel", headers=bearer(keys.acme))
    assert response.status_code == 202
    body = response.get_json()
    assert body["state"] == "canceled" and body["finished_at"] is not None
    again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=bearer(keys.acme))
    assert assert_problem(again, 409)["type"] == "illegal-transition"


def test_cancel_running_becomes_canceling(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    from core.leases import claim_job

    job = submit(client, keys.acme, echo()).get_json()
    with database.transaction() as session:
        assert claim_job(session, job["id"], lease_ttl_s=60) is not None
    response = client.post(f"/v1/jobs/{job['id']}/cancel", headers=bearer(keys.acme))
    assert response.status_code == 202
    assert response.get_json()["state"] == "canceling"
    again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=bearer(keys.acme))
    assert again.status_code == 202  # already canceling: nothing more to do


def test_retry_a_failed_job_publishes_it_again(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings, broker: redis.Redis
) -> None:
    job = submit(client, keys.acme, echo()).get_json()
    url = f"/v1/jobs/{job['id']}"
    assert_problem(client.post(f"{url}/retry", headers=bearer(keys.acme)), 409)  # still queued
    broker.flushdb()
    run_job(database, settings, job["id"], state=JobState.FAILED)
    failed = client.get(url, headers=bearer(keys.acme)).get_json()
    assert failed["state"] == "failed"
    assert failed["error"] == {"type": "model-error", "detail": "boom"}

    response = client.post(f"{url}/retry", headers=bearer(keys.acme))
    assert response.status_code == 202
    retried = response.get_json()
    assert retried["state"] == "queued" and retried["error"] is None
    assert retried["attempt"] == 1 and retried["max_attempts"] == 1 + settings.max_attempts
    assert queue_depth(broker, "generate") == 1


def test_retry_a_succeeded_job_is_a_conflict(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    job = submit(client, keys.acme, echo()).get_json()
    run_job(database, settings, job["id"])
    response = client.post(f"/v1/jobs/{job['id']}/retry", headers=bearer(keys.acme))
    assert assert_problem(response, 409)["type"] == "illegal-transition"


def test_a_finished_job_shows_outputs_metrics_and_timestamps(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    job = submit(client, keys.acme, echo()).get_json()
    run_job(database, settings, job["id"], outputs={"out.txt": b"hello"})
    body = client.get(f"/v1/jobs/{job['id']}", headers=bearer(keys.acme)).get_json()
    assert body["state"] == "succeeded"
    assert body["attempt"] == 1
    assert body["progress"] == {"step": 1, "total": 2, "message": "half way"}
    assert body["metrics"] == {"loss": 0.25}
    assert body["started_at"] and body["finished_at"]
    assert body["queue_position"] is None
    [output] = body["outputs"]
    assert output["name"] == "out.txt" and output["kind"] == "text"
    assert output["url"] == f"/v1/artifacts/{output['id']}"
    assert output["content_type"] == "text/plain" and output["bytes"] == 5


def test_logs_lists_log_events_in_order(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    job = submit(client, keys.acme, echo()).get_json()
    run_job(database, settings, job["id"], logs=("one", "two", "three"))
    response = client.get(f"/v1/jobs/{job['id']}/logs", headers=bearer(keys.acme))
    items = response.get_json()["items"]
    assert [i["message"] for i in items] == ["one", "two", "three"]
    assert all(i["type"] == "log" and i["level"] == "info" for i in items)
    assert [i["id"] for i in items] == sorted(i["id"] for i in items)


# The first job insert kills its own connection, as a database restart or failover would.
KILL_FIRST_INSERT = """
DROP SEQUENCE IF EXISTS fault_inserts;
CREATE SEQUENCE fault_inserts;
CREATE OR REPLACE FUNCTION kill_first_insert() RETURNS trigger AS $$
BEGIN
  IF nextval('fault_inserts') = 1 THEN
    PERFORM pg_terminate_backend(pg_backend_pid());
  END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER kill_first_insert BEFORE INSERT ON job
  FOR EACH ROW EXECUTE FUNCTION kill_first_insert();
"""


@pytest.mark.parametrize(
    "settings", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_a_lost_database_connection_is_503_and_the_retry_submits_once(
    client: FlaskClient, keys: Keys, database: Database, broker: redis.Redis
) -> None:
    with database.engine.begin() as conn:
        conn.exec_driver_sql(KILL_FIRST_INSERT)
    body = echo(message="through a failover")
    lost = submit(client, keys.acme, body, **{"Idempotency-Key": "failover-1"})
    problem = assert_problem(lost, 503)
    assert problem["type"].endswith("busy") and "Idempotency-Key" in problem["detail"]
    assert lost.headers["Retry-After"] == "1"
    assert count_rows(database, Job) == 0 and queue_depth(broker, "generate") == 0
    again = submit(client, keys.acme, body, **{"Idempotency-Key": "failover-1"})
    assert again.status_code == 202, again.get_json()
    assert count_rows(database, Job) == 1 and queue_depth(broker, "generate") == 1
