"""The typed events a worker yields while it runs a job.

Workers never touch SQL or Redis: they yield these, the scheduler records them. They cross the
Ray boundary by pickling, so they are plain frozen dataclasses of plain values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    message: str = ""


@dataclass(frozen=True)
class Log:
    message: str
    level: str = "info"


@dataclass(frozen=True)
class Metric:
    """Named values at a step, e.g. {"loss": 0.12, "samples_per_s": 310.0}."""

    step: int
    values: dict[str, float]


@dataclass(frozen=True)
class Output:
    """A file the job produced. `name` is unique within the job (image-0.png, sample-0100.png)."""

    name: str
    kind: str  # image | text | grid | file
    content_type: str
    data: bytes
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TextDelta:
    """The next piece of a text being generated, streamed as it is produced; `index` counts
    tokens from 0. The whole text also ends up in an Output."""

    index: int
    text: str


@dataclass(frozen=True)
class ModelSaved:
    """A training job saved its model: `path` is its folder (key) in the artifact store."""

    path: str
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Placement:
    """Where a job runs, sent first by the model server (replica) or trainer that took it: the
    Ray node (id, IP, hostname), the GPU ids Ray gave the actor and the actor's name. A server
    adds when it finished loading (`loaded_at`, Unix time) and how long that took (`load_s`),
    so a job that waited for the load reports a cold start."""

    node_id: str
    node_ip: str
    hostname: str
    gpu_ids: list[str]
    replica: str
    load_s: float | None = None
    loaded_at: float | None = None

    def as_row(self) -> dict[str, Any]:
        """What the job row keeps (GET /v1/jobs/{id} `placement`)."""
        return {
            "node_id": self.node_id,
            "node_ip": self.node_ip,
            "hostname": self.hostname,
            "gpu_ids": list(self.gpu_ids),
            "replica": self.replica,
        }


Event = Progress | Log | Metric | Output | ModelSaved | TextDelta | Placement


def event_type(event: Event) -> str:
    return {
        Progress: "progress",
        Log: "log",
        Metric: "metric",
        Output: "output",
        ModelSaved: "model",
        TextDelta: "text_delta",
        Placement: "placement",
    }[type(event)]


def without_nul(value: Any) -> Any:
    """`value` with each NUL (U+0000) in its strings and keys replaced by U+FFFD. What workers
    send (generated text, log lines, error messages) may hold one, and PostgreSQL stores it in
    neither text nor jsonb; the API refuses it in what people send (api/inputs.py)."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, dict):
        return {without_nul(k): without_nul(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [without_nul(v) for v in value]
    return value


def event_data(event: Event) -> dict[str, Any]:
    """The JSON-safe part of an event, as stored in job_event (an output's bytes are not)."""
    data = asdict(event)
    data.pop("data", None)
    return data
