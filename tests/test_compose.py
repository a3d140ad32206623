"""compose.yaml cannot run here (no Docker engine), so check what can be checked: it parses,
it has the cluster's services, every genq command it names exists, every GENQ_ variable it
sets is a real setting, and the GPU worker reserves a device."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from api.cli import main as genq_cli
from core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_has_the_cluster_services() -> None:
    services = _compose()["services"]
    expected = {"postgres", "redis", "api", "worker", "scheduler", "ray-head", "ray-worker"}
    assert expected <= set(services)
    for name in ("postgres", "redis", "ray-head", "api"):
        assert "healthcheck" in services[name], name
    devices = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_every_command_exists() -> None:
    services = _compose()["services"]
    ray = shutil.which("ray") or str(Path(__import__("sys").executable).parent / "ray")
    checked = 0
    for name, service in services.items():
        command = service.get("command")
        if not command:
            continue
        if command[0] == "genq":
            assert command[1] in genq_cli.commands, f"{name}: genq {command[1]} does not exist"
            checked += 1
        elif command[0] == "ray":
            assert Path(ray).exists()
            assert command[1] == "start"
            checked += 1
    assert checked >= 6


def test_every_genq_variable_is_a_setting() -> None:
    services = _compose()["services"]
    fields = {f"GENQ_{name.upper()}" for name in Settings.model_fields}
    seen = set()
    for service in services.values():
        for var in service.get("environment") or {}:
            if var.startswith("GENQ_"):
                assert var in fields, f"{var} is not a genq setting"
                seen.add(var)
    assert {"GENQ_DATABASE_URL", "GENQ_REDIS_URL", "GENQ_RAY_ADDRESS"} <= seen


def test_env_example_documents_every_setting() -> None:
    text = (ROOT / ".env.example").read_text()
    for name in Settings.model_fields:
        assert f"GENQ_{name.upper()}" in text, f"GENQ_{name.upper()} missing from .env.example"
