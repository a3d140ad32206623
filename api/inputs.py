"""Text the API refuses wherever it arrives: the NUL character.

PostgreSQL stores NUL (U+0000) in neither text nor jsonb; the driver raises, and a request that
carried one in a job's params, a model name, an Idempotency-Key, a query filter or a path id
ended as a 500 on PostgreSQL (SQLite took it). No field here has a use for it, so it is a 422
naming the field, on every database alike: in JSON bodies (`api.jobs.read_json_body`), and in
path ids, query parameters, headers and the dashboard's forms (the hook below).
"""

from __future__ import annotations

from typing import Any

from flask import request

from core.errors import InvalidInputError

NUL = "\x00"
MESSAGE = "must not contain the NUL character (U+0000)"


def nul_field(value: Any) -> str | None:
    """The path of the first string (or key) in a parsed JSON value that holds NUL, as the 422
    names fields (`params.message`, `job.params.0`; `body` for the value itself); else None.
    Walked without recursion: json.loads accepts nesting deeper than Python's stack here."""
    pending: list[tuple[str, Any]] = [("", value)]
    while pending:
        path, item = pending.pop()
        if isinstance(item, str):
            if NUL in item:
                return path or "body"
        elif isinstance(item, dict):
            for key, child in item.items():
                field = f"{path}.{key}" if path else str(key)
                if NUL in key:
                    return field
                pending.append((field, child))
        elif isinstance(item, list):
            pending.extend((f"{path}.{i}" if path else str(i), c) for i, c in enumerate(item))
    return None


def refuse_nul(value: Any) -> None:
    field = nul_field(value)
    if field is not None:
        raise InvalidInputError.one(field, MESSAGE)


def refuse_nul_in_request() -> None:
    """before_request: path ids, query parameters, headers, and the dashboard's small forms.
    (Upload forms are left to their views, which set their own size limit before parsing.)"""
    texts: list[tuple[str, str]] = [
        (name, value) for name, value in (request.view_args or {}).items() if isinstance(value, str)
    ]
    texts += [(name, name + value) for name, value in request.args.items(multi=True)]
    texts += list(request.headers.items())
    if request.method == "POST" and request.path.startswith("/admin/"):
        texts += [(name, name + value) for name, value in request.form.items(multi=True)]
    for name, value in texts:
        if NUL in value:
            raise InvalidInputError.one(name, MESSAGE)
