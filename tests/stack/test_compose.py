"""compose.yaml cannot run here (no Docker engine), so check what can be checked: it parses,
it has the cluster's services, every genq command it names exists, every GENQ_ variable it
sets is a real setting, and its topology is the multi-host test's: no volume shared between
services (files live in object storage), each GPU service its own device, and workers that
join Ray with a node of their own."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from core.settings import Settings
from stack.cli import main as genq_cli

ROOT = Path(__file__).resolve().parents[2]


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


# -- monitoring: Prometheus and Grafana -----------------------------------------------------


def _dashboard() -> dict:  # type: ignore[type-arg]
    return json.loads((ROOT / "deploy/grafana/dashboards/genq.json").read_text())


def _exposed_names(tmp_path: Path) -> set[str]:
    """Every metric name GET /metrics writes (HELP and TYPE lines, even for empty families),
    from an app on an empty SQLite file; the cluster's figures need no live Redis to name."""
    from api.app import create_app
    from core.db import Database
    from core.keys import create_key, get_or_create_tenant
    from core.tables import Base

    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        var_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'genq.db'}",
        redis_url="redis://127.0.0.1:1/0",  # nothing listens: the scrape still names them all
        artifact_root=tmp_path / "artifacts",
        rate_limits=False,
    )
    database = Database(settings)
    Base.metadata.create_all(database.engine)
    with database.transaction() as session:
        _, key = create_key(session, get_or_create_tenant(session, "ops"), is_admin=True)
    client = create_app(settings, database=database).test_client()
    response = client.get("/metrics", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.get_data(as_text=True)
    names = set()
    for line in response.get_data(as_text=True).splitlines():
        if line.startswith(("# HELP ", "# TYPE ")):
            names.add(line.split()[2])
    database.dispose()
    return names


def test_prometheus_and_grafana_are_provisioned() -> None:
    services = _compose()["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    mounts = {str(v).split(":")[0]: str(v).split(":")[1] for v in prometheus["volumes"]}
    config_path = mounts["./deploy/prometheus/prometheus.yml"]
    assert f"--config.file={config_path}" in prometheus["command"]
    assert prometheus["secrets"] == ["metrics_token"]
    assert _compose()["secrets"]["metrics_token"]["environment"] == "GENQ_METRICS_TOKEN"
    assert services["api"]["environment"]["GENQ_METRICS_TOKEN"]
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["authorization"]["credentials_file"] == "/run/secrets/metrics_token"
    assert job["static_configs"][0]["targets"] == ["api:8000"]

    grafana_mounts = {str(v).split(":")[0]: str(v).split(":")[1] for v in grafana["volumes"]}
    assert grafana_mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/genq.yaml").read_text()
    )["providers"][0]
    assert grafana_mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    source = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/genq.yaml").read_text()
    )["datasources"][0]
    assert source["url"] == "http://prometheus:9090"
    uids = {
        target["datasource"]["uid"]
        for panel in _dashboard()["panels"]
        for target in panel.get("targets", [])
    }
    assert uids == {source["uid"]}


def test_every_metric_the_dashboard_queries_exists(tmp_path: Path) -> None:
    exprs = [
        target["expr"] for panel in _dashboard()["panels"] for target in panel.get("targets", [])
    ]
    wanted = {name for expr in exprs for name in re.findall(r"\bgenq_[a-z_]+", expr)}
    titles = {panel["title"] for panel in _dashboard()["panels"] if panel["type"] == "row"}
    assert {"Queues", "Waits and run times", "GPUs and model servers", "Failures",
            "Tenants"} <= titles  # fmt: skip
    exposed = _exposed_names(tmp_path)
    missing = set()
    for name in wanted:
        family = re.sub(r"_(bucket|count|sum)$", "", name)
        if name not in exposed and family not in exposed:
            missing.add(name)
    assert not missing, f"the dashboard queries metrics genq does not expose: {missing}"
    assert len(wanted) >= 20
