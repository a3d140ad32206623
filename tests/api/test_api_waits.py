"""`Prefer: wait` as `POST /v1/jobs` reads it (RFC 7240; Replicate's `wait` and `wait=N`)."""

from __future__ import annotations

import pytest

from api.waits import prefer_wait_s
from core.errors import InvalidInputError


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("respond-async", None),
        ("wait", 60),
        ("WAIT", 60),
        ("wait=5", 5),
        ("respond-async, wait=7", 7),
        ("handling=lenient; wait = 9", 9),
        ("wait=999", 300),  # capped at the setting; Preference-Applied says so
    ],
)
def test_prefer_wait(header: str | None, expected: int | None) -> None:
    assert prefer_wait_s(header, cap_s=300) == expected


def test_default_wait_is_held_to_the_cap() -> None:
    assert prefer_wait_s("wait", cap_s=10) == 10


@pytest.mark.parametrize("header", ["wait=", "wait=0", "wait=-1", "wait=1.5", "wait=soon"])
def test_a_bad_wait_is_a_422_naming_prefer(header: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        prefer_wait_s(header, cap_s=300)
    assert info.value.errors[0]["field"] == "Prefer"
