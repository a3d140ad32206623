"""The tiny ddpm training jobs the end-to-end, browser and fault tests submit: the `tiny`
preset, a sample grid of 2 denoising steps when training ends (not the default 50: the grid
is not what these tests check), and the few numbers each test tunes (how long it trains, how
often it checkpoints, its seed)."""

from __future__ import annotations

from typing import Any


def tiny_ddpm_params(
    steps: int, batch_size: int, checkpoint_every: int | None = None, seed: int | None = 1
) -> dict[str, Any]:
    """A ddpm train job's params (None: the family's default checkpoints, a random seed)."""
    params: dict[str, Any] = {"preset": "tiny", "steps": steps, "batch_size": batch_size}
    if checkpoint_every is not None:
        params["checkpoint_every"] = checkpoint_every
    if seed is not None:
        params["seed"] = seed
    return {**params, "sample_steps": 2}


def tiny_ddpm_job(name: str, params: dict[str, Any], dataset: str = "digits") -> dict[str, Any]:
    """The body of `POST /v1/jobs` that trains `name` on `dataset` with these params."""
    return {"kind": "train", "family": "ddpm", "dataset": dataset, "name": name, "params": params}
