"""Shared fixtures: real SQLite files and PostgreSQL databases, real Redis, settings, S3.

PostgreSQL comes from GENQ_TEST_DATABASE_URL (a server where we may CREATE DATABASE), Redis from
GENQ_TEST_REDIS_URL. Without a reachable server those cases are skipped, except under CI (the
CI variable set), where they fail. Each test that asks gets a database of its own:

- `database_url` (SQLite and PostgreSQL, the test runs twice) and `new_database(kind)` hand out
  a database already at the migrations' head: a PostgreSQL one is `CREATE DATABASE ... TEMPLATE`
  of a database migrated once per test process (per xdist worker), a SQLite one a copy of a file
  migrated once; `fresh_pg_url` is an empty PostgreSQL database (for tests that migrate
  themselves). Each is dropped after its test.
- `redis_db_url` is a Redis database number no other running test holds, across xdist workers
  too (`RedisDatabases`, tests/support/databases.py), flushed before and after the test.

Object storage is a real `moto_server` process started once per test process (`s3_server`,
tests/support/s3.py), with a new bucket per test. The fixtures are here; the classes and the
servers behind them are in tests/support/.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

# Helpers under tests/support/ assert too; pytest rewrites their asserts as it does tests'.
# It must be told before they are imported: hence their imports below this line.
pytest.register_assert_rewrite("tests.support")

from tests.support.databases import PgDatabases, RedisDatabases, pg_engine  # noqa: E402
from tests.support.plugins import write_plugin_site  # noqa: E402
from tests.support.s3 import S3Server, running_s3_server  # noqa: E402

# Under xdist each test process (and what it starts: `genq up`, workers, Ray) computes with one
# thread: on a machine with as many cores as test processes, torch's own thread pool per
# process would put two busy threads on each core, each waiting on the other's spin.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

PG_URL = os.environ.get("GENQ_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("GENQ_TEST_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")


@pytest.fixture(autouse=True)
def _one_test_per_serial_lane(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Under xdist, two fault-injection or multi-host tests of one lane (SERIAL_LANES below:
    leases of seconds, several processes started and killed per test) never run beside each
    other: each holds its lane's lock, shared by the session's workers (a file in the
    session's temporary folder, locked with flock). Other tests, and the other lane's, run
    beside them: every test's processes, database, Redis database and Ray head are its own,
    and it signals only process groups it started. (xdist's `xdist_group` cannot be used: with
    pytest 9 its loadgroup mode no longer changes the test ids it groups by.)"""
    node = request.node
    if "PYTEST_XDIST_WORKER" not in os.environ or not (
        node.get_closest_marker("faults") or node.get_closest_marker("multihost")
    ):
        yield
        return
    import fcntl

    # Each worker's base folder is popen-gwN inside the session's: the parent is shared.
    lock = tmp_path_factory.getbasetemp().parent / f"{serial_lane(node.nodeid)}.lock"
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# The fault-injection and multi-host files, and every other file marked `faults`, in two
# lanes: each lane is one unit of work for xdist, run in turn by one test process (see
# pytest_xdist_make_scheduler), while the others run everything else. (A `faults` file outside
# a lane would hold its process idle on the lane's lock while the lane's test of the moment
# runs: test_supervise did, ~80 s a run.)
SERIAL_LANES = {
    "faults": ("tests/faults/",),
    "hosts": ("tests/stack/test_multihost.py", "tests/stack/test_supervise.py"),
}
SERIAL_FILES = tuple(path for paths in SERIAL_LANES.values() for path in paths)


def serial_lane(nodeid: str) -> str:
    """The lane of a fault or multi-host test (by its file); "faults" for one marked so
    elsewhere."""
    for lane, paths in SERIAL_LANES.items():
        if nodeid.startswith(paths):
            return lane
    return "faults"


# Where the time goes, most first: files under these folders start before the rest, so that
# the last file to end on a test process is a short one, not a whole stack's.
HEAVY_FIRST = (*SERIAL_FILES, "tests/stack/", "tests/browser/", "tests/workers/")


def _weight(nodeid: str) -> int:
    return next((i for i, p in enumerate(HEAVY_FIRST) if nodeid.startswith(p)), len(HEAVY_FIRST))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Heavy files first, each file's tests in their own order (a stable sort); every test
    process sorts its collection alike, as xdist requires."""
    items.sort(key=lambda item: _weight(item.nodeid))


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadfile`, but the files of each serial lane are a single unit. Under the
    lane's lock above they could not run beside each other anyway: handed to two test
    processes, one of them would sit waiting on the lock with its file. Units go out in
    collection order (heavy first), not reordered by their number of tests."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SerialFaultsFirst(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.startswith(SERIAL_FILES):
                return f"serial-{serial_lane(nodeid)}"
            return super()._split_scope(nodeid)

    config.option.loadscopereorder = False
    return SerialFaultsFirst(config, log)


def unreachable(what: str, exc: BaseException) -> None:
    """A service the test needs is down: a failure under CI, where it must be there, else a
    skip that says why."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required under CI: {exc}")
    pytest.skip(f"{what} unreachable: {exc}")


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    try:
        engine = pg_engine(PG_URL)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:
        unreachable(f"PostgreSQL at {PG_URL}", exc)
    return PG_URL


