"""The `ngram` family's own tests: genq's family checks and contract tests (workers.familytest,
the same ones genq's built-in families pass), and what is particular to this model."""

from __future__ import annotations

from pathlib import Path

import pytest
from genq_family_ngram.spec import FAMILY

from core.events import Metric, Output, Progress, TextDelta
from workers.families.base import DatasetRef, RunContext, TrainContext
from workers.familytest import ContractCase, check_family, contract_checks

CASE = ContractCase(
    train={"steps": 12, "batch_size": 32, "checkpoint_every": 5, "seed": 1},
    generate={"prompt": "def ", "max_tokens": 24},
    bad_generate={"max_tokens": 0},
    checkpoint_step=5,
)


def test_the_family_meets_the_interface() -> None:
    assert check_family(FAMILY, implementation=True) is FAMILY


@pytest.mark.parametrize("check", contract_checks(FAMILY), ids=lambda c: c.__name__)
def test_contract(check, tmp_path: Path) -> None:
    check(FAMILY, CASE, tmp_path)


def test_training_lowers_the_loss_and_generation_reports_tokens(tmp_path: Path) -> None:
    (tmp_path / "text.txt").write_text("abcabcabcabc " * 200)
    ctx = TrainContext(
        job_id="t",
        device="cpu",
        dataset=DatasetRef("abc", "text", tmp_path / "text.txt"),
        checkpoint_dir=tmp_path / "ckpt",
        model_dir=tmp_path / "model",
        model_dir_rel="model",
    )
    impl = FAMILY.load_implementation()
    params = {"steps": 60, "batch_size": 64, "learning_rate": 0.02, "checkpoint_every": 60}
    events = list(impl.train(params, ctx))
    losses = [e.values["loss"] for e in events if isinstance(e, Metric)]
    assert losses[-1] < losses[0] / 2, losses
    model = impl.load(ctx.model_dir, events[-1].config, "cpu")
    out = list(
        model.generate(
            {"prompt": "abc", "max_tokens": 12, "temperature": 0}, RunContext("g", "cpu")
        )
    )
    text = "".join(e.text for e in out if isinstance(e, TextDelta))
    assert len(text) == 12 and set(text) <= set("abc "), text  # it learned the alphabet
    assert out[-1].data.decode() == text and isinstance(out[-1], Output)
    progress = [e for e in out if isinstance(e, Progress)]
    assert progress[-1] == Progress(12, 12, "tokens")
    assert all(p.step <= p.total for p in progress)
