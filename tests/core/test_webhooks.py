"""Webhooks: Standard Webhooks signatures, the internal-address check at submit and at send,
the outbox rows written with job events, and real sends to a real HTTP server on 127.0.0.1
that answers slowly, fails, or redirects, with the delivery log telling each story.

Runs on SQLite and PostgreSQL with a real Redis (a database of each test's own).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from api.app import create_app
from core.catalog import ensure_builtins, resolve_model
from core.db import Database
from core.events import Output, Progress
from core.jobs import create_job
from core.keys import create_key, get_or_create_tenant
from core.leases import claim_job, finish_job
from core.recording import record_events, record_output
from core.settings import Settings
from core.states import JobState
from core.tables import Base, WebhookDelivery
from core.webhooks import UnsafeTargetError, check_target, is_internal, sign, tenant_secret
from scheduler.enqueue import Publisher
from scheduler.webhooks import deliver, dispatch
from tests.support.jobs import echo_job
from tests.support.webhooks import Receiver, verify


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), rec.handler())
    server.daemon_threads = True
    rec.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield rec
    server.shutdown()
    server.server_close()


def make_settings(database_url: str, tmp_path: Path, redis_url: str, **kw: Any) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        var_dir=tmp_path / "var",
        database_url=database_url,
        redis_url=redis_url,
        artifact_root=tmp_path / "artifacts",
        secret_key="test-secret-key",
        webhook_timeout_s=1.0,
        webhook_max_attempts=3,
        webhook_backoff_base_s=0.0,
        **kw,
    )


@pytest.fixture
def settings(database_url: str, tmp_path: Path, redis_db_url: str) -> Settings:
    return make_settings(database_url, tmp_path, redis_db_url, webhook_allow_private=True)


@pytest.fixture
def database(settings: Settings) -> Iterator[Database]:
    db = Database(settings)
    Base.metadata.create_all(db.engine)
    with db.transaction() as session:
        ensure_builtins(session)
    yield db
    db.dispose()


@pytest.fixture
def broker(redis_db_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_db_url)
    yield client
    client.close()


def new_job(database: Database, url: str, events: list[str] | None = None) -> tuple[str, str]:
    with database.transaction() as session:
        tenant = get_or_create_tenant(session, "acme")
        model = resolve_model(session, tenant.id, "echo")
        job, _ = create_job(
            session, echo_job(tenant.id, model.id, webhook=url, webhook_events=events)
        )
        return job.id, tenant.id


def run_through(database: Database, job_id: str) -> None:
    """Start, progress, one output and success, through the core services."""
    with database.transaction() as session:
        lease = claim_job(session, job_id, lease_ttl_s=60)
        assert lease is not None
    with database.transaction() as session:
        record_events(session, lease, [Progress(1, 2, "half")])
    with database.transaction() as session:
        from core.artifacts import StoredFile

        stored = StoredFile(path=f"x/{job_id}/out.txt", size_bytes=2, sha256="0" * 64)
        record_output(session, lease, Output("out.txt", "text", "text/plain", b"hi"), stored)
    with database.transaction() as session:
        finish_job(session, lease, JobState.SUCCEEDED)


def rows(database: Database, job_id: str) -> list[WebhookDelivery]:
    with database.transaction() as session:
        found = session.query(WebhookDelivery).filter_by(job_id=job_id)
        return sorted(found, key=lambda r: (r.created_at, r.id))


def test_signature_matches_the_standard_webhooks_reference_vector() -> None:
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    got = sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert got == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert tenant_secret("k", "a") != tenant_secret("k", "b")
    assert tenant_secret("k", "a").startswith("whsec_")


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "192.168.0.1", "172.16.5.4", "169.254.169.254", "::1", "fe80::1",
     "fd00:ec2::254", "0.0.0.0", "::ffff:127.0.0.1", "100.64.0.1",
     # 6to4 and NAT64 addresses that carry a private IPv4 address (issue 15), and Teredo.
     "2002:7f00:1::1", "2002:a00:1::", "2002:c0a8:101::1", "64:ff9b::10.0.0.1",
     "64:ff9b::127.0.0.1", "64:ff9b::a9fe:a9fe", "64:ff9b:1::5db8:d822",
     "2001:0:4136:e378:8000:63bf:f5ff:fffe"],
)  # fmt: skip
def test_internal_addresses_are_recognised(address: str) -> None:
    assert is_internal(address)


def test_public_addresses_pass_and_internal_targets_are_refused() -> None:
    assert not is_internal("93.184.216.34") and not is_internal("2606:4700::1111")
    # The same public IPv4 address behind 6to4 and NAT64 passes too.
    assert not is_internal("2002:5db8:d822::1") and not is_internal("64:ff9b::93.184.216.34")
    for url in ("http://127.0.0.1:9/x", "http://localhost/x", "http://[::1]/", "ftp://x.org/"):
        with pytest.raises(UnsafeTargetError):
            check_target(url, allow_private=False)
    assert check_target("http://localhost:9/x", allow_private=True)


def test_events_become_outbox_rows_filtered_by_webhook_events(database: Database) -> None:
    all_id, _ = new_job(database, "http://127.0.0.1:9/all")
    some_id, _ = new_job(database, "http://127.0.0.1:9/some", ["start", "completed"])
    run_through(database, all_id)
    run_through(database, some_id)
    assert [r.event for r in rows(database, all_id)] == ["start", "progress", "output", "completed"]
    some = rows(database, some_id)
    assert [r.event for r in some] == ["start", "completed"]
    assert some[1].payload["type"] == "job.completed"
    assert some[1].payload["data"]["to"] == "succeeded"
    assert all(r.state == "pending" and r.attempts == 0 for r in some)


def test_delivered_signed_once_and_logged(
    database: Database, settings: Settings, receiver: Receiver, broker: redis.Redis
) -> None:
    job_id, tenant_id = new_job(database, receiver.url + "/hook?x=1", ["completed"])
    run_through(database, job_id)
    (row,) = rows(database, job_id)
    assert deliver(settings, database, row.id) == "delivered"
    assert deliver(settings, database, row.id) == "skipped"  # a second task for it sends nothing
    (request,) = receiver.requests
    assert request["path"] == "/hook?x=1"
    headers = {k.lower(): v for k, v in request["headers"].items()}
    assert headers["webhook-id"] == row.id
    secret = tenant_secret(settings.read_secret_key(), tenant_id)
    assert verify(secret, headers, request["body"])
    assert not verify(tenant_secret("other", tenant_id), headers, request["body"])
    assert json.loads(request["body"])["data"]["job_id"] == job_id
    (done,) = rows(database, job_id)
    assert done.state == "delivered" and done.attempts == 1 and done.log[0]["status"] == 204


def test_failing_receiver_is_retried_with_the_same_id_then_given_up(
    database: Database, settings: Settings, receiver: Receiver
) -> None:
    receiver.status = 500
    job_id, _ = new_job(database, receiver.url, ["completed"])
    run_through(database, job_id)
    (row,) = rows(database, job_id)
    states = [deliver(settings, database, row.id) for _ in range(4)]
    assert states == ["pending", "pending", "failed", "skipped"]
    assert len(receiver.requests) == 3  # webhook_max_attempts
    assert {r["headers"]["webhook-id"] for r in receiver.requests} == {row.id}
    (failed,) = rows(database, job_id)
    assert [e["status"] for e in failed.log] == [500, 500, 500]
    assert failed.log[0]["error"] == "the receiver answered 500"


def test_redirect_is_not_followed_and_slow_receiver_times_out(
    database: Database, settings: Settings, receiver: Receiver
) -> None:
    receiver.status, receiver.location = 302, receiver.url + "/elsewhere"
    job_id, _ = new_job(database, receiver.url + "/first", ["completed"])
    run_through(database, job_id)
    (row,) = rows(database, job_id)
    assert deliver(settings, database, row.id) == "pending"
    assert [r["path"] for r in receiver.requests] == ["/first"]  # /elsewhere never asked
    receiver.status, receiver.location, receiver.hold = 204, "", threading.Event()
    try:
        assert deliver(settings, database, row.id) == "pending"
        # It gave up (its 1 s timeout) while the receiver had answered only the redirect.
        assert receiver.answered == 1
    finally:
        receiver.hold.set()
    (logged,) = rows(database, job_id)
    assert logged.log[0]["error"] == "redirect (302) not followed"
    assert logged.log[1]["error"].startswith("timed out") and logged.log[1]["status"] is None


def test_internal_target_is_refused_at_send_time(
    database: Database, database_url: str, tmp_path: Path, redis_db_url: str, receiver: Receiver
) -> None:
    # Accepted while private targets were allowed; the operator has since turned that off, and
    # `localhost` resolves to 127.0.0.1 when the message is sent.
    port = receiver.url.rsplit(":", 1)[1]
    job_id, _ = new_job(database, f"http://localhost:{port}/hook", ["completed"])
    run_through(database, job_id)
    (row,) = rows(database, job_id)
    strict = make_settings(database_url, tmp_path, redis_db_url, webhook_allow_private=False)
    assert deliver(strict, database, row.id) == "failed"  # refused targets are not retried
    assert receiver.requests == []
    (refused,) = rows(database, job_id)
    assert refused.log[0]["error"].startswith("refused: host 'localhost' resolves to an internal")


def test_dispatch_queues_due_messages_once(
    database: Database, settings: Settings, broker: redis.Redis
) -> None:
    job_id, _ = new_job(database, "http://127.0.0.1:9/", ["start", "completed"])
    run_through(database, job_id)
    publisher = Publisher(settings)
    try:
        assert dispatch(settings, database, publisher.celery) == 2
        assert dispatch(settings, database, publisher.celery) == 0  # claimed, in flight
    finally:
        publisher.close()
    assert broker.llen("webhooks") == 2


def test_api_refuses_internal_webhook_and_shows_the_delivery_log(
    database_url: str, tmp_path: Path, redis_db_url: str, database: Database, broker: redis.Redis
) -> None:
    strict = make_settings(database_url, tmp_path, redis_db_url, webhook_allow_private=False)
    app = create_app(strict, database=database, publisher=Publisher(strict))
    client = app.test_client()
    with database.transaction() as session:
        tenant = get_or_create_tenant(session, "acme")
        _, key = create_key(session, tenant)
    auth = {"Authorization": f"Bearer {key}"}
    for url in ("http://127.0.0.1:8080/x", "http://169.254.169.254/latest", "http://localhost/"):
        body = {"kind": "generate", "model": "echo", "webhook": url}
        response = client.post("/v1/jobs", json=body, headers=auth)
        assert response.status_code == 422, response.get_data(as_text=True)
        assert response.get_json()["errors"][0]["field"] == "webhook"
    with database.transaction() as session:
        assert session.query(WebhookDelivery).count() == 0
    job_id, _ = new_job(database, "http://127.0.0.1:9/", ["completed"])
    run_through(database, job_id)
    log = client.get(f"/v1/jobs/{job_id}/deliveries", headers=auth).get_json()["items"]
    assert [(d["event"], d["state"], d["attempts"]) for d in log] == [("completed", "pending", 0)]
    secret = client.get("/v1/webhook-secret", headers=auth).get_json()
    assert secret["secret"] == tenant_secret("test-secret-key", tenant.id)


def test_unresolvable_host_is_accepted_at_submit_and_retried_at_send(
    database_url: str, tmp_path: Path, redis_db_url: str, database: Database, broker: redis.Redis
) -> None:
    strict = make_settings(database_url, tmp_path, redis_db_url, webhook_allow_private=False)
    app = create_app(strict, database=database, publisher=Publisher(strict))
    with database.transaction() as session:
        _, key = create_key(session, get_or_create_tenant(session, "acme"))
    url = "https://no-such-host.invalid/hook"  # .invalid never resolves (RFC 2606)
    body = {"kind": "generate", "model": "echo", "webhook": url, "webhook_events": ["start"]}
    response = app.test_client().post(
        "/v1/jobs", json=body, headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 202, response.get_data(as_text=True)
    job_id = response.get_json()["id"]
    run_through(database, job_id)
    (row,) = rows(database, job_id)
    assert deliver(strict, database, row.id) == "pending"  # DNS may come back: retried
    (logged,) = rows(database, job_id)
    assert "does not resolve" in logged.log[0]["error"] and logged.attempts == 1
