"""Whole numbers that arrive as text: path segments, query strings, headers, form fields.

`str.isdigit` is not enough to guard `int()`: it accepts characters `int()` refuses ('²'),
digits of other scripts, and numbers of any length, which a SQL driver then refuses to bind
(SQLite and PostgreSQL hold 64 bits, PostgreSQL's INTEGER 32). Each of those ended as a 500.
"""

from __future__ import annotations

# The largest value of a 32-bit INTEGER column (PostgreSQL's INTEGER; model versions).
INT32_MAX = 2**31 - 1
# The largest value of a 64-bit column (SQLite's INTEGER, PostgreSQL's BIGINT; event ids).
INT64_MAX = 2**63 - 1


def parse_whole(raw: str, *, minimum: int = 0, maximum: int = INT64_MAX) -> int | None:
    """`raw` as an int when it is ASCII digits only and from `minimum` to `maximum`; else None
    (the caller answers with its own 422 or 404)."""
    if not raw.isascii() or not raw.isdigit() or len(raw.lstrip("0")) > len(str(maximum)):
        return None
    value = int(raw)
    return value if minimum <= value <= maximum else None
