"""What a training job's worker knows of the data set it reads: a plain record, apart from the
catalog (core/catalog.py) whose SQL a Ray worker process has no use for. Every model server
and trainer imports the family interface, which names this type; kept here, their imports
load no SQLAlchemy (tests/api/test_imports.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class DatasetRef:
    """The data set a training job reads, as its worker sees it."""

    name: str
    kind: str  # images | text
    path: Path | None  # None for a built-in data set
