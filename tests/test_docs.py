"""The docs site and the generated pages: the site builds in strict mode (a broken link or
anchor fails), the settings page lists every setting, the API reference every operation, and
bench/README.md's tables are the committed results' (bench/report.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from core.settings import Settings

# The checkout: the folder above this file's that holds mkdocs.yml (wherever the tests live).
ROOT = next(p for p in Path(__file__).resolve().parents if (p / "mkdocs.yml").exists())


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def _load_hook(name: str) -> ModuleType:
    """A module of docs/hooks/, loaded as MkDocs loads the hook: with its folder on the import
    path, where it finds its siblings."""
    folder = ROOT / "docs" / "hooks"
    saved = sys.path.copy()
    sys.path.insert(0, str(folder))
    try:
        return _load(f"genq_docs_{name}", folder / f"{name}.py")
    finally:
        sys.path[:] = saved


@pytest.fixture(scope="module")
def hooks() -> ModuleType:
    return _load_hook("genq_docs")


@pytest.fixture(scope="module")
def reference_pages() -> ModuleType:
    return _load_hook("reference_pages")


@pytest.fixture(scope="module")
def report() -> ModuleType:
    return _load("genq_bench_report", ROOT / "bench" / "report.py")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built as `make docs` builds it, into a temporary folder."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    return out


def _text(page: Path) -> str:
    return re.sub(r"<[^>]+>", " ", page.read_text())


def test_the_site_builds_in_strict_mode_with_every_page(site: Path) -> None:
    assert (site / "index.html").exists()
    for page in [
        "api",
        "reliability",
        "scheduling",
        "webhooks",
        "families",
        "pretrained",
        "datasets",
        "dashboard",
        "cluster",
        "operating",
        "security",
        "batching",
        "openai",
        "python-client",
        "settings",
        "tests",
        "benchmarks",
        "reference",
        "reference/schemas",
    ]:
        assert (site / page / "index.html").exists(), page
    # The front page is the README, its links pointed at the site's pages.
    front = (site / "index.html").read_text()
    assert "The API at a glance" in front
    assert 'href="api/"' in front and 'href="benchmarks/"' in front


def test_a_broken_link_fails_the_strict_build(tmp_path: Path) -> None:
    """The strict build is what catches broken links: prove it fails on one."""
    config = (ROOT / "mkdocs.yml").read_text()
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\n[gone](missing.md) and [anchor](#nowhere)\n")
    # The same validation rules, without genq's pages and hook.
    rules = config[config.index("validation:") : config.index("nav:")]
    (tmp_path / "mkdocs.yml").write_text(f"site_name: t\nstrict: true\n{rules}")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict"],
        cwd=tmp_path,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode != 0
    assert "missing.md" in build.stderr and "nowhere" in build.stderr


def test_the_settings_page_lists_every_setting(reference_pages: ModuleType, site: Path) -> None:
    table = reference_pages.settings_table()
    page = _text(site / "settings" / "index.html")
    for name in Settings.model_fields:
        variable = f"GENQ_{name.upper()}"
        assert f"`{variable}`" in table, variable
        assert variable in page, variable
    rows = [r for g in reference_pages.settings_rows() for r in g["names"]]
    assert rows == list(Settings.model_fields)
    # A few rows read back against the class: default, bounds and the comment above the field.
    groups = {n: g for g in reference_pages.settings_rows() for n in g["names"]}
    port = groups["port"]
    assert port["defaults"][port["names"].index("port")] == "`8000`"
    assert port["bounds"][port["names"].index("port")] == "≥ 1, ≤ 65,535"
    assert groups["fair_share"]["types"] == ["`usage` or `starts`"]
    assert "decayed" in groups["fair_share"]["description"]
    assert (
        groups["input_max_bytes"]["description"]
        == Settings.model_fields["input_max_bytes"].description
    )


def test_a_setting_without_a_description_stops_the_page(reference_pages: ModuleType) -> None:
    from pydantic_settings import BaseSettings

    class Undocumented(BaseSettings):
        # The first is described.
        described: int = 1

        silent: int = 2

    assert reference_pages.field_comments(Undocumented) == {"described": "The first is described."}
    with pytest.raises(ValueError, match="Undocumented.silent has no description"):
        reference_pages.settings_rows(Undocumented)


def test_the_api_reference_has_every_operation_and_schema(
    reference_pages: ModuleType, site: Path
) -> None:
    # The document the build fetched from the app, published beside the pages.
    doc = json.loads((site / "reference" / "openapi.json").read_text())
    assert doc["openapi"].startswith("3.1") and doc["paths"]
    html = (site / "reference" / "index.html").read_text()
    operations = _text(site / "reference" / "index.html")
    schemas = (site / "reference" / "schemas" / "index.html").read_text()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in reference_pages.METHODS:
                assert f'id="{op["operationId"]}"' in html
                assert path in operations, path
    for name in doc["components"]["schemas"]:
        assert f'id="{reference_pages.anchor(name)}"' in schemas, name


def test_links_are_pointed_at_the_site(hooks: ModuleType) -> None:
    readme = (
        "[a](docs/api.md#rate-limits) [b](bench/README.md) [c](compose.yaml) [d](https://x.org)"
    )
    assert hooks.site_links(readme, "README.md") == (
        "[a](api.md#rate-limits) [b](benchmarks.md) c [d](https://x.org)"
    )
    page = "[a](../bench/README.md#soak) [b](../README.md) ![p](../bench/results/q.png)"
    assert hooks.site_links(page, "docs/reliability.md") == (
        "[a](benchmarks.md#soak) [b](index.md) ![p](bench-results/q.png)"
    )
    assert hooks.site_links("[r](results/q.png)", "bench/README.md") == "[r](bench-results/q.png)"
    fenced = "```\n[x](docs/api.md)\n```\n"
    assert hooks.site_links(fenced, "README.md") == fenced


def test_the_readme_is_a_short_front_door_whose_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 15 * 1024
    assert "GET /v1/openapi.json" in readme
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme):
        if not re.match(r"^[a-z]+:", target):
            assert (ROOT / target).exists(), target


def test_the_benchmark_tables_are_the_committed_results(report: ModuleType) -> None:
    readme = (ROOT / "bench" / "README.md").read_text()
    assert report.render(readme, report.load_runs()) == readme, (
        "bench/README.md's tables differ from bench/results/: run python bench/report.py"
    )


def test_the_report_places_every_kind_of_result(report: ModuleType, tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    for name, data in {
        "widgets-2026-12-05T010203.json": {"rate_per_s": 12.345, "db": "sqlite"},
        "widgets-2026-12-06T010203.json": {"rate_per_s": 1234.5, "db": "postgresql"},
        "widgets-before-2026-12-06T000000.json": {"rate_per_s": 3.0, "db": "postgresql"},
        "gizmos-20261205T010203Z.json": {"ok": True, "rounds": [{"n": 1}, {"n": 2}]},
        "oddly named.json": {"x": 1},
    }.items():
        (results / name).write_text(json.dumps(data))
    kinds = report.load_runs(results)
    assert sorted(kinds) == ["gizmos", "oddly named", "widgets"]
    assert [r.label for r in kinds["widgets"]] == [
        "2026-12-06 01:02",
        "2026-12-06 00:00 (before)",
        "2026-12-05 01:02",
    ]
    readme = (
        "# B\n<!-- report:widgets -->\nstale\n<!-- /report:widgets -->\n"
        "<!-- report:unplaced -->\n<!-- /report:unplaced -->\n"
    )
    out = report.render(readme, kinds)
    widgets = out[out.index("report:widgets") : out.index("/report:widgets")]
    assert "stale" not in widgets
    assert "| rate_per_s | 1,234 | 3 | 12.3 |" in widgets
    assert "| db | postgresql | postgresql | sqlite |" in widgets
    unplaced = out[out.index("report:unplaced") : out.index("/report:unplaced")]
    assert "### gizmos" in unplaced and "| rounds[1].n | 2 |" in unplaced
    assert "### oddly named" in unplaced and "widgets" not in unplaced
    # Rendering again changes nothing: the check that tests the README relies on it.
    assert report.render(out, kinds) == out


def test_a_target_reads_the_latest_run_of_each_database(report: ModuleType) -> None:
    kinds = report.load_runs()
    table = report.targets(kinds)
    latest = {run.data["database"]: run for run in reversed(kinds["job-path"]) if not run.before}
    assert len(latest) == 2, latest  # SQLite and PostgreSQL
    for database, run in latest.items():
        ratio = run.data["ratio_jobs_per_s"]
        assert f"{report.number(ratio)} ({database}, {run.label})" in table
