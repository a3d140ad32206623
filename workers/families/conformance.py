"""The checks a family passes before genq uses it, built in or plug-in: its `Family` against the
interface (workers/families/base.py), without torch, so the API process runs them at discovery;
and its implementation module's functions, which only a worker imports. A family that fails
them is reported (workers/registry.py), never loaded. workers/familytest.py runs the same checks
in a plug-in's own tests, with the contract tests that train and generate."""

from __future__ import annotations

import importlib
import math
import re
from typing import Any

from pydantic import BaseModel

from core.states import JobKind
from workers.families.base import GENQ_FAMILY_API, Family, Resources, Scaling

# A family name is part of the public API (job bodies name it, model rows store it).
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
MODULE_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
DATASET_KIND_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class FamilyCheckError(Exception):
    """A family does not meet the interface; `problems` says every way in which."""

    def __init__(self, name: str, problems: list[str]) -> None:
        super().__init__(f"family {name!r}: " + "; ".join(problems))
        self.name = name
        self.problems = problems


def _params_problems(kind: JobKind, spec: Any) -> list[str]:
    where = f"{kind} parameters"
    if not (isinstance(spec, type) and issubclass(spec, BaseModel)):
        return [f"{where}: {spec!r} is not a pydantic model class"]
    problems = []
    if spec.model_config.get("extra") != "forbid":
        problems.append(f"{where}: {spec.__name__} must refuse unknown fields (extra='forbid')")
    try:
        spec.model_json_schema()
    except Exception as exc:  # the API lists every family's schema
        problems.append(f"{where}: no JSON schema ({type(exc).__name__}: {exc})")
    return problems


def _number_problems(what: str, values: dict[str, Any]) -> list[str]:
    return [
        f"{what}.{key} is {value!r}, not a number >= 0"
        for key, value in values.items()
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0
    ]


def family_problems(family: Any) -> list[str]:
    """Every way `family` fails the interface (empty: it passes). Imports nothing heavy."""
    if not isinstance(family, Family):
        return [f"{type(family).__name__} is not a genq Family (workers.families.base.Family)"]
    if family.api_version != GENQ_FAMILY_API:
        return [
            f"written for family interface {family.api_version!r}; this genq implements"
            f" {GENQ_FAMILY_API}"
        ]
    problems = []
    if not isinstance(family.name, str) or not NAME_PATTERN.match(family.name):
        problems.append(f"name {family.name!r} is not lowercase letters, digits, - and _")
    if not isinstance(family.description, str) or not family.description.strip():
        problems.append("description is empty")
    if not isinstance(family.implementation, str) or not MODULE_PATTERN.match(
        family.implementation
    ):
        problems.append(f"implementation {family.implementation!r} is not a module path")
    kinds = [kind for kind in JobKind if family.params_for(kind) is not None]
    if not kinds:
        problems.append("no job kind: set generate_params, train_params or finetune_params")
    for kind in kinds:
        problems += _params_problems(kind, family.params_for(kind))
    trains = family.train_params is not None or family.finetune_params is not None
    if trains and not family.dataset_kinds:
        problems.append("a family that trains names the data set kinds it reads (dataset_kinds)")
    for dataset_kind in family.dataset_kinds:
        if not isinstance(dataset_kind, str) or not DATASET_KIND_PATTERN.match(dataset_kind):
            problems.append(f"data set kind {dataset_kind!r} is not a lowercase word")
    if isinstance(family.resources, Resources):
        problems += _number_problems("resources", vars(family.resources))
    else:
        problems.append("resources is not a workers.families.base.Resources")
    if isinstance(family.scaling, Scaling):
        s = family.scaling
        problems += _number_problems("scaling", s.as_dict())
        if not (isinstance(s.max_replicas, int) and s.max_replicas >= 1):
            problems.append("scaling.max_replicas is below 1")
        elif not (isinstance(s.min_replicas, int) and s.min_replicas <= s.max_replicas):
            problems.append("scaling.min_replicas is above max_replicas")
        if not s.target_jobs_per_replica > 0:
            problems.append("scaling.target_jobs_per_replica is not above 0")
    else:
        problems.append("scaling is not a workers.families.base.Scaling")
    for name in ("check_model_params", "check_layout", "batch_key"):
        value = getattr(family, name)
        if value is not None and not callable(value):
            problems.append(f"{name} is not callable")
    if not isinstance(family.max_batch_size, int) or family.max_batch_size < 1:
        problems.append(f"max_batch_size {family.max_batch_size!r} is not a whole number >= 1")
    elif family.max_batch_size > 1:
        problems += _batch_problems(family)
    return problems


def _batch_problems(family: Family) -> list[str]:
    if family.generate_params is None or not callable(family.batch_key):
        return ["a family with max_batch_size > 1 needs generate_params and a batch_key"]
    return []


def implementation_problems(family: Family) -> list[str]:
    """What is wrong with the implementation module (imports it: torch and all; workers only)."""
    try:
        module = importlib.import_module(family.implementation)
    except Exception as exc:
        return [
            f"implementation {family.implementation} fails to import: {type(exc).__name__}: {exc}"
        ]
    problems = []
    if not callable(getattr(module, "load", None)):
        problems.append(f"{family.implementation} has no load(model_dir, config, device)")
    trains = family.train_params is not None or family.finetune_params is not None
    if trains and not callable(getattr(module, "train", None)):
        problems.append(f"{family.implementation} has no train(params, ctx)")
    return problems


def check_family(family: Any, *, implementation: bool = False) -> Family:
    """`family` if it meets the interface (and, with `implementation`, its module too); else
    FamilyCheckError listing every problem."""
    problems = family_problems(family)
    if not problems and implementation:
        problems = implementation_problems(family)
    if problems:
        raise FamilyCheckError(str(getattr(family, "name", "?")), problems)
    return family
