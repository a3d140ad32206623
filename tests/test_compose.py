"""compose.yaml cannot run here (no Docker engine), so check what can be checked: it parses,
it has the cluster's services, every genq command it names exists, every GENQ_ variable it
sets is a real setting, and its topology is the multi-host test's: no volume shared between
services (files live in object storage), each GPU service its own device, and workers that
join Ray with a node of their own."""

from __future__ import annotations

from pathlib import Path

import yaml

from api.cli import main as genq_cli
from core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def _genq_services() -> dict:  # type: ignore[type-arg]
    return {n: s for n, s in _compose()["services"].items() if s.get("image") == "genq:latest"}


def _gpu_services() -> dict:  # type: ignore[type-arg]
    return {n: s for n, s in _genq_services().items() if s.get("command") == ["genq", "node"]}


def test_compose_has_the_cluster_services() -> None:
    services = _compose()["services"]
    expected = {"postgres", "redis", "minio", "minio-init", "api", "worker", "scheduler",
                "ray-head"}  # fmt: skip
    assert expected <= set(services)
    for name in ("postgres", "redis", "minio", "ray-head", "api"):
        assert "healthcheck" in services[name], name
    assert services["ray-head"]["command"] == ["genq", "node", "--head"]
    assert "mc mb" in " ".join(services["minio-init"]["command"])
    assert len(_gpu_services()) >= 2


def test_each_gpu_service_declares_only_its_own_gpu() -> None:
    seen = []
    for name, service in _gpu_services().items():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        assert devices[0]["capabilities"] == ["gpu"]
        assert "count" not in devices[0], f"{name}: count would give it every GPU"
        assert len(devices[0]["device_ids"]) == 1, name
        seen += devices[0]["device_ids"]
    assert len(seen) == len(set(seen)), f"a GPU is declared twice: {seen}"


def test_no_disk_is_shared_and_files_go_to_object_storage() -> None:
    compose = _compose()
    users: dict[str, list[str]] = {}
    for name, service in compose["services"].items():
        for volume in service.get("volumes") or []:
            users.setdefault(str(volume).split(":")[0], []).append(name)
    assert all(len(names) == 1 for names in users.values()), users
    for name, service in _genq_services().items():
        env = service["environment"]
        assert not service.get("volumes"), f"{name} mounts a volume"
        assert env["GENQ_ARTIFACT_URL"].startswith("s3://"), name
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000", name
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"], name


def test_workers_join_ray_with_a_node_of_their_own() -> None:
    services = _genq_services()
    worker = services["worker"]
    assert worker["command"] == ["genq", "worker"]
    assert worker["environment"].get("GENQ_WORKER_RAY_NODE", "auto") in ("auto", "start")
    assert worker["environment"]["GENQ_RAY_ADDRESS"] == "ray-head:6379"
    assert "deploy" not in worker  # no GPU: the jobs run on the GPU nodes


def test_every_command_exists() -> None:
    checked = 0
    for name, service in _genq_services().items():
        command = service.get("command")
        if not command:
            continue
        assert command[0] == "genq", name
        assert command[1] in genq_cli.commands, f"{name}: genq {command[1]} does not exist"
        checked += 1
    assert checked >= 7


def test_every_genq_variable_is_a_setting() -> None:
    services = _compose()["services"]
    fields = {f"GENQ_{name.upper()}" for name in Settings.model_fields}
    seen = set()
    for service in services.values():
        for var in service.get("environment") or {}:
            if var.startswith("GENQ_"):
                assert var in fields, f"{var} is not a genq setting"
                seen.add(var)
    assert {"GENQ_DATABASE_URL", "GENQ_REDIS_URL", "GENQ_RAY_ADDRESS", "GENQ_ARTIFACT_URL"} <= seen


def test_env_example_documents_every_setting() -> None:
    text = (ROOT / ".env.example").read_text()
    for name in Settings.model_fields:
        assert f"GENQ_{name.upper()}" in text, f"GENQ_{name.upper()} missing from .env.example"
