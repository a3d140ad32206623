"""Plug-in families without a stack: discovery through the `genq.families` entry points of
installed distributions (the example `ngram` package, and broken ones that must be reported
and not stop genq), the interface checks, the public contract tests run over built-in
families, and language-model progress coalescing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from core.events import Progress
from workers.families.base import (
    GENQ_FAMILY_API,
    DatasetRef,
    Family,
    RunContext,
    TokenProgress,
    TrainContext,
)
from workers.familytest import ContractCase, FamilyCheckError, check_family, contract_checks
from workers.registry import BROKEN, FAMILIES, REGISTRY

ROOT = Path(__file__).resolve().parents[2]

DISCOVER = """
import json, sys
import workers.registry as r
print(json.dumps({
    "ok": {name: r.REGISTRY.sources[name] for name in r.FAMILIES},
    "broken": {k: [b.name, b.source, b.error] for k, b in r.BROKEN.items()},
    "heavy": [m for m in ("torch", "ray") if m in sys.modules],
}))
"""


def discover_in(site: Path) -> dict:
    """What a fresh process (as the API starts) discovers with `site` installed."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run(
        [sys.executable, "-c", DISCOVER], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.splitlines()[-1]))


def test_builtins_and_the_installed_example_load_from_one_table() -> None:
    builtins = {"echo", "ddpm", "gan", "vae", "charlm", "diffusers", "transformers"}
    assert builtins | {"ngram"} <= set(FAMILIES)
    assert {REGISTRY.sources[name] for name in builtins} == {"genq (built in)"}
    assert REGISTRY.sources["ngram"] == "genq-family-ngram 0.1.0"
    assert not BROKEN
    # Layout checks of registrable folders are on the family, not in a table of the API's.
    assert {n for n, f in FAMILIES.items() if f.check_layout} == {"diffusers", "transformers"}


def test_broken_plugins_are_reported_and_the_rest_still_loads(
    plugin_site: Callable[[list[str]], Path],
) -> None:
    site = plugin_site(["crashes", "exits", "future", "echo", "renamed", "loose", "dict", "heavy"])
    found = discover_in(site)
    assert {"echo", "charlm", "diffusers", "ngram"} <= set(found["ok"])
    assert found["ok"]["echo"] == "genq (built in)"  # a plug-in cannot take a built-in's name
    broken = {k: (name, error) for k, (name, source, error) in found["broken"].items()}
    assert {source for _, source, _ in found["broken"].values()} == {"genq-test-plugins 1.0"}
    assert broken["crashes"] == (
        "crashes",
        "ImportError: libfoo.so.1: cannot open shared object file",
    )
    assert broken["exits"] == ("exits", "SystemExit: 3")
    assert "written for family interface 99; this genq implements 1" in broken["future"][1]
    assert "already comes from genq (built in)" in broken["echo"][1]
    assert "entry point is named 'renamed' but the family 'echo'" in broken["renamed"][1]
    assert "not a genq Family" in broken["dict"][1]
    loose = broken["loose"][1]
    assert "must refuse unknown fields" in loose and "dataset_kinds" in loose
    assert "needs generate_params and a batch_key" in loose
    # The spec that imports torch is refused: the API process must stay without it.
    assert "importing its spec loaded torch" in broken["heavy"][1]
    assert "future" not in found["ok"] and "loose" not in found["ok"]


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = 0


def test_check_family_lists_every_problem() -> None:
    good = Family(name="good", description="d", implementation="a.b", generate_params=Params)
    assert check_family(good) is good
    bad = Family(
        name="Bad Name",
        description=" ",
        implementation="not a module",
        train_params=Params,
        max_batch_size=0,
    )
    with pytest.raises(FamilyCheckError) as info:
        check_family(bad)
    problems = " | ".join(info.value.problems)
    for expected in (
        "name 'Bad Name'",
        "description is empty",
        "is not a module path",
        "dataset_kinds",
        "max_batch_size 0",
    ):
        assert expected in problems
    with pytest.raises(FamilyCheckError, match="fails to import"):
        check_family(good, implementation=True)
    assert GENQ_FAMILY_API == 1


@pytest.mark.parametrize(
    "name", ["echo", "ddpm", "gan", "vae", "charlm", "diffusers", "transformers", "ngram"]
)
def test_every_builtin_family_meets_the_interface(name: str) -> None:
    check_family(FAMILIES[name], implementation=True)


BUILTIN_CASES = {
    "charlm": ContractCase(
        train={"preset": "tiny", "steps": 6, "batch_size": 8, "checkpoint_every": 4, "seed": 3},
        generate={"prompt": "Return the ", "max_tokens": 24, "top_k": 20},
        bad_generate={"temperature": -1},
        checkpoint_step=4,
    ),
    "ddpm": ContractCase(
        train={
            "preset": "tiny",
            "steps": 6,
            "batch_size": 8,
            "checkpoint_every": 4,
            "seed": 3,
            "sample_steps": 2,
        },
        generate={"label": 3, "num_images": 2, "steps": 4},
        bad_generate={"steps": 0},
        checkpoint_step=4,
    ),
}


@pytest.mark.parametrize(
    ("name", "check"),
    [(n, c) for n in BUILTIN_CASES for c in contract_checks(FAMILIES[n])],
    ids=lambda v: v if isinstance(v, str) else v.__name__,
)
def test_builtin_families_pass_the_public_contract(name: str, check, tmp_path: Path) -> None:
    check(FAMILIES[name], BUILTIN_CASES[name], tmp_path)


def test_token_progress_is_coalesced_and_ends_complete() -> None:
    every = TokenProgress(100, interval_s=0.0)
    assert [every.after(n) for n in (1, 2)] == [
        Progress(1, 100, "tokens"),
        Progress(2, 100, "tokens"),
    ]
    assert every.after(100) is None  # the last one is done()'s
    held = TokenProgress(100, interval_s=3600.0)
    assert [held.after(n) for n in range(1, 100)] == [None] * 99
    assert held.done(37) == Progress(37, 37, "tokens")  # stopped early: complete


def test_charlm_generation_reports_tokens_made_of_max_tokens(tmp_path: Path) -> None:
    impl = FAMILIES["charlm"].load_implementation()
    ctx = TrainContext(
        job_id="t",
        device="cpu",
        dataset=DatasetRef("pydocs", "text", None),
        checkpoint_dir=tmp_path / "c",
        model_dir=tmp_path / "m",
        model_dir_rel="m",
    )
    saved = list(impl.train({"preset": "tiny", "steps": 2, "batch_size": 4}, ctx))[-1]
    model = impl.load(ctx.model_dir, saved.config, "cpu")
    events = list(model.generate({"max_tokens": 40, "seed": 1}, RunContext("g", "cpu")))
    progress = [e for e in events if isinstance(e, Progress)]
    assert progress[-1] == Progress(40, 40, "tokens")
    assert all(p.total == 40 and p.step <= 40 for p in progress)
