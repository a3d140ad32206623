"""The whole machine dies mid-training (every genq process, Ray, the embedded Redis: SIGKILL,
nothing shut down cleanly) and `genq up` starts again on the same folder: the job resumes from
its last checkpoint, finishes once, and registers one model."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from core.db import Database
from core.settings import Settings
from core.tables import Artifact, JobEvent, Model
from tests.support.faults import FAST
from tests.support.stackproc import StackProcess, descendants, is_alive
from tests.support.training import tiny_gan_job, tiny_gan_params

pytestmark = [pytest.mark.faults, pytest.mark.stack]

CHECKPOINT_EVERY = 5
TRAIN = tiny_gan_job("machine", tiny_gan_params(80, checkpoint_every=CHECKPOINT_EVERY, seed=3))


def _power_off(stack: StackProcess) -> set[int]:
    """SIGKILL the stack and everything below it, as a power cut would; returns the PIDs."""
    assert stack.process is not None
    victims = descendants(stack.process.pid) | {stack.process.pid}
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    stack.process.wait(30)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(is_alive(p) for p in victims):
        time.sleep(0.2)
    return victims


def test_machine_restart_resumes_training_and_finishes_once(tmp_path: Path) -> None:
    env = {
        k: v for k, v in FAST.items()
        if not k.startswith("GENQ_WEBHOOK") and k != "GENQ_WORKER_CONCURRENCY"
    }  # fmt: skip
    env.update({"GENQ_ADMIN_KEY": "gq_machine-restart-test-key-0123456789",
                "GENQ_RAY_NUM_CPUS": "2"})  # fmt: skip
    var = tmp_path / "var"
    first = StackProcess(var, env)
    try:
        first.start()
        job_id = first.submit(TRAIN)["id"]
        deadline = time.monotonic() + 180
        while first.call("GET", f"/v1/jobs/{job_id}").json()["progress"]["step"] < 20:
            assert time.monotonic() < deadline, "training made no progress"
            time.sleep(0.2)
        victims = _power_off(first)
        assert len(victims) >= 6  # genq up, redis, ray (several), worker, scheduler, api
        alive = {p for p in victims if is_alive(p)}
        assert not alive, f"survived SIGKILL: {alive}"
    finally:
        first.kill()

    database = Database(Settings(_env_file=None, var_dir=var))  # type: ignore[call-arg]
    with database.transaction() as session:
        steps = session.scalars(
            select(JobEvent.data).where(JobEvent.job_id == job_id, JobEvent.type == "progress")
        ).all()
        killed_at = max(d["step"] for d in steps)
    assert killed_at < 80

    second = StackProcess(var, env)
    try:
        second.start()
        done = second.wait(job_id, timeout_s=240)
        assert done["state"] == "succeeded", done
        assert done["attempt"] == 2
        assert done["result_model"] == "machine:1"
        with database.transaction() as session:
            events = session.scalars(
                select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
            ).all()
            attempt, resumed = 0, None
            for event in events:
                if event.type == "state" and event.data.get("to") == "running":
                    attempt = event.data["attempt"]
                elif event.type == "progress" and attempt == 2 and resumed is None:
                    resumed = event.data["step"]
            assert resumed is not None
            # Resumed from the last checkpoint: never more than one interval back.
            assert killed_at - CHECKPOINT_EVERY <= resumed <= killed_at + CHECKPOINT_EVERY
            assert session.query(Model).filter(Model.job_id == job_id).count() == 1
            names = session.scalars(select(Artifact.name).where(Artifact.job_id == job_id)).all()
            assert sorted(names) == sorted(set(names))
        code, left = second.stop()
        assert code == 0 and not left
    finally:
        second.kill()
        database.dispose()
