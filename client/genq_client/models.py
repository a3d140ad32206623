"""Typed views of what genq's API returns: jobs and their outputs, events, models, data sets
and batches. Each keeps the whole JSON it was built from in `raw`, so fields added by a newer
server are not lost."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TERMINAL_STATES = frozenset({"succeeded", "failed", "canceled"})


@dataclass(frozen=True)
class Output:
    id: str
    name: str
    kind: str
    url: str
    content_type: str
    bytes: int
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Output:
        return cls(
            id=data["id"],
            name=data.get("name", ""),
            kind=data.get("kind", ""),
            url=data["url"],
            content_type=data.get("content_type", ""),
            bytes=int(data.get("bytes") or 0),
            meta=dict(data.get("meta") or {}),
        )


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    state: str
    model: str | None
    family: str | None
    params: dict[str, Any]
    priority: int
    progress: dict[str, Any]
    outputs: list[Output]
    error: dict[str, Any] | None
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    metrics: dict[str, Any]
    result_model: str | None
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def is_done(self) -> bool:
        return self.state in TERMINAL_STATES

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        return cls(
            id=data["id"],
            kind=data.get("kind", ""),
            state=data["state"],
            model=data.get("model"),
            family=data.get("family"),
            params=dict(data.get("params") or {}),
            priority=int(data.get("priority") or 0),
            progress=dict(data.get("progress") or {}),
            outputs=[Output.from_json(o) for o in data.get("outputs") or []],
            error=data.get("error"),
            created_at=data.get("created_at"),
            started_at=data.get("started_at"),
            finished_at=data.get("finished_at"),
            metrics=dict(data.get("metrics") or {}),
            result_model=data.get("result_model"),
            raw=data,
        )


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event of a job: its id (for Last-Event-ID), type and data."""

    id: int
    type: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Model:
    name: str
    version: int
    ref: str
    family: str
    status: str
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Model:
        return cls(
            name=data["name"],
            version=int(data["version"]),
            ref=data["ref"],
            family=data["family"],
            status=data.get("status", "ready"),
            raw=data,
        )


@dataclass(frozen=True)
class Dataset:
    id: str
    name: str
    kind: str
    num_items: int
    size_bytes: int
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Dataset:
        return cls(
            id=data["id"],
            name=data["name"],
            kind=data["kind"],
            num_items=int(data.get("num_items") or 0),
            size_bytes=int(data.get("size_bytes") or 0),
            raw=data,
        )


@dataclass(frozen=True)
class Batch:
    id: str
    size: int
    counts: dict[str, int]
    jobs: list[Job]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Batch:
        return cls(
            id=data["id"],
            size=int(data["size"]),
            counts=dict(data.get("counts") or {}),
            jobs=[Job.from_json(j) for j in data.get("jobs") or []],
            raw=data,
        )
