"""Shared fixtures: real SQLite files and fresh PostgreSQL databases, real Redis, settings.

PostgreSQL comes from GENQ_TEST_DATABASE_URL (a server where we may CREATE DATABASE); each test
that asks for it gets a database of its own, dropped afterwards. Without a reachable server the
PostgreSQL cases are skipped, except under CI, where they fail. Object storage is a real
`moto_server` process started once per session (`s3_server`), with a new bucket per test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

# Helpers under tests/support/ assert too; pytest rewrites their asserts as it does tests'.
pytest.register_assert_rewrite("tests.support")

PG_URL = os.environ.get("GENQ_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("GENQ_TEST_REDIS_URL", "redis://127.0.0.1:6379")


def _pg_engine(url: str):  # type: ignore[no-untyped-def]
    return create_engine(
        url.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT"
    )


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    try:
        engine = _pg_engine(PG_URL)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL at {PG_URL} is required under CI: {exc}")
        pytest.skip(f"PostgreSQL unreachable: {exc}")
    return PG_URL


@pytest.fixture
def fresh_pg_url(pg_server_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database for this test."""
    name = f"genq_t_{uuid.uuid4().hex[:12]}"
    admin = _pg_engine(pg_server_url)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(pg_server_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test that takes this runs twice: on a SQLite file and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'genq.db'}"
    return str(request.getfixturevalue("fresh_pg_url"))


@pytest.fixture(scope="session")
def redis_server_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except Exception as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Redis at {REDIS_URL} is required under CI: {exc}")
        pytest.skip(f"Redis unreachable: {exc}")
    return REDIS_URL


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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """Starts `moto_server` on a free port (never moto's in-process mock), exports the AWS_*
    variables every genq process and Ray node of the session inherits, and stops the server
    by its PID at the end."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("s3") / "moto_server.log"
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


@pytest.fixture
def s3_url(s3_server: S3Server) -> str:
    """A new, empty bucket for this test, as an artifact store URL with a prefix."""
    return f"s3://{s3_server.new_bucket()}/genq"


@pytest.fixture(scope="session")
def tiny_ddpm(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    """A tiny ddpm model folder (seeded random weights, as `train` would save it) and its
    config: a model server that takes a CPU (or a GPU share) and loads in a second."""
    import json

    import torch
    from diffusers import UNet2DModel

    from workers.families import ddpm

    folder = tmp_path_factory.mktemp("tiny-ddpm")
    config = {
        "family": "ddpm",
        "preset": "tiny",
        "image_size": 16,
        "channels": 1,
        "num_classes": 10,
        "null_label": 10,
        "class_names": [str(i) for i in range(10)],
        "num_train_timesteps": 200,
        "scheduler": dict(ddpm.SCHEDULE),
        "unet": {
            "sample_size": 16,
            "in_channels": 1,
            "out_channels": 1,
            "num_class_embeds": 11,
            **ddpm.PRESETS["tiny"]["unet"],
        },
    }
    torch.manual_seed(0)
    UNet2DModel(**config["unet"]).save_pretrained(folder, safe_serialization=True)
    (folder / "genq.json").write_text(json.dumps(config))
    return str(folder), config


# Installed-package stand-ins for plug-in families that genq must report, not load: each module
# of the `genq_test_plugins` package below fails discovery in its own way.
BROKEN_PLUGIN_MODULES = {
    "__init__.py": "",
    "crashes.py": "raise ImportError('libfoo.so.1: cannot open shared object file')\n",
    "exits.py": "import sys\nsys.exit(3)\n",
    "heavy.py": "import torch  # noqa: F401\nfrom genq_test_plugins.future import FAMILY  # noqa\n",
    "future.py": (
        "from pydantic import BaseModel, ConfigDict\n"
        "from workers.families.base import Family\n"
        "class P(BaseModel):\n    model_config = ConfigDict(extra='forbid')\n"
        "FAMILY = Family(name='future', description='d', implementation='x.y',\n"
        "                generate_params=P, api_version=99)\n"
        "ECHO = Family(name='echo', description='d', implementation='x.y', generate_params=P)\n"
        "LOOSE = Family(name='loose', description='d', implementation='x.y',\n"
        "               train_params=BaseModel, max_batch_size=4)\n"
        "NOT_A_FAMILY = {'name': 'dict'}\n"
    ),
}
BROKEN_PLUGINS = {
    "crashes": "genq_test_plugins.crashes:FAMILY",
    "exits": "genq_test_plugins.exits:FAMILY",
    "future": "genq_test_plugins.future:FAMILY",
    "echo": "genq_test_plugins.future:ECHO",
    "loose": "genq_test_plugins.future:LOOSE",
    "dict": "genq_test_plugins.future:NOT_A_FAMILY",
    "renamed": "genq_test_plugins.future:ECHO",
    "heavy": "genq_test_plugins.heavy:FAMILY",
}


def write_plugin_site(root: Path, names: list[str]) -> Path:
    """A folder to put on PYTHONPATH that holds the `genq-test-plugins` distribution, whose
    `genq.families` entry points are `names` (keys of BROKEN_PLUGINS)."""
    package = root / "genq_test_plugins"
    package.mkdir(parents=True)
    for name, source in BROKEN_PLUGIN_MODULES.items():
        (package / name).write_text(source)
    info = root / "genq_test_plugins-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: genq-test-plugins\nVersion: 1.0\n")
    lines = "".join(f"{name} = {BROKEN_PLUGINS[name]}\n" for name in names)
    (info / "entry_points.txt").write_text(f"[genq.families]\n{lines}")
    return root


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Callable[[list[str]], Path]:
    """Makes a PYTHONPATH folder of broken plug-ins: plugin_site(["crashes", "future"])."""
    return lambda names: write_plugin_site(tmp_path_factory.mktemp("site"), names)
