"""Identifiers: time-ordered UUIDs, so that ordering by id is ordering by creation.

The first 48 bits are milliseconds since the epoch and the rest is random (the UUIDv7 layout),
which keeps primary-key indexes append-mostly and lets a cursor be just the last id seen.
"""

from __future__ import annotations

import os
import time
import uuid


def new_id() -> str:
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | rand
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return str(uuid.UUID(int=value))
