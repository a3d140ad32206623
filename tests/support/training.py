"""The tiny training jobs the end-to-end, browser and fault tests submit, and the few numbers
each test tunes (how long it trains, how often it checkpoints, its seed):

- ddpm's `tiny` preset, with a sample grid of 2 denoising steps when training ends (not the
  default 50: the grid is not what these tests check);
- charlm's `tiny` preset on a small uploaded text (`TEXT`), for the tests whose point is
  genq's and not the family's (a trainer killed, preempted, canceled, resumed from its
  checkpoint): its trainer process starts on torch alone, where ddpm's imports diffusers
  (~5 CPU-s, and its digits data set, before its first step)."""

from __future__ import annotations

from typing import Any

# ~5 KB: a few hundred windows of charlm's tiny block (32 bytes), 5% of it held out.
TEXT = ("The quick brown fox jumps over the lazy dog. " * 120).encode()
# Rows per charlm step: at 8 rows a step of charlm's tiny preset is ~2 ms of CPU, at 256 ~30
# ms, what a step of ddpm's tiny preset at 8 images costs (~27 ms), so that a test that acts
# while a training runs (kills it, pauses it) has as long before its end as it had with ddpm.
# (At 128 rows, ~17 ms, an idle machine once ran the 48 steps between the sight of step 12
# and the kill of tests/faults/test_faults.py.)
CHARLM_BATCH_SIZE = 256


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


def tiny_charlm_job(
    name: str, steps: int, checkpoint_every: int, dataset: str, seed: int = 1
) -> dict[str, Any]:
    """The body of `POST /v1/jobs` that trains charlm's tiny preset as `name` on the text data
    set `dataset` (an upload of `TEXT`)."""
    params = {
        "preset": "tiny",
        "steps": steps,
        "batch_size": CHARLM_BATCH_SIZE,
        "checkpoint_every": checkpoint_every,
        "seed": seed,
    }
    return {"kind": "train", "family": "charlm", "dataset": dataset, "name": name, "params": params}
