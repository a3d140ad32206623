"""Logs that join up: the JSON line format and its job fields (core/logs.py), the format every
entry point installs, and the request id a job keeps from its submission.
tests/stack/test_ops_stack.py follows one request id through a real stack.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from api.app import create_app
from core.catalog import ensure_builtins
from core.db import Database
from core.keys import create_key, get_or_create_tenant
from core.logs import ContextFilter, JsonFormatter, current_job_context, job_context
from core.settings import Settings
from core.tables import Base, Job
from scheduler.enqueue import Publisher

ROOT = Path(__file__).resolve().parents[2]


def _capture(process: str = "worker") -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter("node-a", process))
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(f"test.logs.{process}")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_json_line_carries_the_job_fields_of_its_context() -> None:
    log, stream = _capture()
    log.info("before any job")
    with job_context(job_id="j1", tenant="t1", attempt=2, request_id="req-1"):
        log.warning("inside %s", "the job")
        assert current_job_context() == {
            "job_id": "j1",
            "tenant": "t1",
            "attempt": 2,
            "request_id": "req-1",
        }
        with job_context(attempt=None, request_id="req-2"):  # None leaves a field as it is
            log.info("nested")
        log.info("passed in", extra={"job_id": "other"})  # extra wins over the context
    log.info("after")
    outside, inside, nested, passed, after = _lines(stream)
    assert set(outside) == {"time", "level", "logger", "message", "process", "pid", "node"}
    assert outside["message"] == "before any job" and outside["level"] == "INFO"
    assert outside["process"] == "worker" and outside["node"] == "node-a"
    assert outside["logger"] == "test.logs.worker" and outside["time"].endswith("+00:00")
    assert inside["message"] == "inside the job" and inside["level"] == "WARNING"
    assert (inside["job_id"], inside["tenant"], inside["attempt"]) == ("j1", "t1", 2)
    assert inside["request_id"] == "req-1"
    assert nested["attempt"] == 2 and nested["request_id"] == "req-2"
    assert passed["job_id"] == "other" and passed["tenant"] == "t1"
    assert "job_id" not in after and current_job_context() == {}


def test_a_json_line_carries_the_traceback_of_an_exception() -> None:
    log, stream = _capture()
    try:
        raise ValueError('broken "quote"\nand a new line')
    except ValueError:
        log.exception("it failed")
    [line] = _lines(stream)  # one line: the traceback is escaped inside it
    assert line["level"] == "ERROR"
    assert 'ValueError: broken "quote"' in line["exc_info"]


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_an_entry_point_logs_in_the_configured_format(fmt: str, tmp_path: Path) -> None:
    code = (
        "import logging, warnings\n"
        "from core.logs import configure_logging, job_context\n"
        "from core.settings import Settings\n"
        f"configure_logging(Settings(_env_file=None, log_format={fmt!r}), process='scheduler')\n"
        "with job_context(job_id='j9'):\n"
        "    logging.getLogger('genq.test').info('hello')\n"
        "warnings.warn('careful')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("GENQ_")},
    )
    assert out.returncode == 0, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    if fmt == "json":
        hello, warned = (json.loads(line) for line in lines)
        assert hello["message"] == "hello" and hello["job_id"] == "j9"
        assert hello["process"] == "scheduler" and hello["logger"] == "genq.test"
        assert warned["logger"] == "py.warnings" and "careful" in warned["message"]
    else:
        assert lines[0].endswith("INFO genq.test: hello")
        assert not lines[0].startswith("{")


@pytest.fixture
def app(tmp_path: Path, redis_db_url: str) -> Iterator[Flask]:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        var_dir=tmp_path / "var",
        database_url=f"sqlite:///{tmp_path / 'genq.db'}",
        redis_url=redis_db_url,
        artifact_root=tmp_path / "artifacts",
        rate_limits=False,
        log_format="json",
    )
    database = Database(settings)
    Base.metadata.create_all(database.engine)
    with database.transaction() as session:
        ensure_builtins(session)
    publisher = Publisher(settings)
    yield create_app(settings, database=database, publisher=publisher)
    publisher.close()
    database.dispose()


def test_a_job_keeps_the_request_id_it_was_submitted_with(
    app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    database: Database = app.extensions["genq"].database
    with database.transaction() as session:
        _, key = create_key(session, get_or_create_tenant(session, "acme"))
    client = app.test_client()
    body = {"kind": "generate", "model": "echo", "params": {"message": "hi"}}
    headers = {"Authorization": f"Bearer {key}"}
    with caplog.at_level(logging.INFO, logger="genq.access"):
        given = client.post("/v1/jobs", json=body, headers={**headers, "X-Request-ID": "abc:1.2-3"})
        # An unsafe id (spaces, a quote, 200 characters) is replaced by a generated one.
        unsafe = client.post(
            "/v1/jobs", json=body, headers={**headers, "X-Request-ID": 'a "b' * 50}
        )
    assert given.status_code == 202 and given.headers["X-Request-ID"] == "abc:1.2-3"
    made = unsafe.headers["X-Request-ID"]
    assert unsafe.status_code == 202 and len(made) == 32 and made.isalnum()
    with database.read() as session:
        assert session.get(Job, given.get_json()["id"]).request_id == "abc:1.2-3"  # type: ignore[union-attr]
        assert session.get(Job, unsafe.get_json()["id"]).request_id == made  # type: ignore[union-attr]
    # In JSON mode the app writes one access line per request, with its id.
    access = [r for r in caplog.records if r.name == "genq.access"]
    assert [getattr(r, "request_id", None) for r in access] == ["abc:1.2-3", made]
    assert access[0].getMessage().startswith("POST /v1/jobs 202 ")
