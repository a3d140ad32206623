"""The checks and contract tests every genq model family passes, for a plug-in's own test suite
(and genq's, over the built-in families). No Ray, no server: the family's functions are called
as a worker calls them.

    from genq_family_x.spec import FAMILY
    from workers.familytest import ContractCase, check_family, contract_checks

    CASE = ContractCase(train={"steps": 6, "checkpoint_every": 4}, generate={"max_tokens": 8},
                        bad_generate={"max_tokens": 0}, checkpoint_step=4)

    def test_family_meets_the_interface():
        check_family(FAMILY, implementation=True)

    @pytest.mark.parametrize("check", contract_checks(FAMILY), ids=lambda c: c.__name__)
    def test_contract(check, tmp_path):
        check(FAMILY, CASE, tmp_path)

`run_contract(FAMILY, CASE, tmp_path)` runs them all in one go. A check that fails raises
AssertionError saying what the family did instead.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from core.events import Event, ModelSaved, Output, Progress
from workers.families.base import CanceledError, DatasetRef, Family, RunContext, TrainContext
from workers.families.conformance import FamilyCheckError, check_family

__all__ = [
    "ContractCase",
    "FamilyCheckError",
    "check_family",
    "contract_checks",
    "run_contract",
]

# Files a model or checkpoint may never be: pickles run code when loaded.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


@dataclass(frozen=True)
class ContractCase:
    """What the contract runs the family with: small enough to train and generate in seconds
    on a CPU."""

    # Training parameters (a family that trains), a few steps of its smallest model.
    train: dict[str, Any] = field(default_factory=dict)
    # Generation parameters, without `seed` (the contract sets it).
    generate: dict[str, Any] = field(default_factory=dict)
    # Merged into `generate`, refused by the family's generate params.
    bad_generate: dict[str, Any] = field(default_factory=dict)
    # The training data set; the built-in `pydocs` (text) or `digits` (images) by default.
    dataset: DatasetRef | None = None
    # A step at which `train` writes a checkpoint (< train's steps): the resume check stops a
    # run there and restarts it. None: no resume check.
    checkpoint_step: int | None = None
    # The model folder to load for generation by a family that does not train (None: load
    # from nothing, like `echo`).
    model_dir: Path | None = None
    model_config: dict[str, Any] = field(default_factory=dict)


def _dataset(family: Family, case: ContractCase) -> DatasetRef:
    if case.dataset is not None:
        return case.dataset
    if "text" in family.dataset_kinds:
        return DatasetRef("pydocs", "text", None)
    return DatasetRef("digits", "images", None)


def _train_ctx(family: Family, case: ContractCase, root: Path, job_id: str, **kw: Any) -> Any:
    return TrainContext(
        job_id=job_id,
        device="cpu",
        dataset=_dataset(family, case),
        checkpoint_dir=root / "checkpoints" / job_id,
        model_dir=root / "models" / job_id,
        model_dir_rel=f"models/{job_id}",
        **kw,
    )


def _loaded(family: Family, case: ContractCase, root: Path) -> Any:
    """The family's model: trained here (a family that trains) or loaded from the case."""
    impl = family.load_implementation()
    if family.train_params is None:
        return impl.load(case.model_dir, dict(case.model_config), "cpu")
    ctx = _train_ctx(family, case, root, "contract-train")
    saved = list(impl.train(dict(case.train), ctx))[-1]
    assert isinstance(saved, ModelSaved), f"training ended with {saved!r}, not ModelSaved"
    return impl.load(ctx.model_dir, saved.config, "cpu")


def _outputs(events: list[Event]) -> list[bytes]:
    return [e.data for e in events if isinstance(e, Output)]


def _generate(model: Any, case: ContractCase, seed: int, **ctx: Any) -> list[Event]:
    return list(model.generate({**case.generate, "seed": seed}, RunContext("gen", "cpu", **ctx)))


# -- the checks -------------------------------------------------------------------------------


def check_interface(family: Family, case: ContractCase, root: Path) -> None:
    """The Family meets the interface and its implementation module has its functions."""
    try:
        check_family(family, implementation=True)
    except FamilyCheckError as exc:
        raise AssertionError(str(exc)) from None


def check_spec_is_light(family: Family, case: ContractCase, root: Path) -> None:
    """Importing the family's spec loads neither torch nor ray (the API process imports it)."""
    modules = sorted(
        {spec.__module__ for spec in (family.generate_params, family.train_params) if spec}
        | {spec.__module__ for spec in (family.finetune_params,) if spec}
    )
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "heavy = [m for m in ('torch', 'ray') if m in sys.modules]\n"
        + "assert not heavy, f'importing the spec loaded {heavy}'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def check_params_are_refused(family: Family, case: ContractCase, root: Path) -> None:
    """Unknown and out-of-range parameters fail validation (the API answers 422)."""
    for kind, spec in (("generate", family.generate_params), ("train", family.train_params)):
        if spec is None:
            continue
        try:
            spec.model_validate({"no_such_parameter": 1})
        except ValidationError:
            pass
        else:
            raise AssertionError(f"{kind} params accept an unknown field")
    if case.bad_generate and family.generate_params is not None:
        try:
            family.generate_params.model_validate({**case.generate, **case.bad_generate})
        except ValidationError:
            return
        raise AssertionError(f"generate params accept {case.bad_generate}")