@pytest.fixture(scope="session")
def pg_databases(pg_server_url: str) -> Iterator[PgDatabases]:
    databases = PgDatabases(pg_server_url)
    yield databases
    databases.close()


@pytest.fixture
def fresh_pg_url(pg_databases: PgDatabases) -> Iterator[str]:
    """A new, empty PostgreSQL database for this test."""
    name = pg_databases.create()
    yield pg_databases.url(name)
    pg_databases.drop(name)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file at the migrations' head, made once per test process and copied per test."""
    import migrations
    from core.settings import Settings

    path = tmp_path_factory.mktemp("sqlite-template") / "genq.db"
    migrations.upgrade(Settings(_env_file=None, database_url=f"sqlite:///{path}"))  # type: ignore[call-arg]
    return path


@pytest.fixture
def new_database(
    request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path
) -> Iterator[Callable[[str], str]]:
    """new_database("sqlite" | "postgres"): the URL of a new database at the migrations' head,
    dropped (PostgreSQL) or left in tmp_path (SQLite) after the test."""
    made: list[str] = []
    databases: list[PgDatabases] = []

    def make(kind: str) -> str:
        if kind == "sqlite":
            path = tmp_path / f"genq-{len(made)}.db" if made else tmp_path / "genq.db"
            shutil.copyfile(sqlite_template, path)
            made.append(str(path))
            return f"sqlite:///{path}"
        if not databases:
            databases.append(request.getfixturevalue("pg_databases"))
        name = databases[0].migrated()
        made.append(name)
        return databases[0].url(name)

    yield make
    for name in made:
        if databases and not name.startswith("/"):
            databases[0].drop(name)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, new_database: Callable[[str], str]) -> str:
    """Each test that takes this runs twice: on a SQLite file and on PostgreSQL, each a new
    database at the migrations' head."""
    return new_database(request.param)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """As `database_url`, but empty: for the tests of the migrations themselves."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    return str(request.getfixturevalue("fresh_pg_url"))


@pytest.fixture(scope="session")
def redis_server_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except Exception as exc:
        unreachable(f"Redis at {REDIS_URL}", exc)
    return REDIS_URL


@pytest.fixture(scope="session")
def redis_databases(redis_server_url: str) -> RedisDatabases:
    return RedisDatabases(redis_server_url)


@pytest.fixture
def redis_db_url(redis_databases: RedisDatabases) -> Iterator[str]:
    """The URL of a Redis database that is this test's alone, empty at the start, flushed at
    the end. (A module-scoped fixture takes one with `redis_databases.lease()`.)"""
    with redis_databases.lease() as url:
        yield url


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real `moto_server` for this test process (tests/support/s3.py), the AWS_* variables
    exported meanwhile."""
    with running_s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


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

    from workers.families import ddpm_denoising

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
        "scheduler": dict(ddpm_denoising.SCHEDULE),
        "unet": {
            "sample_size": 16,
            "in_channels": 1,
            "out_channels": 1,
            "num_class_embeds": 11,
            **ddpm_denoising.PRESETS["tiny"]["unet"],
        },
    }
    torch.manual_seed(0)
    UNet2DModel(**config["unet"]).save_pretrained(folder, safe_serialization=True)
    (folder / "genq.json").write_text(json.dumps(config))
    return str(folder), config


@pytest.fixture(scope="session")
def tiny_gan(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    """A tiny gan model folder (seeded random weights, as `train` would save it) and its
    config: a 1-CPU model server like tiny_ddpm's, whose process imports torch but not
    diffusers (about a fifth of a ddpm server's start-up CPU), for tests of placement and room
    where the family does not matter."""
    import torch

    from workers.families import gan
    from workers.families.checkpoints import save_model

    folder = tmp_path_factory.mktemp("tiny-gan") / "model"
    config = {
        "family": "gan",
        "preset": "tiny",
        **gan.PRESETS["tiny"],
        "channels": 1,
        "num_classes": 10,
        "class_names": [str(i) for i in range(10)],
    }
    torch.manual_seed(0)
    generator, _ = gan.build(config)
    save_model(generator, config, folder)
    return str(folder), config


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Callable[[list[str]], Path]:
    """Makes a PYTHONPATH folder of broken plug-ins: plugin_site(["crashes", "future"])."""
    return lambda names: write_plugin_site(tmp_path_factory.mktemp("site"), names)
