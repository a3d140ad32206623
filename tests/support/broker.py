"""Hostile broker messages (scheduler/intake.py must drop each): kombu envelopes as the Redis
transport stores them, with any body and headers, and the list of malformed shapes with the
reason each is counted under. Used by tests/faults/test_broker_intake.py and
tests/stack/test_hostile.py."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

from scheduler.broker import RUN_JOB_TASK


def envelope(
    body: bytes,
    headers: dict[str, Any] | None,
    content_type: str = "application/json",
    queue: str = "generate",
) -> str:
    """A kombu envelope as the Redis transport stores it, with any body and headers."""
    tag = str(uuid.uuid4())
    return json.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": content_type,
            "headers": headers,
            "properties": {
                "correlation_id": tag,
                "body_encoding": "base64",
                "delivery_tag": tag,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "delivery_mode": 2,
            },
        }
    )


def task_headers(name: str = RUN_JOB_TASK) -> dict[str, Any]:
    tid = str(uuid.uuid4())
    return {"lang": "py", "task": name, "id": tid, "root_id": tid, "parent_id": None}


# (what it is, the raw list item, the reason it is counted under)
HOSTILE: list[tuple[str, bytes | str, str]] = [
    ("the number 5", "5", "not_an_envelope"),
    ("raw bytes", b"\x80\x81\xfe not json", "unreadable"),
    ("a JSON object", '{"hello": "world"}', "not_an_envelope"),
    ("body 5 for run_job", envelope(b"5", task_headers()), "not_a_genq_task"),
    ("unknown task", envelope(b'[["x"], {}, {}]', task_headers("os.system")), "not_a_genq_task"),
    ("no args", envelope(b"[[], {}, {}]", task_headers()), "not_a_genq_task"),
    ("no task header", envelope(b'[["x"], {}, {}]', {"lang": "py"}), "not_a_genq_task"),
    ("headers not an object", envelope(b'[["x"], {}, {}]', None) + " ", "not_a_genq_task"),
    (
        "pickle",
        envelope(b"\x80\x04K\x05.", task_headers(), "application/x-python-serialize"),
        "not_a_genq_task",
    ),
    (
        "bad base64",
        json.dumps({**json.loads(envelope(b"", task_headers())), "body": "%%%"}),
        "not_a_genq_task",
    ),  # fmt: skip
]
