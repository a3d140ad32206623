"""How every genq process logs: plain text (the default) or one JSON object per line
(`GENQ_LOG_FORMAT=json`), each line carrying what is known of the job it is about.

The job fields (`job_id`, `tenant`, `attempt`, `request_id`) come from the record's `extra`
when the call passes them, else from this thread's `job_context` (a context variable the
runner and the Ray actors set around a job); `node` and `process` are the process's own,
set once by `configure_logging`. The JSON formatter is the stdlib's `logging.Formatter` with
`json.dumps`: a dozen lines, so no dependency for it.

    configure_logging(settings, process="worker")
    with job_context(job_id=..., tenant=..., attempt=2, request_id=...):
        log.info("claimed")   # {"time": ..., "level": "INFO", ..., "job_id": ..., "attempt": 2}
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import socket
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from core.settings import Settings

# Fields a line about a job carries, in this order, where known.
JOB_FIELDS = ("job_id", "tenant", "attempt", "request_id")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_job: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "genq_job_log_context", default=None
)


@contextlib.contextmanager
def job_context(**fields: Any) -> Iterator[None]:
    """Within this block, this thread's log lines carry `fields` (None values are left out)."""
    merged = {**(_job.get() or {}), **{k: v for k, v in fields.items() if v is not None}}
    token = _job.set(merged)
    try:
        yield
    finally:
        _job.reset(token)


def current_job_context() -> dict[str, Any]:
    """The job fields of this thread's context (a copy), for passing on to another process."""
    return dict(_job.get() or {})


class ContextFilter(logging.Filter):
    """Puts the job fields of the context, and the process's node and name, on each record
    (fields the call passed in `extra` win)."""

    def __init__(self, node: str, process: str) -> None:
        super().__init__()
        self.node, self.process_name = node, process

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in (_job.get() or {}).items():
            if not hasattr(record, name):
                setattr(record, name, value)
        if not hasattr(record, "node"):
            record.node = self.node
        record.genq_process = self.process_name
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the process
    and node, the job fields where known, and the traceback of an exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": getattr(record, "genq_process", None),
            "pid": record.process,
            "node": getattr(record, "node", None),
        }
        for name in JOB_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        elif record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


def configure_logging(settings: Settings, *, process: str, node: str = "") -> None:
    """Replace the root logger's handlers with one on stderr in the configured format.
    `process` names the genq process (api, worker, scheduler, model-server, trainer); `node`
    defaults to this machine's host name."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter(node or socket.gethostname(), process))
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    logging.captureWarnings(True)  # warnings become lines of the same format


def gunicorn_log_config(settings: Settings, *, node: str = "") -> dict[str, Any]:
    """gunicorn's own lines (its master and its error log) in genq's format, for
    `--log-config-json`: they go to the root logger's handler on stderr."""
    formatter: dict[str, Any] = (
        {"()": "core.logs.JsonFormatter"}
        if settings.log_format == "json"
        else {"format": TEXT_FORMAT}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "genq": {
                "()": "core.logs.ContextFilter",
                "node": node or socket.gethostname(),
                "process": "api",
            }
        },
        "formatters": {"genq": formatter},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "genq",
                "filters": ["genq"],
            }
        },
        "root": {"level": settings.log_level.upper(), "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": settings.log_level.upper(), "propagate": True},
            "gunicorn.access": {"level": settings.log_level.upper(), "propagate": True},
        },
    }
