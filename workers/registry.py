"""The one explicit list of model families. Adding a family is one line here."""

from __future__ import annotations

from core.errors import NotFoundError
from workers.families import (
    causal_lm_spec,
    charlm_spec,
    ddpm_spec,
    echo_spec,
    gan_spec,
    sd_spec,
    vae_spec,
)
from workers.families.base import Family

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        echo_spec.FAMILY,
        ddpm_spec.FAMILY,
        gan_spec.FAMILY,
        vae_spec.FAMILY,
        charlm_spec.FAMILY,
        sd_spec.FAMILY,
        causal_lm_spec.FAMILY,
    )
}


def get_family(name: str) -> Family:
    family = FAMILIES.get(name)
    if family is None:
        raise NotFoundError(f"no model family {name!r}")
    return family