def check_training(family: Family, case: ContractCase, root: Path) -> None:
    """Training reports every step as progress, ends by saving a model, pickles nothing."""
    if family.train_params is None:
        return
    ctx = _train_ctx(family, case, root, "contract-steps")
    events = list(family.load_implementation().train(dict(case.train), ctx))
    steps = [e.step for e in events if isinstance(e, Progress)]
    total = family.train_params.model_validate(case.train).model_dump().get("steps")
    assert steps == list(range(1, len(steps) + 1)), f"progress steps {steps} skip or repeat"
    if total is not None:
        assert steps[-1:] == [total], f"progress ends at {steps[-1:]}, not step {total}"
    assert isinstance(events[-1], ModelSaved), f"training ended with {events[-1]!r}"
    assert events[-1].path == ctx.model_dir_rel, "ModelSaved names another folder"
    assert ctx.model_dir.is_dir() and any(ctx.model_dir.iterdir()), "the model folder is empty"
    pickles = [p.name for p in root.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    assert not pickles, f"pickled files written: {pickles} (use safetensors)"


def check_seeded_generation(family: Family, case: ContractCase, root: Path) -> None:
    """Outputs exist; the same seed gives the same bytes, another seed other bytes."""
    if family.generate_params is None:
        return
    model = _loaded(family, case, root)
    first, again, other = (_outputs(_generate(model, case, s)) for s in (11, 11, 12))
    assert first and all(first), "generation produced no output"
    assert first == again, "the same seed gave different outputs"
    assert first != other, "another seed gave the same outputs"


def check_cancel(family: Family, case: ContractCase, root: Path) -> None:
    """A generate job whose cancel was asked stops with CanceledError."""
    if family.generate_params is None:
        return
    model = _loaded(family, case, root)
    try:
        _generate(model, case, 11, is_canceled=lambda: True)
    except CanceledError:
        return
    raise AssertionError("a canceled job ran to its end")


def check_resume(family: Family, case: ContractCase, root: Path) -> None:
    """A training run stopped after a checkpoint restarts from it, not from step 1."""
    if family.train_params is None or case.checkpoint_step is None:
        return
    impl, at = family.load_implementation(), case.checkpoint_step
    seen: list[Event] = []
    stopped = _train_ctx(
        family,
        case,
        root,
        "contract-resume",
        is_canceled=lambda: any(isinstance(e, Progress) and e.step >= at for e in seen),
    )
    try:
        for event in impl.train(dict(case.train), stopped):
            seen.append(event)
    except CanceledError:
        pass
    else:
        raise AssertionError(f"training ignored its cancel after step {at}")
    resumed = list(impl.train(dict(case.train), _train_ctx(family, case, root, "contract-resume")))
    steps = [e.step for e in resumed if isinstance(e, Progress)]
    assert steps and steps[0] == at + 1, (
        f"the restarted run took steps {steps[:3]}..., not {at + 1}"
    )
    assert isinstance(resumed[-1], ModelSaved)


def check_batching(family: Family, case: ContractCase, root: Path) -> None:
    """A batch gives each job exactly what it gets alone; a job canceled in a batch stops alone."""
    if not family.is_batching or family.generate_params is None:
        return
    model = _loaded(family, case, root)
    assert hasattr(model, "generate_batch"), "a batching family's model has no generate_batch"
    seeds = (21, 22, 23)
    alone = {s: _outputs(_generate(model, case, s)) for s in seeds}
    keys = {family.batch_key(family.generate_params.model_validate(case.generate))}  # type: ignore[misc]
    assert None not in keys, "the contract's generate params cannot batch (batch_key None)"

    def batch(canceled: int | None) -> dict[int, list[Any]]:
        jobs = [
            (
                {**case.generate, "seed": s},
                RunContext(f"job-{i}", "cpu", is_canceled=lambda i=i: i == canceled),
            )
            for i, s in enumerate(seeds)
        ]
        items: dict[int, list[Any]] = {i: [] for i in range(len(seeds))}
        for index, item in model.generate_batch(jobs):
            for i in items if index is None else [index]:
                items[i].append(item)
        return items

    together = batch(None)
    for i, s in enumerate(seeds):
        got = [e.data for e in together[i] if isinstance(e, Output)]
        assert got == alone[s], f"job {i} got other outputs in a batch than alone"
    with_cancel = batch(1)
    assert any(isinstance(e, CanceledError) for e in with_cancel[1]), "job 1 was not canceled"
    assert not _outputs([e for e in with_cancel[1] if not isinstance(e, BaseException)])
    for i in (0, 2):
        got = [e.data for e in with_cancel[i] if isinstance(e, Output)]
        assert got == alone[seeds[i]], f"job {i} changed when job 1 of its batch was canceled"


Check = Callable[[Family, ContractCase, Path], None]
CHECKS: tuple[Check, ...] = (
    check_interface,
    check_spec_is_light,
    check_params_are_refused,
    check_training,
    check_seeded_generation,
    check_cancel,
    check_resume,
    check_batching,
)


def contract_checks(family: Family) -> list[Check]:
    """The checks that apply to `family` (for pytest.mark.parametrize)."""
    applies = [check_interface, check_spec_is_light, check_params_are_refused]
    if family.train_params is not None:
        applies += [check_training, check_resume]
    if family.generate_params is not None:
        applies += [check_seeded_generation, check_cancel]
    if family.is_batching:
        applies.append(check_batching)
    return applies


def run_contract(family: Family, case: ContractCase, root: Path) -> None:
    """Every check that applies to `family`, each in its own folder under `root`."""
    for check in contract_checks(family):
        check(family, case, root / check.__name__)
