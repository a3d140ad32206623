"""A job page's live endpoint through Flask's test client, on SQLite and PostgreSQL with a real
Redis: a poll brings only what came after the page's cursor (across a reaped and reclaimed
attempt), read from index ranges only, pages through a burst of events, and redraws the loss
chart only when metric points came.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from flask.testing import FlaskClient

from api.dashboard import queries
from core.artifacts import ArtifactStore
from core.db import Database
from core.events import Log, Metric, Output, Progress
from core.leases import Lease, claim_job
from core.recording import record_events, record_output
from core.recovery import reap_expired
from core.settings import Settings
from core.states import JobState
from core.tables import Job, utcnow
from tests.support.api import Keys, echo, run_job, submit
from tests.support.dashboard import login


def page_cursor(page: str) -> int:
    found = re.search(r'data-live-job="[^"]+" data-state-now="[^"]+" data-after="(\d+)"', page)
    assert found, "no live cursor in the job page"
    return int(found.group(1))


def reap_and_reclaim(database: Database, job_id: str) -> Lease:
    """The worker of the running attempt stops answering: its lease expires, the reaper requeues
    the job and another worker claims it (all through the core services)."""
    with database.transaction() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.lease_expires_at = utcnow() - timedelta(seconds=1)  # the fault
        reaped = reap_expired(session)
        assert [(r.job_id, r.state) for r in reaped] == [(job_id, JobState.QUEUED)]
        lease = claim_job(session, job_id, lease_ttl_s=60)
        assert lease is not None
        return lease


def test_live_job_sends_what_changed_after_the_pages_cursor(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    job_id = submit(client, keys.acme, echo()).get_json()["id"]
    login(client, keys.admin)
    page = client.get(f"/admin/jobs/{job_id}").get_data(as_text=True)
    cursor = page_cursor(page)
    assert cursor > 0  # the "queued" event the page shows

    def poll(after: int) -> dict[str, Any]:
        response = client.get(f"/admin/live/jobs/{job_id}?after={after}")
        assert response.status_code == 200, response.get_data(as_text=True)
        return dict(response.get_json())

    quiet = poll(cursor)
    assert quiet["state"] == "queued" and quiet["attempt"] == 0 and quiet["max_attempts"] == 3
    assert (quiet["timeline"], quiet["logs"], quiet["outputs"]) == ([], [], [])
    assert quiet["cursor"] == cursor and quiet["more"] is False

    with database.transaction() as session:
        lease = claim_job(session, job_id, lease_ttl_s=60)
        assert lease is not None
    with database.transaction() as session:
        record_events(session, lease, [Log("first <b>line</b>"), Progress(1, 4, "warming up")])
    first = poll(cursor)
    assert first["state"] == "running" and first["attempt"] == 1
    assert first["step"] == 1 and first["total"] == 4 and first["message"] == "warming up"
    assert [(e["from"], e["to"], e["attempt"]) for e in first["timeline"]] == [
        ("queued", "running", 1)
    ]
    assert [line["message"] for line in first["logs"]] == ["first <b>line</b>"]
    assert first["cursor"] > cursor

    # A reaped attempt and its retry: only what came after the first poll's cursor.
    lease = reap_and_reclaim(database, job_id)
    with database.transaction() as session:
        record_events(session, lease, [Log("second attempt")])
    second = poll(first["cursor"])
    assert second["state"] == "running" and second["attempt"] == 2
    assert [(e["from"], e["to"], e["reason"], e["attempt"]) for e in second["timeline"]] == [
        ("running", "queued", "lease expired", None),
        ("queued", "running", "", 2),
    ]
    assert [line["message"] for line in second["logs"]] == ["second attempt"]
    assert second["outputs"] == []
    # From the page's own cursor the same poll brings everything since the page.
    everything = poll(cursor)
    assert len(everything["timeline"]) == 3 and len(everything["logs"]) == 2

    store = ArtifactStore(settings.artifacts)
    stored = store.write_output(keys.acme_tenant, job_id, "notes.txt", b"live <i>text</i>")
    with database.transaction() as session:
        record_output(
            session, lease, Output("notes.txt", "text", "text/plain", b"live <i>text</i>"), stored
        )
    third = poll(second["cursor"])
    [output] = third["outputs"]
    assert output["name"] == "notes.txt" and output["preview"] == "live <i>text</i>"
    assert client.get(output["url"]).data == b"live <i>text</i>"
    assert third["timeline"] == [] and third["logs"] == []
    assert poll(third["cursor"])["outputs"] == []  # nothing twice

    # A reload shows all of it, with a cursor past it.
    page = client.get(f"/admin/jobs/{job_id}").get_data(as_text=True)
    assert page_cursor(page) == third["cursor"]
    assert "lease expired" in page and "second attempt" in page and "first &lt;b&gt;" in page
    assert re.search(r"data-attempt>2<", page)

    for after in ("-1", "²", str(2**63)):  # not digits; not int(); past any SQL integer
        bad = client.get(f"/admin/live/jobs/{job_id}", query_string={"after": after})
        assert bad.status_code == 422 and bad.get_json()["errors"][0]["field"] == "after"
    missing = client.get("/admin/live/jobs/00000000-0000-0000-0000-000000000000?after=0")
    assert missing.status_code == 404 and missing.mimetype == "application/problem+json"


def test_live_job_redraws_the_loss_chart_only_when_metric_points_came(
    client: FlaskClient, keys: Keys, database: Database
) -> None:
    job_id = submit(client, keys.acme, echo()).get_json()["id"]
    with database.transaction() as session:
        lease = claim_job(session, job_id, lease_ttl_s=60)
        assert lease is not None
    login(client, keys.admin)
    page = client.get(f"/admin/jobs/{job_id}").get_data(as_text=True)
    assert "<div data-loss-box hidden>" in page and "<svg" not in page  # no point yet

    def poll(after: int) -> dict[str, Any]:
        response = client.get(f"/admin/live/jobs/{job_id}?after={after}")
        assert response.status_code == 200, response.get_data(as_text=True)
        return dict(response.get_json())

    quiet = poll(page_cursor(page))
    assert quiet["loss_chart"] is None and quiet["metrics"] is None

    with database.transaction() as session:
        record_events(session, lease, [Metric(1, {"loss": 0.9}), Log("step 1")])
    first = poll(page_cursor(page))
    assert first["loss_chart"].startswith("<svg") and first["loss_chart"].count("<circle") == 1
    assert first["metrics"] == [{"name": "loss", "step": 1, "value": 0.9}]

    # A second point, and a metric whose name is markup: drawn as text, never as an element.
    with database.transaction() as session:
        record_events(
            session, lease, [Metric(2, {"loss": 0.5, "<script>val_loss": 0.7, "lr": 0.01})]
        )
    second = poll(first["cursor"])
    chart = second["loss_chart"]
    # The whole series from the first point on, though only one event came since the cursor.
    assert chart.count("<polyline") == 2 and chart.count("<circle") == 3
    assert "&lt;script&gt;val_loss" in chart and "<script" not in chart
    assert ">lr<" not in chart  # the learning rate is a metric, not a loss
    assert second["metrics"] == [
        {"name": "<script>val_loss", "step": 2, "value": 0.7},
        {"name": "loss", "step": 2, "value": 0.5},
        {"name": "lr", "step": 2, "value": 0.01},
    ]

    # Events that are not metrics bring no chart: the page keeps the one it has.
    with database.transaction() as session:
        record_events(session, lease, [Log("no metric here"), Progress(3, 4)])
    third = poll(second["cursor"])
    assert [line["message"] for line in third["logs"]] == ["no metric here"]
    assert third["loss_chart"] is None and third["metrics"] is None

    # A reload draws the same chart and the same latest values.
    page = client.get(f"/admin/jobs/{job_id}").get_data(as_text=True)
    assert "<div data-loss-box>" in page and chart in page
    assert '<tr data-metric="lr"><th>lr</th><td>0.01 ' in page
    assert "<script>val_loss" not in page


def test_live_job_pages_through_a_burst_of_events(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    job_id = submit(client, keys.acme, echo()).get_json()["id"]
    with database.transaction() as session:
        lease = claim_job(session, job_id, lease_ttl_s=60)
        assert lease is not None
        start = queries.last_event_id(session, job_id)
    with database.transaction() as session:
        events: list[Any] = []
        for i in range(5):
            events += [Log(f"line {i}"), Progress(i, 5), Metric(i, {"loss": 1.0 / (i + 1)})]
        record_events(session, lease, events)
    seen, cursor = [], start
    with database.read() as session:
        for _ in range(10):
            batch = queries.job_updates(session, job_id, after=cursor, limit=2)
            assert batch is not None and len(batch.events) <= 2
            seen += [e.data["message"] for e in batch.events if e.type == "log"]
            assert batch.cursor >= cursor
            cursor = batch.cursor
            if not batch.has_more:
                break
        # The cursor ends past the progress events, which the page never asks for, too.
        assert cursor == queries.last_event_id(session, job_id)
    assert seen == [f"line {i}" for i in range(5)]


# SQLite's query plan only: PostgreSQL's planner may rightly scan a table this small.
@pytest.mark.parametrize("settings", ["sqlite"], indirect=True)
def test_live_job_reads_only_index_ranges(
    client: FlaskClient, keys: Keys, database: Database, settings: Settings
) -> None:
    job_id = submit(client, keys.acme, echo()).get_json()["id"]
    run_job(database, settings, job_id, outputs={"output.txt": b"hi"})
    login(client, keys.admin)
    statements: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        statements.append((statement, params))

    sa.event.listen(database.engine, "before_cursor_execute", capture)
    try:
        body = client.get(f"/admin/live/jobs/{job_id}?after=0").get_json()
    finally:
        sa.event.remove(database.engine, "before_cursor_execute", capture)
    assert body["outputs"] and body["logs"] and body["timeline"]
    polled = [(s, p) for s, p in statements if s.lstrip().upper().startswith("SELECT")]
    # The row, the newest event id, the events, and the metric series (a metric event came).
    assert body["loss_chart"] and body["metrics"]
    assert sum("job_event" in s for s, _ in polled) == 3 and any("artifact" in s for s, _ in polled)
    with database.engine.connect() as conn:
        for statement, params in polled:
            plan = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params).all()
            details = [str(row[-1]) for row in plan]
            assert not any(d.startswith("SCAN") for d in details), (statement, details)
