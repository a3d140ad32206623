"""A model's replica policy over the API: admins set it on every version or on one, it is
validated field by field (problem+json naming the field), audited, shown on the model, and the
scaler's decision (core/scaling.py) follows it: up at once, down only after the cool-down."""

from __future__ import annotations

from flask.testing import FlaskClient
from sqlalchemy import select

from core.db import Database
from core.scaling import Decision, decide, resolve_policy, wanted
from core.tables import AuditEntry
from tests.support.api import (
    Keys,
    assert_problem,
    bearer,
)


def test_admins_set_a_models_policy_validated_and_audited(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    shown = client.get("/v1/models/echo", headers=bearer(keys.acme)).get_json()["items"][0]
    # The echo family's defaults, the settings' idle delays.
    assert shown["scaling"] == {
        "min_replicas": 0,
        "max_replicas": 4,
        "target_jobs_per_replica": 2.0,
        "idle_unload_s": 900.0,
        "last_idle_unload_s": 300.0,
        "overrides": {},
    }
    path = "/v1/models/echo"
    assert_problem(client.patch(path, json={"max_replicas": 2}, headers=bearer(keys.acme)), 403)
    cases = [
        ({"max_replicas": 0}, "max_replicas"),
        ({"max_replicas": 65}, "max_replicas"),
        ({"min_replicas": -1}, "min_replicas"),
        ({"target_jobs_per_replica": 0}, "target_jobs_per_replica"),
        ({"idle_unload_s": 0.5}, "idle_unload_s"),
        ({"replicas": 2}, "replicas"),
        ({"min_replicas": 5, "max_replicas": 3}, "min_replicas"),
        ({}, "body"),
    ]
    for body, field in cases:
        problem = assert_problem(client.patch(path, json=body, headers=bearer(keys.admin)), 422)
        assert [e["field"] for e in problem["errors"]] == [field], (body, problem)
    assert_problem(
        client.patch("/v1/models/nope", json={"max_replicas": 2}, headers=bearer(keys.admin)), 404
    )
    assert_problem(
        client.patch(f"{path}/9", json={"max_replicas": 2}, headers=bearer(keys.admin)), 404
    )

    done = client.patch(
        path,
        json={"min_replicas": 1, "max_replicas": 3, "idle_unload_s": 60},
        headers=bearer(keys.admin),
    )
    assert done.status_code == 200, done.get_json()
    scaling = done.get_json()["items"][0]["scaling"]
    assert (scaling["min_replicas"], scaling["max_replicas"]) == (1, 3)
    # The last replica's delay is never longer than the others'.
    assert scaling["idle_unload_s"] == 60 and scaling["last_idle_unload_s"] == 60
    assert scaling["overrides"] == {"min_replicas": 1, "max_replicas": 3, "idle_unload_s": 60.0}
    one = client.patch(f"{path}/1", json={"min_replicas": None}, headers=bearer(keys.admin))
    assert one.get_json()["items"][0]["scaling"]["min_replicas"] == 0  # back to the default
    with database.transaction() as session:
        actions = list(
            session.scalars(select(AuditEntry).where(AuditEntry.action == "model.scaling"))
        )
    assert [a.detail["to"] for a in actions] == [
        {"min_replicas": 1, "max_replicas": 3, "idle_unload_s": 60.0},
        {"max_replicas": 3, "idle_unload_s": 60.0},
    ]


def test_the_scaler_goes_up_at_once_and_down_after_the_cooldown() -> None:
    policy = resolve_policy(
        {"min_replicas": 0, "max_replicas": 4, "target_jobs_per_replica": 2.0},
        None,
        idle_unload_s=900,
        last_idle_unload_s=300,
    )
    assert [wanted(n, policy) for n in (0, 1, 2, 3, 8, 200)] == [0, 1, 1, 2, 4, 4]
    decision = Decision()
    assert decide(decision, 1, policy, now=0, cooldown_s=60) == 1  # 0 -> 1 at the first job
    assert decide(decision, 200, policy, now=5, cooldown_s=60) == 4  # a burst: up at once
    assert decide(decision, 2, policy, now=10, cooldown_s=60) == 4  # a dip changes nothing
    assert decide(decision, 200, policy, now=30, cooldown_s=60) == 4
    assert decide(decision, 2, policy, now=40, cooldown_s=60) == 4
    assert decide(decision, 2, policy, now=99, cooldown_s=60) == 4  # 59 s of lower need
    assert decide(decision, 2, policy, now=100, cooldown_s=60) == 1  # a whole cool-down
    floor = resolve_policy(
        {"min_replicas": 2, "max_replicas": 1, "target_jobs_per_replica": 1.0},
        None,
        idle_unload_s=None,
        last_idle_unload_s=None,
    )
    assert wanted(0, floor) == wanted(9, floor) == 2


def test_once_a_replica_reports_the_scaler_sizes_by_the_jobs_in_its_hands() -> None:
    """Queued jobs wait for a worker, not a replica: a burst that one replica clears keeps one,
    a burst that fills the replicas' hands grows them; a cold start counts the queue."""
    policy = resolve_policy(
        {"min_replicas": 0, "max_replicas": 4, "target_jobs_per_replica": 2.0},
        None,
        idle_unload_s=900,
        last_idle_unload_s=300,
    )
    assert wanted(400, policy) == 4  # no replica has reported: the queue is all we know
    assert wanted(400, policy, in_hand=0.06) == 1  # instant jobs: one replica clears them
    assert wanted(400, policy, in_hand=0.0) == 1  # jobs wait: never fewer than one
    assert wanted(400, policy, in_hand=5.5) == 3  # slow jobs fill its hands: grow
    assert wanted(400, policy, in_hand=8.0) == 4
    assert wanted(3, policy, in_hand=8.0) == 2  # never more than the jobs there are
    assert wanted(0, policy, in_hand=0.4) == 0  # a last report after the queue emptied
    decision = Decision()
    assert decide(decision, 400, policy, now=0, cooldown_s=60, in_hand=0.06) == 1
    assert decide(decision, 400, policy, now=5, cooldown_s=60, in_hand=7.9) == 4  # up at once
    assert decide(decision, 400, policy, now=10, cooldown_s=60, in_hand=0.1) == 4  # a dip
    assert decide(decision, 400, policy, now=70, cooldown_s=60, in_hand=0.1) == 1
