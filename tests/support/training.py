"""The tiny training jobs the end-to-end, browser and fault tests submit, and the few numbers
each test tunes (how long it trains, how often it checkpoints, its seed):

- gan's `tiny` preset on the built-in `digits` (or an uploaded image data set), for the tests
  whose point is genq's and that want images: its trainer and model server start on torch
  alone, where ddpm's import diffusers (about 4 CPU-seconds more for each process);
- ddpm's `tiny` preset, where the family is the point, with a sample grid of 2 denoising steps
  when training ends (not the default 50: the grid is not what these tests check);
- charlm's `tiny` preset on a small uploaded text (`TEXT`), for the tests whose point is
  genq's and that run on the fault harness (a trainer killed, preempted, canceled, resumed
  from its checkpoint): its trainer process starts on torch alone too."""

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


# A step of gan's tiny preset at 32 images costs what a step of ddpm's at 8 does (about 25 ms
# of CPU on the 2-core machine, both timed in one process), so a test that acts while a gan
# training runs has as long before its end as it had with ddpm.
GAN_BATCH_SIZE = 32


def tiny_gan_params(
    steps: int, checkpoint_every: int | None = None, seed: int | None = 1
) -> dict[str, Any]:
    """A gan train job's params at GAN_BATCH_SIZE (None: the family's default checkpoints, a
    random seed)."""
    return _tiny_params(steps, GAN_BATCH_SIZE, checkpoint_every, seed)


def tiny_ddpm_params(
    steps: int, batch_size: int, checkpoint_every: int | None = None, seed: int | None = 1
) -> dict[str, Any]:
    """A ddpm train job's params (None: the family's default checkpoints, a random seed)."""
    return {**_tiny_params(steps, batch_size, checkpoint_every, seed), "sample_steps": 2}


def _tiny_params(
    steps: int, batch_size: int, checkpoint_every: int | None, seed: int | None
) -> dict[str, Any]:
    params: dict[str, Any] = {"preset": "tiny", "steps": steps, "batch_size": batch_size}
    if checkpoint_every is not None:
        params["checkpoint_every"] = checkpoint_every
    if seed is not None:
        params["seed"] = seed
    return params


def tiny_gan_job(name: str, params: dict[str, Any], dataset: str = "digits") -> dict[str, Any]:
    """The body of `POST /v1/jobs` that trains the gan `name` on `dataset` with these params."""
    return _train_job("gan", name, params, dataset)


def tiny_ddpm_job(name: str, params: dict[str, Any], dataset: str = "digits") -> dict[str, Any]:
    """The body of `POST /v1/jobs` that trains the ddpm `name` on `dataset` with these params."""
    return _train_job("ddpm", name, params, dataset)


def _train_job(family: str, name: str, params: dict[str, Any], dataset: str) -> dict[str, Any]:
    return {"kind": "train", "family": family, "dataset": dataset, "name": name, "params": params}


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
