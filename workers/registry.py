"""The one table of model families: the built-in ones and the plug-ins installed packages name in
the `genq.families` entry point group, all loaded and checked the same way when a process (API,
scheduler, Ray worker) first imports this module.

An entry point names a `Family` (`ngram = "genq_family_ngram.spec:FAMILY"`), its name is the
family's name. One that fails to import, imports torch or ray into a process that had none
(the API must stay free of them), is not a `Family`, declares another interface version, fails
the checks of workers/families/conformance.py, or takes a name already taken, is logged and kept
in `BROKEN` with its error (`/v1/families` and the dashboard show it); genq runs without it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points

from core.errors import NotFoundError
from workers.families.base import Family
from workers.families.conformance import family_problems

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "genq.families"
BUILTIN_SOURCE = "genq (built in)"
# Libraries a spec module must not load: the API process has neither.
HEAVY_MODULES = ("torch", "ray")

BUILTINS = tuple(
    EntryPoint(name, f"workers.families.{module}:FAMILY", ENTRY_POINT_GROUP)
    for name, module in (
        ("echo", "echo_spec"),
        ("ddpm", "ddpm_spec"),
        ("gan", "gan_spec"),
        ("vae", "vae_spec"),
        ("charlm", "charlm_spec"),
        ("diffusers", "sd_spec"),
        ("transformers", "causal_lm_spec"),
    )
)


@dataclass(frozen=True)
class BrokenFamily:
    """A family genq found but does not use, and why."""

    name: str
    source: str
    error: str


@dataclass
class Registry:
    families: dict[str, Family] = field(default_factory=dict)
    # family name -> where it came from ("genq (built in)", "genq-family-ngram 0.1.0").
    sources: dict[str, str] = field(default_factory=dict)
    broken: dict[str, BrokenFamily] = field(default_factory=dict)


def source_of(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return BUILTIN_SOURCE
    return f"{dist.metadata['Name']} {dist.version}"


def _load(ep: EntryPoint, registry: Registry) -> Family:
    """The checked family `ep` names; raises ValueError (or what its import raised)."""
    before = {name for name in HEAVY_MODULES if name in sys.modules}
    family = ep.load()
    loaded = [name for name in HEAVY_MODULES if name in sys.modules and name not in before]
    if loaded:
        raise ValueError(
            f"importing its spec loaded {' and '.join(loaded)}, which the API process must not;"
            " import them in the implementation module only"
        )
    problems = family_problems(family)
    if problems:
        raise ValueError("; ".join(problems))
    if family.name != ep.name:
        raise ValueError(f"the entry point is named {ep.name!r} but the family {family.name!r}")
    if family.name in registry.families:
        raise ValueError(
            f"a family {family.name!r} already comes from {registry.sources[family.name]}"
        )
    return family


def load_families(eps: Iterable[EntryPoint]) -> Registry:
    """Load and check every entry point in order (the first of a name wins)."""
    registry = Registry()
    for ep in eps:
        source = source_of(ep)
        try:
            family = _load(ep, registry)
        except (Exception, SystemExit) as exc:  # a plug-in's import may raise anything
            error = f"{type(exc).__name__}: {exc}"
            log.warning("model family %r from %s is not loaded: %s", ep.name, source, error)
            key = ep.name if ep.name not in registry.broken else f"{ep.name} ({source})"
            registry.broken[key] = BrokenFamily(ep.name, source, error)
            continue
        registry.families[family.name] = family
        registry.sources[family.name] = source
        if source != BUILTIN_SOURCE:
            log.info("model family %r loaded from %s", family.name, source)
    return registry


def discover() -> Registry:
    """The built-in families, then every installed plug-in."""
    return load_families([*BUILTINS, *entry_points(group=ENTRY_POINT_GROUP)])


REGISTRY = discover()
FAMILIES = REGISTRY.families
BROKEN = REGISTRY.broken


def get_family(name: str) -> Family:
    family = FAMILIES.get(name)
    if family is None:
        broken = BROKEN.get(name)
        if broken is not None:
            raise NotFoundError(f"model family {name!r} is broken: {broken.error}")
        raise NotFoundError(f"no model family {name!r}")
    return family
