"""The API process stays small: importing it loads neither torch nor ray (DESIGN.md); a Ray
worker process loads no SQL for its actor; and the import contracts of docs/architecture.md hold
(import-linter, as `make lint` runs it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def loaded_of(module: str, names: tuple[str, ...]) -> str:
    """Which of `names` a fresh interpreter has loaded after `import module`."""
    code = (
        f"import sys, {module}\nprint(','.join(sorted(m for m in {names!r} if m in sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.mark.parametrize(
    "module",
    [
        "api",
        "api.app",
        "api.wsgi",
        "api.state",
        "stack.cli",
        "workers.registry",
        "scheduler.enqueue",
        # The periodic scheduler runs on the API host of a cluster, which has no Ray node.
        "scheduler.periodic",
    ],
)
def test_module_loads_neither_torch_nor_ray(module: str) -> None:
    out = loaded_of(module, ("torch", "ray", "diffusers"))
    assert out == "", f"import {module} loaded {out}"


def test_torch_is_really_detected() -> None:
    """The check above could pass by accident if sys.modules never showed torch."""
    assert loaded_of("workers.families.ddpm", ("torch",)) == "torch"


# What a Ray worker process has no use for: every model server, pool and trainer is a fresh
# Python that imports the module of its actor class (bench/actor_imports.py).
SQL = ("sqlalchemy", "core.tables", "core.db")


@pytest.mark.parametrize(
    "module",
    [
        "workers.server",
        "workers.pool",
        "workers.actors",
        "workers.replicas",
        "workers.families.echo",
    ],
)
def test_an_actor_module_loads_no_sql(module: str) -> None:
    assert loaded_of(module, SQL) == "", f"import {module} loaded SQL"


def test_sql_is_really_detected() -> None:
    """The check above could pass by accident if sys.modules never showed SQLAlchemy."""
    assert loaded_of("core.catalog", SQL) == "core.tables,sqlalchemy"


def test_the_client_imports_nothing_of_the_server() -> None:
    out = loaded_of("genq_client", ("core", "api", "scheduler", "workers", "torch", "ray", "flask"))
    assert out == "", f"import genq_client loaded {out}"


def test_the_import_contracts_hold() -> None:
    """Layers, the scheduler's door, no circles: [tool.importlinter] in pyproject.toml."""
    # The checkout's root, wherever the test layout puts this file.
    root = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
    lint_imports = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run(
        [str(lint_imports), "--no-logo", "--no-cache"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout
