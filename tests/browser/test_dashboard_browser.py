"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright) against
a real `genq up`: log in (a wrong key is refused), watch a job's progress bar move without a
reload, watch a job's timeline, attempt, logs and outputs follow a reaped and retried attempt
without a reload, watch a training job's loss chart and latest metrics grow without a reload,
cancel a running job and see it become canceled, delete a finished job once the
confirmation is accepted, open an image output full size, create a key and revoke it, read a
preempted training's preemption record. Screenshots go to test-output/dashboard/ (and the
test's tmp dir) for a person to look at.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from core.artifacts import ArtifactStore
from core.db import Database
from core.events import Log, Metric, Output, Progress
from core.leases import claim_job, finish_job
from core.preemption import preempt_for_waiting, requeue_preempted
from core.recording import record_events, record_output, record_placement, record_waiting
from core.recovery import promote_due, reap_expired
from core.settings import Settings
from core.states import JobState
from core.tables import Job, utcnow
from tests.support.browser import shot, state_badge, wait_js
from tests.support.stackproc import StackProcess
from tests.support.training import tiny_ddpm_params, tiny_gan_job, tiny_gan_params

pytestmark = pytest.mark.stack

TINY_TRAIN = tiny_ddpm_params(steps=40, batch_size=16, checkpoint_every=20)
ECHO = {"kind": "generate", "model": "echo", "params": {}}


def an_hour_from_now() -> str:
    """A run_at that holds a job off, so that no worker of the stack takes it."""
    return (datetime.now(UTC) + timedelta(hours=1)).isoformat()


@contextlib.contextmanager
def stack_database(stack: StackProcess) -> Iterator[Database]:
    """The stack's own database, for a test that plays a worker through the core services."""
    database = Database(Settings(_env_file=None, var_dir=stack.var_dir))  # type: ignore[call-arg]
    try:
        yield database
    finally:
        database.dispose()


def test_login_refuses_a_wrong_key_and_shows_the_cluster(
    browser: Any, stack: StackProcess, tmp_path: Path
) -> None:
    context = browser.new_context()
    tab = context.new_page()
    tab.shots_dir = tmp_path
    tab.goto(stack.url + "/admin/jobs")
    assert "/admin/login" in tab.url  # not logged in: sent to the login page
    tab.fill("#key", "gq_" + "x" * 40)
    tab.click("button[type=submit]")
    assert "unknown, expired or revoked key" in tab.inner_text("#login-error")
    shot(tab, "login-refused")
    tab.fill("#key", stack.admin_key)
    tab.click("button[type=submit]")
    tab.wait_for_url(stack.url + "/admin/jobs")  # back where it was going
    cookies = context.cookies()
    [session] = [c for c in cookies if c["name"] == "genq_admin"]
    assert session["httpOnly"] and session["sameSite"] == "Strict" and session["path"] == "/admin"
    # The worker's snapshot (written every second here) names it and Ray's node.
    deadline = time.monotonic() + 30
    while True:
        tab.goto(stack.url + "/admin/")
        text = tab.inner_text("main")
        if "celery@" in text and "no Ray view yet" not in text:
            break
        assert time.monotonic() < deadline, text
        time.sleep(1)
    assert "no GPUs" in text  # this machine has none, and the page says so
    shot(tab, "overview")
    context.close()


def test_a_running_jobs_progress_bar_moves_without_a_reload(page: Any, stack: StackProcess) -> None:
    job = stack.submit(
        {"kind": "generate", "model": "echo", "params": {"delay_s": 8, "progress_steps": 40}}
    )
    page.goto(f"{stack.url}/admin/jobs/{job['id']}")
    page.evaluate("window.__sameDocument = true")
    bar = "h1 ~ section [data-progress]"
    wait_js(page, f"Number(document.querySelector('{bar}').getAttribute('aria-valuenow')) >= 1")
    first = int(page.get_attribute(bar, "aria-valuenow"))
    wait_js(
        page, f"Number(document.querySelector('{bar}').getAttribute('aria-valuenow')) > {first}"
    )
    second = int(page.get_attribute(bar, "aria-valuenow"))
    width = page.eval_on_selector(f"{bar} .bar", "el => parseFloat(el.style.width)")
    assert second > first and width > 0
    assert page.evaluate("window.__sameDocument") is True  # moved by the script, no reload
    assert state_badge(page) == "running"
    shot(page, "job-progress")
    # When it ends the page reloads itself with the output.
    wait_js(page, "document.querySelector('h1 [data-state]')?.textContent == 'succeeded'")
    page.wait_for_selector("[data-output='output.txt']")
    page.goto(f"{stack.url}/admin/jobs?model=echo")
    assert job["id"] in page.content()
    shot(page, "jobs")


def test_a_jobs_timeline_attempt_logs_and_outputs_update_in_place(
    page: Any, stack: StackProcess
) -> None:
    # A job held off by run_at, so that no worker of the stack takes it: this test plays the
    # worker through the core services, on the stack's own database and artifact store.
    job_id = stack.submit({**ECHO, "run_at": an_hour_from_now()})["id"]
    with stack_database(stack) as database:
        page.goto(f"{stack.url}/admin/jobs/{job_id}")
        assert state_badge(page) == "scheduled"
        page.evaluate("window.__sameDocument = true")
        with database.transaction() as session:
            job = session.get(Job, job_id)
            assert job is not None
            job.run_at = utcnow()  # due now: promoted and claimed in one transaction
            assert promote_due(session) == [job_id]
            lease = claim_job(session, job_id, lease_ttl_s=120)
            assert lease is not None and lease.attempt == 1
            tenant_id = job.tenant_id
        with database.transaction() as session:
            record_events(session, lease, [Log("hello from attempt 1")])
        wait_js(
            page,
            "document.querySelector('[data-timeline]').textContent.includes('attempt 1')"
            " && document.querySelector('[data-logs]').textContent.includes('attempt 1')",
        )
        assert state_badge(page) == "running" and page.inner_text("[data-attempt]") == "1"
        assert "run_at reached" in page.inner_text("[data-timeline]")

        # The worker stops answering: the lease expires, the job is reaped and claimed again.
        with database.transaction() as session:
            job = session.get(Job, job_id)
            assert job is not None
            job.lease_expires_at = utcnow() - timedelta(seconds=1)
            assert [r.job_id for r in reap_expired(session)] == [job_id]
            lease = claim_job(session, job_id, lease_ttl_s=120)
            assert lease is not None and lease.attempt == 2
        text = b"<b>not bold</b> from attempt 2"
        stored = ArtifactStore(database.settings.artifacts).write_output(
            tenant_id, job_id, "notes.txt", text
        )
        with database.transaction() as session:
            record_events(session, lease, [Log("<i>hello</i> from attempt 2")])
            record_output(session, lease, Output("notes.txt", "text", "text/plain", text), stored)
        page.wait_for_selector("[data-output='notes.txt']")
        wait_js(page, "document.querySelector('[data-attempt]').textContent === '2'")
        timeline = page.inner_text("[data-timeline]")
        assert "lease expired" in timeline and "attempt 2" in timeline
        # created, then: – → scheduled → queued → running → queued → running, each once
        assert page.locator("[data-timeline] li").count() == 6
        assert "<i>hello</i> from attempt 2" in page.inner_text("[data-logs]")
        assert "<b>not bold</b>" in page.inner_text("[data-output='notes.txt'] pre")
        assert page.locator(".gallery b, [data-logs] i").count() == 0  # text, never markup
        assert page.locator("[data-no-outputs]").count() == 0
        assert page.evaluate("window.__sameDocument") is True  # all without a reload
        shot(page, "job-live-retry")

        # The ended job's page reloads once (for its final actions and metrics), and stops polling.
        with page.expect_event("load"), database.transaction() as session:
            finish_job(session, lease, JobState.SUCCEEDED)
        wait_js(page, "document.querySelector('h1 [data-state]')?.textContent == 'succeeded'")
        assert page.evaluate("window.__sameDocument") is None
        assert page.locator("[data-output='notes.txt']").count() == 1


def test_a_training_jobs_loss_chart_and_metrics_grow_in_place(
    page: Any, stack: StackProcess
) -> None:
    # As above: a job no worker of the stack takes, whose metric points this test records.
    job_id = stack.submit({**ECHO, "run_at": an_hour_from_now()})["id"]
    with stack_database(stack) as database:
        with database.transaction() as session:
            job = session.get(Job, job_id)
            assert job is not None
            job.run_at = utcnow()
            assert promote_due(session) == [job_id]
            lease = claim_job(session, job_id, lease_ttl_s=120)
            assert lease is not None
        page.goto(f"{stack.url}/admin/jobs/{job_id}")
        assert state_badge(page) == "running"
        assert page.locator("[data-loss-chart] svg").count() == 0
        assert page.is_hidden("[data-loss-box]") and page.is_hidden("[data-latest-box]")
        page.evaluate("window.__sameDocument = true")

        points = "document.querySelectorAll('[data-loss-chart] svg circle').length"
        with database.transaction() as session:
            record_events(session, lease, [Metric(1, {"loss": 2.0})])
        wait_js(page, f"{points} === 1")
        assert page.is_visible("[data-loss-box]") and page.is_visible("[data-latest-box]")
        assert page.inner_text("[data-metric='loss']").split() == ["loss", "2", "step", "1"]

        with database.transaction() as session:
            record_events(
                session,
                lease,
                [Metric(2, {"loss": 1.25}), Metric(3, {"loss": 0.5, "<b>lr</b>": 0.001})],
            )
        wait_js(page, f"{points} === 3")
        # An SVG element, so the page's chart styles reach it, and one polyline of 3 points.
        assert (
            page.eval_on_selector("[data-loss-chart] svg", "el => el.namespaceURI")
            == "http://www.w3.org/2000/svg"
        )
        polyline = page.get_attribute("[data-loss-chart] polyline", "points")
        assert polyline is not None and len(polyline.split()) == 3
        assert page.inner_text("[data-metric='loss']").split() == ["loss", "0.5", "step", "3"]
        assert "<b>lr</b>" in page.inner_text("[data-latest-metrics]")  # text, never markup
        assert page.locator("[data-latest-metrics] b").count() == 0
        assert page.evaluate("window.__sameDocument") is True  # all without a reload
        shot(page, "job-live-loss")

        with page.expect_event("load"), database.transaction() as session:
            finish_job(session, lease, JobState.SUCCEEDED)
        wait_js(page, f"{points} === 3")  # the reloaded page draws the same chart


def test_a_preempted_trainings_page_shows_when_for_which_job_and_where_it_resumed(
    page: Any, stack: StackProcess
) -> None:
    # A batch training and an interactive job that no worker of the stack takes (run_at); this
    # test plays their workers through the core services: the training holds the GPU, the
    # interactive job is claimed and waits for it, a preemption round asks the training to
    # stop, it goes back to the queue at its checkpoint and resumes from it.
    run_at = an_hour_from_now()
    train = {"kind": "train", "family": "ddpm", "dataset": "digits", "name": "digits-preempted"}
    victim_id = stack.submit(
        {**train, "params": TINY_TRAIN, "priority": "batch", "run_at": run_at}
    )["id"]
    waiter_id = stack.submit({**ECHO, "priority": 9, "run_at": run_at})["id"]
    with stack_database(stack) as database:
        with database.transaction() as session:
            leases = {}
            for job_id in (victim_id, waiter_id):
                job = session.get(Job, job_id)
                assert job is not None
                job.run_at, job.num_gpus = utcnow(), 1.0  # both want the whole GPU
            assert sorted(promote_due(session)) == sorted([victim_id, waiter_id])
            for job_id in (victim_id, waiter_id):
                lease = claim_job(session, job_id, lease_ttl_s=300)
                assert lease is not None
                leases[job_id] = lease
        with database.transaction() as session:
            record_placement(session, leases[victim_id], {"node_id": "n1", "gpu_ids": ["0"]})
            record_events(session, leases[victim_id], [Progress(20, 40, "training")])
            record_waiting(session, leases[waiter_id], "GPU")
        page.goto(f"{stack.url}/admin/jobs/{victim_id}")
        assert page.inner_text("[data-preemption]").strip() == "never preempted"

        # (Were the stack's own periodic scheduler to make the round first, the training
        # would be asked to stop for the same job.)
        with database.transaction() as session:
            later = utcnow() + timedelta(seconds=120)  # it has waited 2 minutes
            preempt_for_waiting(
                session, preempt_after_s=60, grace_s=30, max_preemptions=3, now=later
            )
        with database.read() as session:
            row = session.get(Job, victim_id)
            assert row is not None and row.preempted_by == waiter_id
        page.goto(f"{stack.url}/admin/jobs/{victim_id}")
        assert waiter_id[:13] in page.inner_text("[data-preempt-requested]")

        # It stopped at its checkpoint (step 20): back to the queue, then it resumes.
        with database.transaction() as session:
            requeue_preempted(session, leases[victim_id], hold_s=3600)
        with database.transaction() as session:
            again = claim_job(session, victim_id, lease_ttl_s=300)
            assert again is not None and again.attempt == 1
            record_events(session, again, [Log("resumed from step 20"), Progress(21, 40, "")])
        page.goto(f"{stack.url}/admin/jobs/{victim_id}")
        record = page.inner_text("[data-preemption]")
        assert "preempted 1 time" in record and page.locator("[data-preempted]").count() == 1
        assert page.get_attribute("[data-preempted-by]", "data-preempted-by") == waiter_id
        assert page.inner_text("[data-stopped-step]") == "20"
        assert page.inner_text("[data-resumed-step]") == "step 20"
        assert page.locator("[data-preempt-requested]").count() == 0
        assert "preempted" in page.inner_text("[data-timeline]")
        shot(page, "job-preempted")
        page.click("[data-preempted-by]")  # the job it made room for
        page.wait_for_url(f"{stack.url}/admin/jobs/{waiter_id}")
        with database.transaction() as session:
            finish_job(session, again, JobState.SUCCEEDED)
            finish_job(session, leases[waiter_id], JobState.SUCCEEDED)


def test_cancel_a_running_job(page: Any, stack: StackProcess) -> None:
    job = stack.submit(
        {"kind": "generate", "model": "echo", "params": {"delay_s": 120, "progress_steps": 120}}
    )
    stack.wait(job["id"], {"running"}, timeout_s=60)
    page.goto(f"{stack.url}/admin/jobs/{job['id']}")
    assert state_badge(page) == "running"
    page.click("#cancel")
    wait_js(
        page, "document.querySelector('h1 [data-state]')?.textContent == 'canceled'", timeout=30_000
    )
    assert stack.wait(job["id"], timeout_s=10)["state"] == "canceled"
    assert "job.cancel" in page.inner_text("main")  # the audit row, with who did it
    assert stack.admin_key[:11] in page.inner_text("main")
    shot(page, "job-canceled")


def test_delete_a_finished_job_after_confirming(page: Any, stack: StackProcess) -> None:
    job = stack.submit({"kind": "generate", "model": "echo", "params": {"message": "bye"}})
    assert stack.wait(job["id"], timeout_s=60)["state"] == "succeeded"
    page.goto(f"{stack.url}/admin/jobs/{job['id']}")
    # The confirmation comes from dashboard.js (no inline script: the CSP forbids it).
    page.once("dialog", lambda dialog: dialog.dismiss())
    page.click("#delete-job")
    assert stack.call("GET", f"/v1/jobs/{job['id']}", stack.admin_key).status_code == 200
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#delete-job")
    page.wait_for_url(f"{stack.url}/admin/jobs")
    assert stack.call("GET", f"/v1/jobs/{job['id']}", stack.admin_key).status_code == 404
    page.goto(f"{stack.url}/admin/tenants")
    assert "job.delete" in page.inner_text("main")  # the audit row
    shot(page, "job-deleted")


def test_train_with_live_logs_then_open_an_image_output_full_size(
    page: Any, stack: StackProcess
) -> None:
    # gan, whose trainer and server start without diffusers: the page is what this tests.
    job = stack.submit(tiny_gan_job("digits-ui", tiny_gan_params(400, checkpoint_every=20)))
    page.goto(f"{stack.url}/admin/jobs/{job['id']}")
    page.evaluate("window.__sameDocument = true")
    # Log lines arrive in the open page while the job runs (checkpoints every 20 steps).
    wait_js(
        page,
        "document.querySelector('[data-logs]').textContent.includes('checkpoint at step')"
        " && window.__sameDocument === true",
        timeout=120_000,
    )
    assert page.inner_text("h1 [data-state]") == "running"
    trained = stack.wait(job["id"])
    assert trained["state"] == "succeeded", trained
    wait_js(page, "document.querySelector('h1 [data-state]')?.textContent == 'succeeded'")
    assert "saved the model" in page.inner_text("[data-logs]")
    assert page.locator("figure.wide svg polyline").count() >= 1  # the loss curve
    shot(page, "train-job")
    page.goto(f"{stack.url}/admin/models")
    assert "digits-ui" in page.inner_text("main")
    shot(page, "models")
    generated = stack.wait(
        stack.submit(
            {
                "kind": "generate",
                "model": "digits-ui",
                "params": {"label": 3, "num_images": 3, "seed": 7},
            }
        )["id"]
    )
    assert generated["state"] == "succeeded", generated
    page.goto(f"{stack.url}/admin/jobs/{generated['id']}")
    thumbs = page.locator(".gallery a.thumb")
    assert thumbs.count() == 3
    wait_js(
        page,
        "[...document.querySelectorAll('.gallery img')]"
        ".every(i => i.complete && i.naturalWidth > 0)",
    )
    shot(page, "gallery")
    with page.context.expect_page() as opened:
        thumbs.first.click()
    full = opened.value
    full.wait_for_load_state()
    assert "/admin/artifacts/" in full.url
    size = full.evaluate("[document.images[0].naturalWidth, document.images[0].naturalHeight]")
    assert size == [16, 16]
    response = page.request.get(full.url)
    assert response.status == 200 and response.headers["content-type"] == "image/png"


def test_create_a_key_then_revoke_it(page: Any, stack: StackProcess) -> None:
    page.goto(f"{stack.url}/admin/tenants")
    page.fill("#create-key input[name=tenant]", "browser-tenant")
    page.fill("#create-key input[name=label]", "made in the browser")
    page.click("#create-key button[type=submit]")
    key = page.inner_text("#new-key").strip()
    assert key.startswith("gq_")
    shot(page, "key-created")
    assert stack.call("GET", "/v1/jobs", key).status_code == 200
    page.goto(f"{stack.url}/admin/tenants")
    assert key not in page.content()  # shown once, never again
    row = page.locator(f"tr[data-key='{key[:11]}']")
    page.once("dialog", lambda dialog: dialog.accept())
    row.locator("button").click()
    page.wait_for_load_state()
    assert "revoked" in page.locator(f"tr[data-key='{key[:11]}']").inner_text()
    assert stack.call("GET", "/v1/jobs", key).status_code == 401
    shot(page, "key-revoked")


def test_overview_after_the_jobs_shows_warm_models_and_charts(
    page: Any, stack: StackProcess
) -> None:
    deadline = time.monotonic() + 30
    while True:
        page.goto(stack.url + "/admin/")
        warm = page.inner_text("h2:has-text('Warm models') + table")
        if "digits-ui:1" in warm and "echo" in warm:
            break
        assert time.monotonic() < deadline, warm
        time.sleep(1)
    assert "cpu" in warm  # where each model is loaded, as its server reports it
    heights = page.eval_on_selector_all(
        "svg.chart rect.bar", "bars => bars.map(b => parseFloat(b.getAttribute('height')))"
    )
    assert len(heights) == 60 and sum(h > 0 for h in heights) >= 1
    assert int(page.inner_text("[data-count='succeeded']")) >= 3
    shot(page, "overview-after-jobs")


def test_the_health_page_shows_readiness_queues_and_workers(page: Any, stack: StackProcess) -> None:
    page.click("nav >> text=Health")
    page.wait_for_url(stack.url + "/admin/health")
    # The worker's heartbeat comes within seconds of its start; the page is drawn by the
    # server, so it is loaded again until it shows it.
    deadline = time.monotonic() + 60
    while page.get_attribute("#readiness", "data-ready") != "yes":
        assert time.monotonic() < deadline, page.inner_text("main")
        page.wait_for_timeout(500)
        page.reload()
    statuses = {
        row.get_attribute("data-part"): row.get_attribute("data-status")
        for row in page.query_selector_all("#health-parts tr[data-part]")
    }
    assert statuses == dict.fromkeys(("database", "broker", "workers", "ray", "scheduler"), "ok")
    queues = {
        row.get_attribute("data-queue"): row.get_attribute("data-status")
        for row in page.query_selector_all("#health-queues tr[data-queue]")
    }
    assert queues == dict.fromkeys(("generate", "train", "webhooks"), "ok")
    workers = page.inner_text("#health-workers tbody")
    assert "celery@" in workers and "generate, train, webhooks" in workers
    assert "no periodic scheduler" not in page.inner_text("#health-schedulers")
    shot(page, "health")
