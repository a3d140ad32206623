"""End to end over HTTP against a real `genq up`: Celery worker, periodic scheduler, local Ray
and gunicorn, on SQLite with the embedded Redis and on PostgreSQL with the Redis server.

Train the tiny ddpm, generate digits from the registered model and download the PNGs; cancel a
running training job and see its trainer gone; the API's refusals; Ctrl-C stops everything.
The two tests of Ray's side (training, serving, a trainer stopped) run on the first stack only:
what they add is the same on either database (a training job's SQL, its model version and its
cancel run on PostgreSQL in tests/faults, tests/core and tests/api), and they are most of the
module's time.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from PIL import Image

from tests.support.stackproc import ROOT, StackProcess, running_stack
from tests.support.training import tiny_ddpm_params

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module", params=["sqlite+embedded-redis", "postgres+redis-server"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StackProcess]:
    base = tmp_path_factory.mktemp("stack")
    env: dict[str, str] = {"GENQ_RAY_NUM_CPUS": "2"}
    with contextlib.ExitStack() as held:
        if request.param.startswith("postgres"):
            # `genq up` migrates its database itself: an empty one, and a Redis database of
            # the module's own.
            databases = request.getfixturevalue("pg_databases")
            name = databases.create()
            held.callback(databases.drop, name)
            env["GENQ_DATABASE_URL"] = databases.url(name)
            redis_databases = request.getfixturevalue("redis_databases")
            env["GENQ_REDIS_URL"] = held.enter_context(redis_databases.lease())
        with running_stack(base / "var", env) as proc:
            yield proc
        assert "genq: stopped" in proc.log_text()


def _cli(stack: StackProcess, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "stack.cli", *args],
        env=stack.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


# The tests of Ray's side: on the SQLite stack only (see the module's docstring).
RAY_SIDE = pytest.mark.parametrize("stack", ["sqlite+embedded-redis"], indirect=True)

# Ten steps are enough for what is asserted (a registered version, a loss, images that differ
# per seed and repeat for the same one); the cancel test trains far longer.
TINY_TRAIN = tiny_ddpm_params(steps=10, batch_size=16, checkpoint_every=5)


@RAY_SIDE
def test_train_then_generate_digits(stack: StackProcess) -> None:
    job = stack.submit(
        {
            "kind": "train",
            "family": "ddpm",
            "dataset": "digits",
            "name": "digits-e2e",
            "params": TINY_TRAIN,
        }
    )
    done = stack.wait(job["id"])
    assert done["state"] == "succeeded", done
    assert done["result_model"] == "digits-e2e:1"
    assert done["attempt"] == 1
    assert "loss" in done["metrics"]
    # Where it ran: the local Ray node, its trainer (no GPU here).
    where = done["placement"]
    assert where["replica"] == f"trainer-{job['id']}" and where["gpu_ids"] == []
    assert where["node_id"] and where["node_ip"] and where["hostname"]

    versions = stack.call("GET", "/v1/models/digits-e2e").json()
    assert [v["version"] for v in versions["items"]] == [1]

    body = {
        "kind": "generate",
        "model": "digits-e2e",
        "params": {"label": 7, "num_images": 3, "steps": 10, "seed": 42},
    }
    first = stack.wait(stack.submit(body)["id"])
    second = stack.wait(stack.submit(body)["id"])
    assert first["state"] == second["state"] == "succeeded"
    assert len(first["outputs"]) == 3
    # The first job started the model's server and waited for it to load; the second did not.
    assert first["metrics"]["load_s"] > 0 and "load_s" not in second["metrics"]
    assert first["placement"]["replica"].startswith("model-")
    assert second["placement"] == first["placement"]
    digests = []
    for job in (first, second):
        for output in job["outputs"]:
            response = stack.call("GET", output["url"])
            assert response.status_code == 200
            assert response.headers["Content-Type"] == "image/png"
            image = Image.open(io.BytesIO(response.content))
            image.verify()
            assert image.size == (16, 16)
            digests.append(hashlib.sha256(response.content).hexdigest())
    assert digests[:3] == digests[3:], "the same seed must give the same images"
    assert len(set(digests[:3])) == 3, "the images of one job differ from each other"


@RAY_SIDE
def test_cancel_a_running_training_job_stops_its_trainer(stack: StackProcess) -> None:
    # Cancel is the same for every family: the cheap `charlm` trains here (its trainer starts
    # in ~3 CPU-s, a ddpm one in ~6: diffusers' import), on a short upload rather than the
    # built-in `pydocs` (parsing the stdlib's docstrings costs a fresh trainer ~3 CPU-s).
    text = ("The quick brown fox jumps over the lazy dog. " * 100).encode()
    files = {"file": ("fox.txt", text, "text/plain")}
    form = {"name": "cancel-text", "kind": "text"}
    assert stack.call("POST", "/v1/datasets", data=form, files=files).status_code == 201
    job = stack.submit(
        {
            "kind": "train",
            "family": "charlm",
            "dataset": "cancel-text",
            "name": "to-cancel",
            "params": {"preset": "tiny", "steps": 1_000_000, "batch_size": 4, "seed": 1},
        }
    )
    deadline = time.monotonic() + 120
    while True:
        state = stack.call("GET", f"/v1/jobs/{job['id']}").json()
        if state["state"] == "running" and state["progress"]["step"] > 0:
            break
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    # Routing: short generations run beside the long training job (their own queue, and a
    # worker slot holds one message at a time), not after it.
    shorts = [stack.submit(_echo(0.0))["id"] for _ in range(3)]
    for short in shorts:
        assert stack.wait(short, timeout_s=60)["state"] == "succeeded"
    assert stack.call("GET", f"/v1/jobs/{job['id']}").json()["state"] == "running"
    response = stack.call("POST", f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 202
    assert response.json()["state"] == "canceling"
    done = stack.wait(job["id"], timeout_s=60)
    assert done["state"] == "canceled"
    assert done["progress"]["step"] < 1_000_000
    # The trainer actor is gone (its name is released when it dies).
    probe = (
        "import ray, sys\n"
        "ray.init(address=sys.argv[1], namespace='genq', log_to_driver=False)\n"
        "try:\n    ray.get_actor(sys.argv[2])\nexcept ValueError:\n    print('gone')\n"
        "else:\n    print('alive')\n"
    )
    ray_address = _ray_address(stack)
    env = {
        **stack.env,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": (stack.var_dir / "ray_token").read_text().strip(),
        # The local head lives on loopback only (stack/services.py): a driver must say so too.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    deadline = time.monotonic() + 30
    while True:
        out = subprocess.run(
            [sys.executable, "-c", probe, ray_address, f"trainer-{job['id']}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.stdout.strip() == "gone" or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert out.stdout.strip() == "gone", out.stderr[-2000:]
    # Canceled is final: a later cancel is refused and nothing runs it again.
    assert stack.call("POST", f"/v1/jobs/{job['id']}/cancel").status_code == 409
    time.sleep(1)
    assert stack.call("GET", f"/v1/jobs/{job['id']}").json()["state"] == "canceled"


def _ray_address(stack: StackProcess) -> str:
    for line in stack.log_text().splitlines():
        if line.strip().startswith("Ray:"):
            return line.split("Ray:")[1].strip()
    raise AssertionError("no Ray address printed")


def test_refusals_over_http(stack: StackProcess) -> None:
    bad = stack.call(
        "POST", "/v1/jobs", json={"kind": "generate", "model": "echo", "params": {"delay_s": -1}}
    )
    assert bad.status_code == 422
    assert bad.headers["Content-Type"].startswith("application/problem+json")
    assert any(e["field"] == "params.delay_s" for e in bad.json()["errors"])

    missing = stack.call("POST", "/v1/jobs", json={"kind": "generate", "model": "nope"})
    assert missing.status_code == 404

    assert stack.call("GET", "/v1/jobs", key="").status_code == 401
    assert stack.call("GET", "/v1/jobs", key="gq_not-a-real-key-at-all-xx").status_code == 401

    bob = _cli(stack, "keys", "create", "--tenant", "bob")
    mine = stack.submit({"kind": "generate", "model": "echo", "params": {"message": "mine"}})
    assert stack.call("GET", f"/v1/jobs/{mine['id']}", key=bob).status_code == 404
    done = stack.wait(mine["id"])
    artifact = done["outputs"][0]["url"]
    assert stack.call("GET", artifact, key=bob).status_code == 404
    assert stack.call("GET", artifact).content == b"mine"

    prefix = bob[:11]
    _cli(stack, "keys", "revoke", prefix)
    # The CLI revokes in SQL; an API process may trust a key it checked for up to
    # GENQ_AUTH_CACHE_S (1 s, tests/api/test_polling.py holds it to that): wait for the refusal.
    deadline = time.monotonic() + 10
    while (status := stack.call("GET", "/v1/jobs", key=bob).status_code) != 401:
        assert status == 200 and time.monotonic() < deadline, status
        time.sleep(0.1)


def test_idempotency_key_over_http(stack: StackProcess) -> None:
    body = {"kind": "generate", "model": "echo", "params": {"message": "once"}}
    headers = {"Idempotency-Key": "order-1234"}
    first = stack.call("POST", "/v1/jobs", json=body, headers=dict(headers))
    again = stack.call("POST", "/v1/jobs", json=body, headers=dict(headers))
    assert first.status_code == 202 and again.status_code in (200, 202)
    assert first.json()["id"] == again.json()["id"]
    done = stack.wait(first.json()["id"])
    assert done["state"] == "succeeded" and done["attempt"] == 1


def test_cli_submit_waits_with_progress(stack: StackProcess) -> None:
    env_args = ["--url", stack.url, "--key", stack.admin_key]
    out = _cli(
        stack,
        "submit",
        "--model",
        "echo",
        "--params",
        '{"message": "cli", "progress_steps": 3, "delay_s": 0.3}',
        "--wait",
        *env_args,
    )
    assert '"state": "succeeded"' in out
    job_id = out.split('"id": "')[1].split('"')[0]
    assert '"state": "succeeded"' in _cli(stack, "status", job_id, *env_args)


def test_var_dir_holds_local_state(stack: StackProcess) -> None:
    var: Path = stack.var_dir
    assert (var / "artifacts" / "outputs").is_dir()
    assert (var / "logs" / "ray.log").exists()


def _at(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


def _echo(delay_s: float, **extra: object) -> dict[str, object]:
    return {"kind": "generate", "model": "echo", "params": {"delay_s": delay_s}, **extra}


def test_fair_share_priorities_and_the_running_cap_through_a_worker(stack: StackProcess) -> None:
    """Through the real worker (4 slots): a one-job tenant starts within one job per slot of a
    200-job backlog; an interactive job starts next; a tenant capped at 1 running job never
    runs 2, and all its held jobs still run (their tokens come back when a job ends)."""
    slots = int(stack.env["GENQ_WORKER_CONCURRENCY"])
    solo = _cli(stack, "keys", "create", "--tenant", "solo")
    backlog = [stack.submit(_echo(0.05))["id"] for _ in range(200)]
    alone = stack.submit(_echo(0.0), key=solo)
    done = stack.wait(alone["id"], key=solo)
    started = []
    for job_id in backlog:
        job = stack.call("GET", f"/v1/jobs/{job_id}").json()
        if job["started_at"] is not None:
            started.append(_at(job["started_at"]))
    window = (_at(alone["created_at"]), _at(done["started_at"]))
    ahead = [t for t in started if window[0] <= t <= window[1]]
    assert len(ahead) <= slots, (len(ahead), slots)
    urgent = stack.submit(_echo(0.0, priority="interactive"))
    urgent_done = stack.wait(urgent["id"])
    window = (_at(urgent["created_at"]), _at(urgent_done["started_at"]))
    after = [
        j
        for j in backlog
        if (s := stack.call("GET", f"/v1/jobs/{j}").json()["started_at"]) is not None
        and window[0] <= _at(s) < window[1]
    ]
    assert len(after) <= slots, len(after)

    capped = stack.call("PATCH", "/v1/tenants/solo", json={"max_running": 1})
    assert capped.status_code == 200, capped.text
    held = [stack.submit(_echo(0.3), key=solo)["id"] for _ in range(6)]
    peak = 0
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        # Sampled with the admin key, which no rate limit slows: solo's own key would pass its
        # 20 requests/s at this pace and be answered 429.
        usage = stack.call("GET", "/v1/tenants/solo").json()["usage"]
        peak = max(peak, usage["running"])
        if usage["running"] == 0 and usage["waiting"] == 0:
            break
        time.sleep(0.05)
    # A poll may be up to a second old (GENQ_STATUS_STALENESS_S), the tenant's usage is read
    # from SQL: a job the usage no longer counts can still poll as running for that long.
    states = {stack.wait(j, key=solo)["state"] for j in held}
    assert states == {"succeeded"}, states
    assert peak == 1
    for job_id in backlog:
        stack.wait(job_id, timeout_s=300)
