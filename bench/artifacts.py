"""The artifact store on S3-compatible object storage (a local moto_server process): what a
download through the API costs next to a presigned URL, whether the API holds the object in
memory, and what the node cache saves a model server.

    .venv/bin/python bench/artifacts.py [--mib 64]

1. One output of --mib MiB is stored; the API's streaming path (api/artifacts.py
   `send_artifact`, in this process) is read to the end: MB/s, and the peak of Python
   allocations while it runs (tracemalloc), which stays near one chunk if nothing buffers the
   object whole.
2. The same object fetched from its presigned URL (what GENQ_ARTIFACT_REDIRECT hands out).
3. A model folder of --mib MiB in 4 files: a cold fetch into an empty node cache (download and
   SHA-256 check) and a warm one (the manifest is read and compared, nothing downloaded).

Figures are printed and written to bench/results/artifacts-<UTC time>.json. moto keeps objects
in its own memory on this machine, so the MB/s are an upper bound for a real network store.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.artifactcache import FolderCache  # noqa: E402
from core.artifacts import ArtifactStore  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.tables import Artifact  # noqa: E402

MIB = 1024 * 1024


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    url = f"http://127.0.0.1:{port}"
    moto = Path(sys.executable).with_name("moto_server")
    process = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    for _ in range(300):
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=2):
                return process, url
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("moto_server did not start")


def bench_download(settings: Settings, store: ArtifactStore, mib: int) -> dict[str, Any]:
    from api.app import create_app
    from api.artifacts import send_artifact

    data = os.urandom(mib * MIB)
    stored = store.write_output("bench", "job-1", "big.bin", data)
    del data
    artifact = Artifact(
        id="a1",
        job_id="job-1",
        tenant_id="bench",
        name="big.bin",
        kind="file",
        path=stored.path,
        content_type="application/octet-stream",
        size_bytes=stored.size_bytes,
        sha256=stored.sha256,
    )
    app = create_app(settings)
    with app.test_request_context(f"/v1/artifacts/{artifact.id}"):
        tracemalloc.start()
        started = time.perf_counter()
        response = send_artifact(artifact, allow_redirect=False)
        received = sum(len(chunk) for chunk in response.response)
        stream_s = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert received == stored.size_bytes
    url = store.presigned_url(stored.path, 60)
    assert url is not None
    started = time.perf_counter()
    direct = requests.get(url, timeout=120)
    presigned_s = time.perf_counter() - started
    assert len(direct.content) == stored.size_bytes
    return {
        "object_mib": mib,
        "api_stream_mb_per_s": round(mib * MIB / stream_s / 1e6, 1),
        "api_stream_peak_python_alloc_mib": round(peak / MIB, 2),
        "presigned_get_mb_per_s": round(mib * MIB / presigned_s / 1e6, 1),
    }


def bench_cache(store: ArtifactStore, mib: int, tmp: Path) -> dict[str, Any]:
    folder = tmp / "model"
    folder.mkdir()
    for i in range(4):
        (folder / f"part-{i}.safetensors").write_bytes(os.urandom(mib * MIB // 4))
    (folder / "genq.json").write_text('{"family": "bench"}')
    store.put_folder(folder, "models/bench")
    cache = FolderCache(tmp / "cache")
    started = time.perf_counter()
    cache.folder(store, "models/bench")
    cold_s = time.perf_counter() - started
    started = time.perf_counter()
    cache.folder(store, "models/bench")
    warm_s = time.perf_counter() - started
    return {
        "folder_mib": mib,
        "cold_fetch_s": round(cold_s, 3),
        "cold_fetch_mb_per_s": round(mib * MIB / cold_s / 1e6, 1),
        "warm_fetch_s": round(warm_s, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=64)
    args = parser.parse_args()
    process, endpoint = start_moto()
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket="genq-bench")
        with tempfile.TemporaryDirectory() as tmp:
            settings = Settings(
                _env_file=None,  # type: ignore[call-arg]
                var_dir=Path(tmp) / "var",
                artifact_url="s3://genq-bench/genq",
                secret_key="bench",
            )
            store = ArtifactStore.from_settings(settings)
            result = {
                "download": bench_download(settings, store, args.mib),
                "cache": bench_cache(store, args.mib, Path(tmp)),
            }
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(15)
    print(json.dumps(result, indent=2))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (out / f"artifacts-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
