"""genq with its artifacts in object storage (GENQ_ARTIFACT_URL=s3://...), end to end: a real
moto_server process, a Ray head whose node has only the AWS_* settings and its own cache folder
(GENQ_CACHE_DIR), `genq worker` subprocesses and the API in this process (the fault harness of
tests/support/faults.py). Nothing is read from the artifact root on disk: each test checks
that what it made is in the bucket and not there.

Marked `faults` and `stack` like the other harness tests; part of `make test`.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import signal
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from PIL import Image

from api.app import create_app
from core.artifacts import MANIFEST_NAME, ArtifactStore
from core.tables import Artifact, Model
from tests.support.faults import Cluster, RayHead, is_alive, running_ray_head, wait_until
from tests.support.pretrained_models import build_tiny_lm
from tests.support.s3 import S3Server
from tests.support.stackproc import descendants
from tests.support.training import tiny_gan_job, tiny_gan_params

pytestmark = [pytest.mark.faults, pytest.mark.stack]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server) -> Iterator[RayHead]:
    """A Ray head whose node reaches the bucket with its own AWS_* environment (inherited from
    s3_server) and keeps its copies in its own cache folder."""
    var_dir = tmp_path_factory.mktemp("ray-s3")
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.url
    with running_ray_head(var_dir, {"GENQ_CACHE_DIR": str(var_dir / "node-cache")}) as head:
        yield head


@pytest.fixture
def cluster(tmp_path: Path, ray_head: RayHead, redis_db_url: str, s3_url: str) -> Iterator[Cluster]:
    c = Cluster(
        tmp_path,
        f"sqlite:///{tmp_path / 'genq.db'}",
        ray_head,
        redis_db_url,
        {"GENQ_ARTIFACT_URL": s3_url},
    )
    yield c
    c.close()
    stop_model_servers(ray_head)


def stop_model_servers(head: RayHead) -> None:
    """Kill the warm (detached) model servers a test left on the module's Ray head: they hold
    GPU shares that the next test's whole-GPU model (transformers) needs. The model pool goes
    first, so that it cannot start replacements for the servers killed after it; the next job
    starts a fresh pool."""
    code = (
        "import ray, sys\n"
        "ray.init(address=sys.argv[1], namespace='genq', log_to_driver=False)\n"
        "names = ray.util.list_named_actors()\n"
        "for name in sorted(names, key=lambda n: n != 'genq-model-pool'):\n"
        "    if name.startswith('model-') or name == 'genq-model-pool':\n"
        "        ray.kill(ray.get_actor(name), no_restart=True)\n"
    )
    head.driver(code)


def node_cache(cluster: Cluster) -> Path:
    return cluster.ray.var_dir / "node-cache"


def store_of(cluster: Cluster) -> ArtifactStore:
    return ArtifactStore.from_settings(cluster.settings)


def nothing_on_disk(cluster: Cluster) -> None:
    """The local artifact root (the default store) was never used."""
    root = cluster.settings.artifacts
    assert not root.exists() or [p for p in root.rglob("*") if p.is_file()] == []


def test_outputs_land_in_the_bucket_and_download_streamed_or_redirected(
    cluster: Cluster,
) -> None:
    cluster.worker()
    message = "hello from object storage " * 20
    job_id = cluster.submit({"kind": "generate", "model": "echo", "params": {"message": message}})
    job = cluster.wait(job_id, 90)
    assert job["state"] == "succeeded", job
    (output,) = job["outputs"]
    with cluster.database.transaction() as session:
        row = session.get(Artifact, output["id"])
        assert row is not None
        key, size, sha256 = row.path, row.size_bytes, row.sha256
    data = message.encode()
    with store_of(cluster).open(key) as f:
        assert f.read() == data
    assert (size, sha256) == (len(data), hashlib.sha256(data).hexdigest())
    nothing_on_disk(cluster)

    # Streamed through the API: whole, conditional, and one range.
    url = f"/v1/artifacts/{output['id']}"
    whole = cluster.client.get(url, headers=cluster.auth())
    assert whole.status_code == 200 and whole.data == data
    assert whole.headers["Content-Length"] == str(len(data))
    assert whole.headers["ETag"] == f'"{sha256}"'
    assert whole.headers["Content-Type"].startswith(row.content_type)
    again = cluster.client.get(url, headers={**cluster.auth(), "If-None-Match": f'"{sha256}"'})
    assert again.status_code == 304 and again.data == b""
    part = cluster.client.get(url, headers={**cluster.auth(), "Range": "bytes=6-9"})
    assert part.status_code == 206 and part.data == data[6:10]
    assert part.headers["Content-Range"] == f"bytes 6-9/{len(data)}"
    beyond = cluster.client.get(url, headers={**cluster.auth(), "Range": f"bytes={len(data)}-"})
    assert beyond.status_code == 416

    # With GENQ_ARTIFACT_REDIRECT the API answers with a presigned URL that works alone.
    settings = cluster.settings.model_copy(update={"artifact_redirect": True})
    app = create_app(settings, database=cluster.database, publisher=cluster.publisher)
    moved = app.test_client().get(url, headers=cluster.auth())
    assert moved.status_code == 307, moved.get_data(as_text=True)
    fetched = requests.get(moved.headers["Location"], timeout=10)
    assert fetched.status_code == 200 and fetched.content == data
    assert fetched.headers["Content-Type"].startswith(row.content_type)

    # The dashboard's view of the output streams it from the bucket too (never a redirect:
    # its pages allow images from their own origin only).
    admin = app.test_client()
    page = admin.get("/admin/login").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert token is not None
    login = {"key": cluster.admin_key, "csrf_token": token.group(1)}
    assert admin.post("/admin/login", data=login).status_code == 302
    shown = admin.get(f"/admin/artifacts/{output['id']}")
    assert shown.status_code == 200 and shown.data == data

    # A batch input file (the OpenAI-compatible API) is kept in the bucket too.
    lines = b'{"custom_id": "a", "method": "POST", "url": "/v1/images/generations"}\n'
    form = {"purpose": "batch", "file": (io.BytesIO(lines), "in.jsonl")}
    made = cluster.client.post(
        "/openai/v1/files", data=form, headers=cluster.auth(), content_type="multipart/form-data"
    )
    assert made.status_code == 200, made.get_data(as_text=True)
    file_id = made.get_json()["id"]
    (key,) = [k for k, _ in store_of(cluster).list("files") if file_id in k]
    read = cluster.client.get(f"/openai/v1/files/{file_id}/content", headers=cluster.auth())
    assert read.status_code == 200 and read.data == lines
    assert cluster.client.delete(f"/openai/v1/files/{file_id}", headers=cluster.auth()).json
    assert store_of(cluster).size(key) is None
    nothing_on_disk(cluster)


def images_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for cls, color in (("dark", (30, 40, 50)), ("light", (220, 200, 180))):
            for i in range(6):
                image = io.BytesIO()
                Image.new("RGB", (16, 16), tuple(c + 3 * i for c in color)).save(image, "PNG")
                archive.writestr(f"{cls}/{i}.png", image.getvalue())
    return buf.getvalue()


def trainer_pids(cluster: Cluster) -> set[int]:
    """Trainer actor processes of this module's Ray head (not another test run's)."""
    head = cluster.ray.stack.children[0].process.pid
    pids = set()
    for pid in descendants(head):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"ray::_TrainerActor" in cmdline or b"ray::Trainer" in cmdline:
            pids.add(pid)
    return pids


def test_a_dataset_in_the_bucket_trains_resumes_from_the_store_and_serves_from_it(
    cluster: Cluster,
) -> None:
    store = store_of(cluster)
    form = {"name": "swatches", "kind": "images", "file": (io.BytesIO(images_zip()), "s.zip")}
    response = cluster.client.post(
        "/v1/datasets", data=form, headers=cluster.auth(), content_type="multipart/form-data"
    )
    assert response.status_code == 201, response.get_data(as_text=True)
    dataset = response.get_json()
    manifest = store.read_manifest(f"datasets/{dataset['id']}")
    assert manifest is not None and len(manifest.files) == 12
    assert manifest.size_bytes == dataset["size_bytes"]
    nothing_on_disk(cluster)

    cluster.worker()
    cluster.scheduler()
    job_id = cluster.submit(
        tiny_gan_job(
            "swatch", tiny_gan_params(60, checkpoint_every=5, seed=None), dataset="swatches"
        )
    )
    checkpoints = f"checkpoints/{job_id}"
    # The trainer's process is found once it trains, so that the kill follows step 12 and a
    # stored checkpoint at once (a search of /proc in between could let a fast machine finish).
    wait_until(lambda: cluster.get(job_id)["progress"]["step"] >= 1, 180, "training progress")
    (pid,) = wait_until(lambda: trainer_pids(cluster), 10, "the trainer's process")
    stored = wait_until(
        lambda: cluster.get(job_id)["progress"]["step"] >= 12 and store.read_manifest(checkpoints),
        60,
        "step 12 and a stored checkpoint",
    )
    os.kill(pid, signal.SIGKILL)
    assert stored.version >= 1
    wait_until(lambda: not is_alive(pid), 10, "the trainer to die")
    # The node's own copy of the checkpoint goes: the next attempt can only resume from the
    # store.
    work = node_cache(cluster) / "work" / job_id
    assert (work / "checkpoints" / "checkpoint.safetensors").is_file()
    shutil.rmtree(work)

    job = cluster.wait(job_id, 240)
    assert job["state"] == "succeeded" and job["attempt"] == 2, job
    logs = [e.data["message"] for e in cluster.events(job_id, "log")]
    assert any("downloaded from the artifact store" in m for m in logs), logs
    # (a progress of total 0 only says what an attempt waits for: not work)
    progress = [e for e in cluster.events(job_id, "progress") if e.data.get("total")]
    second_began = first_event_of_attempt(cluster, job_id, 2)
    # The last step the killed attempt recorded (read once it was over: none is on its way).
    killed_at = max(e.data["step"] for e in progress if e.id < second_began)
    second = [e.data["step"] for e in progress if e.id > second_began]
    assert second and 5 < min(second) <= killed_at + 5, (killed_at, second)
    with cluster.database.transaction() as session:
        versions = session.query(Model).filter(Model.name == "swatch").all()
        assert [(m.version, m.path) for m in versions] == [(1, f"models/{job_id}")]
    model = store.read_manifest(f"models/{job_id}")
    assert model is not None and "genq.json" in model.files
    assert not work.exists()  # the node forgot its work folder once the model was stored
    cluster.check_invariants(job_id)
    nothing_on_disk(cluster)

    # A model server loads the trained model with its machine's cache empty: from the store.
    shutil.rmtree(node_cache(cluster), ignore_errors=True)
    generate = cluster.submit(
        {"kind": "generate", "model": "swatch:1", "params": {"num_images": 1}}
    )
    done = cluster.wait(generate, 180)
    assert done["state"] == "succeeded", done
    cached = list(node_cache(cluster).glob(f"objects/*/models/{job_id}/{MANIFEST_NAME}"))
    assert len(cached) == 1
    assert (cached[0].parent / "genq.json").is_file()

    # A fine-tune on an empty cache starts from its parent as stored, and is stored itself.
    shutil.rmtree(node_cache(cluster), ignore_errors=True)
    tune = cluster.submit(
        {
            "kind": "finetune",
            "model": "swatch:1",
            "dataset": "swatches",
            "name": "swatch",
            "params": {"steps": 3, "batch_size": 4},
        }
    )
    tuned = cluster.wait(tune, 180)
    assert tuned["state"] == "succeeded" and tuned["result_model"] == "swatch:2", tuned
    assert list(node_cache(cluster).glob(f"objects/*/models/{job_id}/{MANIFEST_NAME}"))
    assert store.read_manifest(f"models/{tune}") is not None
    nothing_on_disk(cluster)


def first_event_of_attempt(cluster: Cluster, job_id: str, attempt: int) -> int:
    for event in cluster.events(job_id, "state"):
        if event.data.get("to") == "running" and event.data.get("attempt") == attempt:
            return int(event.id)
    raise AssertionError(f"no attempt {attempt}")


def test_a_pretrained_folder_in_the_bucket_is_checked_fine_tuned_and_served(
    cluster: Cluster, s3_url: str, tmp_path: Path
) -> None:
    """Registered by its s3:// URL: the API checks its layout from its own cache, the model
    check loads it on the Ray node, and a LoRA adapter trained on it names that URL as its
    base, so a server on any machine (here: with an empty cache) rebuilds it from the bucket."""
    store = store_of(cluster)
    store.put_folder(build_tiny_lm(tmp_path / "lm"), "pretrained/tiny-lm")
    url = f"{s3_url}/pretrained/tiny-lm"
    cluster.worker()
    registered = cluster.client.post(
        "/v1/models",
        json={"name": "tiny-lm", "family": "transformers", "path": url},
        headers=cluster.auth(),
    )
    assert registered.status_code == 202, registered.get_data(as_text=True)
    ready = wait_until(
        lambda: (
            (m := cluster.client.get("/v1/models/tiny-lm", headers=cluster.auth()))
            and m.get_json()["items"][0]["status"] != "checking"
            and m.get_json()["items"][0]
        ),
        180,
        "the model check",
    )
    assert ready["status"] == "ready", ready
    missing = cluster.client.post(
        "/v1/models",
        json={"name": "nope", "family": "transformers", "path": f"{s3_url}/pretrained/none"},
        headers=cluster.auth(),
    )
    assert missing.status_code == 422 and missing.get_json()["errors"][0]["field"] == "path"

    text = ("The quick brown fox jumps over the lazy dog. " * 120).encode()
    form = {"name": "fox", "kind": "text", "file": (io.BytesIO(text), "fox.txt")}
    uploaded = cluster.client.post(
        "/v1/datasets", data=form, headers=cluster.auth(), content_type="multipart/form-data"
    )
    assert uploaded.status_code == 201, uploaded.get_data(as_text=True)
    lora = {"steps": 4, "batch_size": 4, "seq_len": 16, "r": 4, "checkpoint_every": 2}
    body = {"kind": "finetune", "model": "tiny-lm:1", "dataset": "fox", "name": "fox-lm"}
    tuned = cluster.wait(cluster.submit({**body, "params": lora}), 240)
    assert tuned["state"] == "succeeded" and tuned["result_model"] == "fox-lm:1", tuned
    with cluster.database.transaction() as session:
        (adapter,) = session.query(Model).filter(Model.name == "fox-lm").all()
        assert adapter.path == f"models/{tuned['id']}"
        assert (adapter.config or {})["base_path"] == url

    shutil.rmtree(node_cache(cluster), ignore_errors=True)
    prompt = {"prompt": "The quick", "max_tokens": 8, "temperature": 0, "seed": 0}
    job = cluster.wait(cluster.submit({"kind": "generate", "model": "fox-lm:1", "params": prompt}))
    assert job["state"] == "succeeded", job
    assert list(node_cache(cluster).glob("objects/*/tiny-lm/config.json"))
    nothing_on_disk(cluster)
