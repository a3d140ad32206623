"""The `echo` family: a diagnostic model that returns its message. Health checks use it, and
the benchmarks use it to measure the queue's own overhead."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from workers.families.base import Family, Resources, Scaling


class EchoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str = Field("hello", max_length=10_000, description="Text returned as the output.")
    delay_s: float = Field(0.0, ge=0, le=3600, description="Seconds to wait before answering.")
    progress_steps: int = Field(
        0, ge=0, le=1000, description="Progress events to emit, spread over delay_s."
    )
    fail: bool = Field(False, description="Fail with a model error instead (for testing).")


FAMILY = Family(
    name="echo",
    description="Diagnostic model: returns its message as a text output.",
    implementation="workers.families.echo",
    generate_params=EchoParams,
    resources=Resources(num_gpus=0.0, num_cpus=0.0),
    scaling=Scaling(max_replicas=4, target_jobs_per_replica=2.0),
)
