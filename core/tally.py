"""Counters of events that leave no row to count later (a reaped lease is a requeue on the
job row, gone once it runs again): kept in one Redis hash that every process on every machine
adds to, so GET /metrics reads the one total of the whole stack, and a process restart loses
nothing. Counters here only grow; each field is one series (a name and its labels).

The Redis client is passed in (this layer imports no broker library).
"""

from __future__ import annotations

import json
from typing import Any, Protocol

KEY = "genq:metrics:counters"


class HashClient(Protocol):
    def hincrbyfloat(self, name: str, key: str, amount: float = 1.0) -> Any: ...

    def hgetall(self, name: str) -> Any: ...


def count(client: HashClient, name: str, labels: dict[str, str], amount: float = 1.0) -> None:
    """Add `amount` to the counter `name` with `labels`."""
    field = json.dumps([name, sorted(labels.items())], separators=(",", ":"))
    client.hincrbyfloat(KEY, field, amount)


def read(client: HashClient) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Counter name -> [(labels, value)], every series in the hash."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for raw_field, raw_value in (client.hgetall(KEY) or {}).items():
        text = raw_field.decode() if isinstance(raw_field, bytes) else str(raw_field)
        try:
            name, pairs = json.loads(text)
            labels = {str(k): str(v) for k, v in pairs}
            value = float(raw_value)
        except (ValueError, TypeError):  # a field no genq wrote: not ours to show
            continue
        found.setdefault(str(name), []).append((labels, value))
    return found
