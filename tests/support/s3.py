"""A real S3-compatible server for the tests: moto's standalone server (`moto_server`, never its
in-process mock) as a process on a free port, with the AWS_* settings that point boto3 and every
genq process at it; the root conftest.py starts one per test process (`s3_server`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class S3Server:
    """A real S3-compatible server process (moto's standalone server) for this test session,
    and the AWS_* settings that point boto3 at it."""

    url: str
    pid: int
    env: dict[str, str]

    def new_bucket(self) -> str:
        import boto3

        name = f"genq-{uuid.uuid4().hex[:12]}"
        boto3.client("s3").create_bucket(Bucket=name)
        return name


@contextmanager
def running_s3_server(log_dir: Path) -> Iterator[S3Server]:
    """Start `moto_server` on a free port (its output in `log_dir`), export the AWS_* variables
    every genq process and Ray node started meanwhile inherits, and stop the server by its PID
    at the end."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    url = f"http://127.0.0.1:{port}"
    log = log_dir / "moto_server.log"
    moto = Path(sys.executable).with_name("moto_server")
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=2):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"moto_server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "genq-test",
        "AWS_SECRET_ACCESS_KEY": "genq-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield S3Server(url, process.pid, env)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
