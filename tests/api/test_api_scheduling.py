"""The scheduling API against SQLite and PostgreSQL with a real Redis: priority classes,
tenant quotas (429 naming the limit), queue position and eta_s, purge, and /v1/schedules."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient
from sqlalchemy import select, update

from core.db import Database
from core.settings import Settings
from core.tables import AuditEntry, Job, JobEvent, utcnow
from tests.support.api import (
    Keys,
    assert_problem,
    bearer,
    echo,
    queue_depth,
    run_job,
    submit,
)


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"worker_concurrency": 2}


def test_priority_classes_on_submit_and_patch_without_republishing(
    client: FlaskClient, keys: Keys, broker: redis.Redis
) -> None:
    job = submit(client, keys.acme, {**echo(), "priority": "batch"}).get_json()
    assert (job["priority"], job["priority_class"]) == (2, "batch")
    assert queue_depth(broker, "generate") == 1
    path = f"/v1/jobs/{job['id']}"
    changed = client.patch(path, json={"priority": "interactive"}, headers=bearer(keys.acme))
    assert changed.status_code == 200
    assert (changed.get_json()["priority"], changed.get_json()["priority_class"]) == (
        8,
        "interactive",
    )
    assert queue_depth(broker, "generate") == 1  # a token, not a place in line: not resent
    body = assert_problem(submit(client, keys.acme, {**echo(), "priority": "urgent"}), 422)
    assert [e["field"] for e in body["errors"]] == ["priority"]
    body = assert_problem(
        client.patch(path, json={"priority": "soon"}, headers=bearer(keys.acme)), 422
    )
    assert body["errors"][0]["field"] == "priority"


def test_quotas_are_set_by_admins_and_refuse_with_429_naming_the_limit(
    client: FlaskClient, keys: Keys
) -> None:
    path = "/v1/tenants/acme"
    assert_problem(client.patch(path, json={"max_queued": 2}, headers=bearer(keys.acme)), 403)
    body = assert_problem(client.patch(path, json={"weight": 0}, headers=bearer(keys.admin)), 422)
    assert body["errors"][0]["field"] == "weight"
    body = assert_problem(
        client.patch(path, json={"over_quota": "drop"}, headers=bearer(keys.admin)), 422
    )
    assert body["errors"][0]["field"] == "over_quota"
    done = client.patch(path, json={"max_queued": 2, "weight": 3}, headers=bearer(keys.admin))
    assert done.status_code == 200
    assert done.get_json()["quotas"]["max_queued"] == 2 and done.get_json()["weight"] == 3
    for _ in range(2):
        assert submit(client, keys.acme, echo()).status_code == 202
    refused = assert_problem(submit(client, keys.acme, echo()), 429)
    assert refused["type"] == "quota-exceeded"
    assert (refused["limit"], refused["current"], refused["allowed"]) == ("max_queued", 2, 2)
    assert submit(client, keys.globex, echo()).status_code == 202  # another tenant is free
    own = client.get(path, headers=bearer(keys.acme)).get_json()
    assert own["usage"] == {"running": 0, "waiting": 2, "gpu_seconds": 0.0}
    assert client.get(path, headers=bearer(keys.globex)).status_code == 404
    listed = client.get("/v1/tenants", headers=bearer(keys.globex)).get_json()["items"]
    assert [t["name"] for t in listed] == ["globex"]
    lifted = client.patch(path, json={"max_queued": None}, headers=bearer(keys.admin))
    assert lifted.get_json()["quotas"]["max_queued"] is None
    assert submit(client, keys.acme, echo()).status_code == 202


def test_opting_out_of_preemption_needs_an_admin_and_usage_is_shown(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    opt_out = {**echo(), "preemptible": False}
    body = assert_problem(submit(client, keys.acme, opt_out), 422)
    assert body["errors"][0]["field"] == "preemptible"
    body = assert_problem(submit(client, keys.acme, {**echo(), "preemptible": "no"}), 422)
    assert body["errors"][0]["field"] == "preemptible"
    path = "/v1/tenants/acme"
    assert_problem(client.patch(path, json={"may_opt_out": True}, headers=bearer(keys.acme)), 403)
    body = assert_problem(
        client.patch(path, json={"may_opt_out": None}, headers=bearer(keys.admin)), 422
    )
    assert body["errors"][0]["field"] == "may_opt_out"
    done = client.patch(
        path, json={"may_opt_out": True, "preemptible": False}, headers=bearer(keys.admin)
    )
    assert done.get_json()["preemption"] == {"preemptible": False, "may_opt_out": True}
    job = submit(client, keys.acme, opt_out).get_json()
    assert job["preemptible"] is False
    assert job["preemption"] == {"count": 0, "by": None, "requested_at": None}
    # Usage-based fair share: acme's job ran for 4 s; globex has used nothing.
    run_job(database, settings, job["id"])
    with database.transaction() as session:
        now = utcnow()
        row = session.get(Job, job["id"])
        assert row is not None
        started = row.started_at
    assert started is not None
    listed = client.get("/v1/tenants", headers=bearer(keys.admin)).get_json()["items"]
    shares = {t["name"]: t["fair_share"] for t in listed}
    assert shares["acme"]["gpu_seconds"] > 0 and shares["acme"]["usage_share"] == 1.0
    assert shares["globex"]["gpu_seconds"] == 0.0 and shares["globex"]["ratio"] == 0.0
    assert (now - started).total_seconds() >= shares["acme"]["gpu_seconds"]


def test_purge_cancels_a_tenants_waiting_jobs_with_a_reason(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    acme = [submit(client, keys.acme, echo()).get_json()["id"] for _ in range(3)]
    globex = [submit(client, keys.globex, echo()).get_json()["id"] for _ in range(2)]
    purge = "/v1/admin/purge"
    assert_problem(client.post(purge, json={"tenant": "acme"}, headers=bearer(keys.acme)), 403)
    assert_problem(client.post(purge, json={}, headers=bearer(keys.admin)), 422)
    body = assert_problem(
        client.post(purge, json={"queue": "gpu"}, headers=bearer(keys.admin)), 422
    )
    assert body["errors"][0]["field"] == "queue"
    done = client.post(purge, json={"tenant": "acme"}, headers=bearer(keys.admin)).get_json()
    assert done["purged"] == 3 and sorted(done["job_ids"]) == sorted(acme)
    with database.transaction() as session:
        states = dict(session.execute(select(Job.id, Job.state)).all())
        assert {states[j] for j in acme} == {"canceled"}
        assert {states[j] for j in globex} == {"queued"}
        event = session.scalar(
            select(JobEvent).where(JobEvent.job_id == acme[0]).order_by(JobEvent.id.desc())
        )
        assert event is not None and event.data["to"] == "canceled"
        assert event.data["reason"].startswith("purged by admin")
        audit = session.scalar(select(AuditEntry).where(AuditEntry.action == "purge"))
        assert audit is not None and audit.detail["count"] == 3
    queue_purge = {"queue": "generate"}
    assert (
        client.post(purge, json=queue_purge, headers=bearer(keys.admin)).get_json()["purged"] == 2
    )


def test_queue_position_and_eta_follow_fair_share(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    first = submit(client, keys.acme, echo()).get_json()
    run_job(database, settings, first["id"])
    with database.transaction() as session:  # it ran for 4 s
        now = utcnow()
        session.execute(
            update(Job)
            .where(Job.id == first["id"])
            .values(started_at=now - timedelta(seconds=4), finished_at=now)
        )
    backlog = [submit(client, keys.acme, echo()).get_json() for _ in range(4)]
    late = submit(client, keys.globex, echo()).get_json()
    # Positions and ETAs may lag by the documented staleness (the submits reuse the queue
    # figures of the first): past it they are exact.
    time.sleep(settings.status_staleness_s)
    get = lambda j, k: client.get(f"/v1/jobs/{j['id']}", headers=bearer(k)).get_json()  # noqa: E731
    # globex arrives last but goes ahead of acme's backlog: under the usage-based fair share
    # (the default) acme has used GPU time and globex none.
    assert get(late, keys.globex)["queue_position"] == 0
    positions = [get(j, keys.acme)["queue_position"] for j in backlog]
    assert positions == [1, 2, 3, 4]
    # Two slots (worker_concurrency=2), 4 s per echo job: position 4 waits two waves.
    assert get(backlog[0], keys.acme)["eta_s"] == 4.0
    assert get(backlog[3], keys.acme)["eta_s"] == 4.0 * (1 + 1.5)
    assert get(first, keys.acme)["eta_s"] is None  # finished
    listed = client.get("/v1/jobs?state=queued", headers=bearer(keys.admin)).get_json()
    assert sorted(j["queue_position"] for j in listed["items"]) == [0, 1, 2, 3, 4]


def _schedule(**over: object) -> dict[str, object]:
    body: dict[str, object] = {
        "name": "nightly",
        "cron": "0 3 * * *",
        "timezone": "Europe/Paris",
        "job": echo(message="from a schedule"),
    }
    body.update(over)
    return body


def test_schedules_crud_pause_resume_and_tenant_scope(client: FlaskClient, keys: Keys) -> None:
    post = lambda body, key=keys.acme: client.post("/v1/schedules", json=body, headers=bearer(key))  # noqa: E731
    for bad, field in (
        (_schedule(cron="61 * * * *"), "cron"),
        (_schedule(cron="* * *"), "cron"),
        (_schedule(cron="0 0 31 2 *"), "cron"),  # valid syntax, but 31 February never comes
        (_schedule(timezone="Mars/Olympus"), "timezone"),
        (_schedule(job={**echo(), "run_at": "2030-01-01T00:00:00Z"}), "job.run_at"),
        (_schedule(job={"kind": "generate", "model": "echo", "params": {"x": 1}}), "job.params.x"),
        (_schedule(job={"kind": "generate"}), "job.model"),
        (_schedule(extra=1), "extra"),
    ):
        body = assert_problem(post(bad), 422)
        assert [e["field"] for e in body["errors"]] == [field], (bad, body)
    created = post(_schedule())
    assert created.status_code == 201
    schedule = created.get_json()
    assert created.headers["Location"] == f"/v1/schedules/{schedule['id']}"
    assert schedule["next_run_at"].endswith(("01:00:00Z", "02:00:00Z"))  # 03:00 in Paris
    assert schedule["job"] == echo(message="from a schedule") and schedule["fired_count"] == 0
    assert post(_schedule()).status_code == 409  # the name is taken
    assert post(_schedule(), keys.globex).status_code == 201  # but not in another tenant
    path = f"/v1/schedules/{schedule['id']}"
    assert client.get(path, headers=bearer(keys.globex)).status_code == 404
    listed = client.get("/v1/schedules", headers=bearer(keys.acme)).get_json()["items"]
    assert [s["id"] for s in listed] == [schedule["id"]]
    paused = client.post(f"{path}/pause", headers=bearer(keys.acme)).get_json()
    assert paused["paused"] is True and paused["next_run_at"] is None
    resumed = client.post(f"{path}/resume", headers=bearer(keys.acme)).get_json()
    assert resumed["paused"] is False and resumed["next_run_at"] is not None
    changed = client.patch(
        path, json={"cron": "30 12 * * *", "timezone": "UTC"}, headers=bearer(keys.acme)
    ).get_json()
    assert changed["next_run_at"].endswith("12:30:00Z")
    body = assert_problem(client.patch(path, json={"cron": "nope"}, headers=bearer(keys.acme)), 422)
    assert body["errors"][0]["field"] == "cron"
    assert client.delete(path, headers=bearer(keys.globex)).status_code == 404
    assert client.delete(path, headers=bearer(keys.acme)).status_code == 204
    assert client.get(path, headers=bearer(keys.acme)).status_code == 404


def test_dashboard_quotas_purge_and_schedules(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    from tests.support.dashboard import audit, login

    token = login(client, keys.admin)
    page = client.get("/admin/tenants").get_data(as_text=True)
    assert 'data-quotas="acme"' in page and "Purge waiting jobs" in page
    quotas = f"/admin/tenants/{keys.acme_tenant}/quotas"
    for weight in ("0", "²", "9" * 5000):  # out of range; not int(); past what int() reads
        bad = client.post(quotas, data={"csrf_token": token, "weight": weight})
        assert bad.status_code == 422 and "weight" in bad.get_data(as_text=True)
    form = {"csrf_token": token, "weight": "2", "max_running": "1", "max_queued": "",
            "gpu_seconds_budget": "", "budget_period_s": "3600", "over_quota": "hold"}  # fmt: skip
    assert client.post(quotas, data=form).status_code == 302
    tenant = client.get("/v1/tenants/acme", headers=bearer(keys.acme)).get_json()
    assert tenant["weight"] == 2
    assert tenant["quotas"] == {"max_running": 1, "max_queued": None, "gpu_seconds_budget": None,
                                "budget_period_s": 3600, "over_quota": "hold"}  # fmt: skip
    [entry] = audit(database, "tenant.quotas")
    assert entry.detail["via"] == "dashboard" and entry.detail["to"]["max_running"] == 1
    assert 'data-fair-share="acme"' in page and "GPU-s used" in page
    bad = client.post(quotas, data={"csrf_token": token, "may_opt_out": "maybe"})
    assert bad.status_code == 422 and "may_opt_out" in bad.get_data(as_text=True)
    form = {"csrf_token": token, "preemptible": "no", "may_opt_out": "yes"}
    assert client.post(quotas, data=form).status_code == 302
    tenant = client.get("/v1/tenants/acme", headers=bearer(keys.acme)).get_json()
    assert tenant["preemption"] == {"preemptible": False, "may_opt_out": True}

    jobs = [submit(client, keys.acme, echo()).get_json()["id"] for _ in range(2)]
    other = submit(client, keys.globex, echo()).get_json()["id"]
    purge = {"csrf_token": token, "tenant_id": keys.acme_tenant}
    assert client.post("/admin/purge", data=purge).status_code == 302
    with database.transaction() as session:
        states = dict(session.execute(select(Job.id, Job.state)).all())
    assert [states[j] for j in jobs] == ["canceled", "canceled"] and states[other] == "queued"
    assert client.post("/admin/purge", data={"csrf_token": token, "queue": "x"}).status_code == 422
    assert client.post("/admin/purge", data={"csrf_token": token}).status_code == 422
    [entry] = audit(database, "purge")
    assert entry.detail["count"] == 2

    made = client.post("/v1/schedules", json=_schedule(), headers=bearer(keys.acme)).get_json()
    listing = client.get("/admin/schedules").get_data(as_text=True)
    assert f'data-schedule="{made["id"]}"' in listing and "nightly" in listing
    no_csrf = client.post(f"/admin/schedules/{made['id']}/pause")
    assert no_csrf.status_code in (400, 403)
    pause = client.post(f"/admin/schedules/{made['id']}/pause", data={"csrf_token": token})
    assert pause.status_code == 302
    got = client.get(f"/v1/schedules/{made['id']}", headers=bearer(keys.acme)).get_json()
    assert got["paused"] is True
    assert "Resume" in client.get("/admin/schedules").get_data(as_text=True)
    client.post(f"/admin/schedules/{made['id']}/resume", data={"csrf_token": token})
    got = client.get(f"/v1/schedules/{made['id']}", headers=bearer(keys.acme)).get_json()
    assert got["paused"] is False and got["next_run_at"] is not None
    assert [e.detail["via"] for e in audit(database, "schedule.pause")] == ["dashboard"]
