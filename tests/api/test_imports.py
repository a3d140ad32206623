"""The API process stays small: importing it loads neither torch nor ray (DESIGN.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module",
    [
        "api",
        "api.app",
        "api.wsgi",
        "api.cli",
        "workers.registry",
        "scheduler.enqueue",
        # The periodic scheduler runs on the API host of a cluster, which has no Ray node.
        "scheduler.periodic",
    ],
)
def test_module_loads_neither_torch_nor_ray(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'diffusers') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"import {module} loaded {out}"


def test_torch_is_really_detected() -> None:
    """The check above could pass by accident if sys.modules never showed torch."""
    code = "import sys, workers.families.ddpm\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_the_client_imports_nothing_of_the_server() -> None:
    code = (
        "import sys, genq_client\n"
        "server = ('core', 'api', 'scheduler', 'workers', 'torch', 'ray', 'flask')\n"
        "print(','.join(sorted(m for m in server if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import genq_client loaded {out.stdout.strip()}"
