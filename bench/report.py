"""Rewrite the result tables of bench/README.md from the JSON files in bench/results/.

Each benchmark saves one JSON file per run, named `<kind>-<UTC time>.json` (a baseline run of
the code before a change: `<kind>-before-<UTC time>.json`). This script groups the files by
kind and writes, between the README's markers

    <!-- report:KIND -->
    ...
    <!-- /report:KIND -->

a table of that kind's runs, latest first: one row per figure (the JSON's leaves, by their
dotted path), one column per run. Kinds that have no marker of their own are written between
the `report:unplaced` markers, each under a heading, so a new benchmark's results show up as
soon as this script runs. `INDEX` below may give a kind a title, the number of runs to show
and the figures to leave out (regular expressions over the dotted paths).

    python bench/report.py          # rewrite bench/README.md
    python bench/report.py --check  # exit 1 if the README's tables are not the results'

tests/test_docs.py runs the check, so the committed tables are always the committed results.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
UNPLACED = "unplaced"
RUNS_SHOWN = 4
MAX_ROWS = 60
# The run's time is the column's heading already.
ALWAYS_HIDDEN = ("at", "when", "bench")


@dataclass(frozen=True)
class Kind:
    title: str = ""
    runs: int = RUNS_SHOWN
    # Regular expressions of the dotted paths not to show (whole-path matches).
    hide: tuple[str, ...] = ()


# What the generic table needs help with; any kind missing here gets the defaults.
INDEX: dict[str, Kind] = {
    "throughput": Kind("echo through the stack vs raw Celery (bench/throughput.py)", runs=6),
    "api-load": Kind("API requests/s under wrk (bench/api_load.py)"),
    "cpu-per-job": Kind("CPU per echo job, every process (bench/cpu_per_job.py)", runs=6),
    "job-path": Kind("echo through the stack vs the bare pipeline (bench/job_path.py)", runs=12),
    "server-calls": Kind("a model server streamed vs polled (bench/server_calls.py)"),
    "job-path-processes-2": Kind(
        "the same, two Celery worker processes a side (bench/job_path.py --worker-processes 2)"
    ),
    "job-path-replicas-1": Kind(
        "the same, the echo model capped at one replica (bench/job_path.py --echo-max-replicas 1)"
    ),
    "finish-cost": Kind("CPU of the finishing transaction (bench/finish_cost.py)"),
    "claim-finish-cost": Kind(
        "CPU of the worker's claim and finish, checkouts alternating (bench/claim_finish_cost.py)"
    ),
    # The simulated workload's shares and waits are lists, pivoted by hand in the README.
    "fairness": Kind(
        "Fair share and claim cost (bench/fairness.py)",
        hide=(r"backends\.\w+\.(fifo|starts|usage|no_preemption|preemption)\..*",),
    ),
    "scale": Kind("Scheduling queries at 120,000 jobs (bench/scale.py)", hide=(r".*\.max_ms",)),
    "dashboard": Kind(
        "Dashboard pages at 100,000 jobs (bench/dashboard.py)", hide=(r".*\.max_ms",)
    ),
    "streams": Kind("Event streams beside other requests (bench/streams.py)"),
    "streams-text": Kind("Streaming 1,000 tokens (bench/streams.py --text)"),
    "batching": Kind(
        "Cross-job batching, tiny ddpm on a CPU (bench/batching.py)", hide=(r"rounds.*",)
    ),
    "gpu-batching-cpu-tiny": Kind(
        "SD-shaped batching, CPU smoke run (bench/gpu_batching.py --tiny)"
    ),
    "lm-batching": Kind(
        "Language-model continuous batching, tiny LM on a CPU (bench/lm_batching.py)",
        hide=(r".*runs\..*",),
    ),
    "lm-batching-charlm": Kind(
        "Language-model continuous batching, tiny charlm on a CPU"
        " (bench/lm_batching.py --family charlm)",
        hide=(r".*runs\..*",),
    ),
    "gpu-lm-batching-cpu-tiny": Kind(
        "GPT-2-shaped LM batching, CPU dry run (bench/gpu_lm_batching.py --tiny)"
    ),
    "replicas": Kind("Replicas: 1 vs 4 (bench/replicas.py)", hide=(r".*last_finished_at",)),
    "quality": Kind("Model quality (bench/quality.py)", hide=(r".*\.accuracy_per_label\..*",)),
    "quality-charlm": Kind("Model quality, charlm alone (bench/quality.py)"),
    "quality-ddpm": Kind("Model quality, ddpm alone (bench/quality.py)", hide=(r".*per_label.*",)),
    "quality-gan": Kind("Model quality, gan alone (bench/quality.py)", hide=(r".*per_label.*",)),
    "quality-vae": Kind("Model quality, vae alone (bench/quality.py)", hide=(r".*per_label.*",)),
    "families-speed-tiny": Kind("Family speed, tiny presets on a CPU (bench/families_speed.py)"),
    "soak": Kind("Soak under chaos (bench/soak.py)", hide=(r"chaos.*",)),
    "metrics": Kind("GET /metrics at 100,000 jobs (bench/metrics_scrape.py)"),
    "retention": Kind("Retention pass (bench/retention.py)"),
    "artifacts": Kind("Artifacts: downloads and the model cache (bench/artifacts.py)"),
    "stack-lifecycle": Kind(
        "genq up: start, first job and stop (bench/stack_lifecycle.py)",
        hide=(r"by_process\..*", r".*\.stop_up_exit_s\..*"),
    ),
    "suite-cpu": Kind(
        "The test suite's CPU, one test at a time (bench/suite_cpu.py)",
        hide=(r"heaviest_modules\..*\.(wall_s|cases)",),
    ),
    "suite-processes": Kind(
        "The test suite's CPU by process kind, as `make test` runs it (bench/suite_processes.py)",
        hide=(r"by_kind\..*\.processes",),
    ),
    "idle-stack": Kind("An idle genq up against Ray's own floor (bench/idle_stack.py)"),
}


@dataclass(frozen=True)
class Target:
    """A goal we set ourselves: `figure` of the latest run of `kind` (an fnmatch pattern; one
    row per value of `per` in the run, e.g. per database), compared with `goal`."""

    text: str
    kind: str
    figure: str
    at_least: bool
    goal: float
    percent: bool = False
    per: str = ""
    unit: str = ""


TARGETS = [
    Target(
        "`echo` through the stack ≥ 0.5 × the bare pipeline (bench/bare_pipeline.py)",
        "job-path",
        "ratio_jobs_per_s",
        at_least=True,
        goal=0.5,
        per="database",
    ),
    Target(
        "submit → start at idle, p50 ≤ 15 ms",
        "throughput",
        "genq_echo.submit_to_start_p50_ms",
        at_least=False,
        goal=15,
        per="database",
        unit=" ms",
    ),
    Target(
        "16 concurrent tiny-`ddpm` jobs ≥ 3× the same 16 one at a time (CPU)",
        "batching",
        "ratio_concurrent_vs_sequential",
        at_least=True,
        goal=3,
    ),
    Target(
        "batched through the queue ≥ 90% of one bare batched model call",
        "batching",
        "ratio_concurrent_vs_bare_batch",
        at_least=True,
        goal=0.9,
        percent=True,
    ),
    Target(
        "16 concurrent tiny-LM jobs ≥ 4× the tokens/s of the same 16 one at a time, at the"
        " model server (CPU)",
        "lm-batching",
        "server.ratio",
        at_least=True,
        goal=4,
    ),
    Target(
        "the same through the queue (`genq up`, SQLite)",
        "lm-batching",
        "stack.ratio",
        at_least=True,
        goal=4,
    ),
    Target(
        "16 concurrent tiny-charlm jobs ≥ 4× the tokens/s of the same 16 one at a time, at the"
        " model server (CPU)",
        "lm-batching-charlm",
        "server.ratio",
        at_least=True,
        goal=4,
    ),
    Target(
        "the same through the queue (`genq up`, SQLite)",
        "lm-batching-charlm",
        "stack.ratio",
        at_least=True,
        goal=4,
    ),
    Target(
        "a 1,000-token stream: at most one SQL write per 100 ms",
        "streams-text",
        "after.stream_writes_per_s",
        at_least=False,
        goal=10,
        unit="/s",
    ),
    Target(
        "a 1,000-token stream: token made → SSE follower, p99 ≤ 200 ms",
        "streams-text",
        "after.latency_p99_ms",
        at_least=False,
        goal=200,
        unit=" ms",
    ),
    Target(
        "4 replicas ≥ 3.5× the `echo` throughput of 1",
        "replicas",
        "speedup_4_vs_1",
        at_least=True,
        goal=3.5,
    ),
    Target(
        "H200: 16 concurrent SD-shaped jobs ≥ 4× one at a time",
        "gpu-batching-nvidia-*",
        "ratio_concurrent_vs_alone",
        at_least=True,
        goal=4,
    ),
    Target(
        "polling: `GET /v1/jobs/{id}` (queued, running and finished jobs) ≥ 40% of hello-JSON"
        " on the same server",
        "api-load",
        "ratio_status_to_hello",
        at_least=True,
        goal=0.4,
        percent=True,
    ),
    Target(
        "submitting: `POST /v1/jobs` ≥ 50% of a bare insert-and-publish endpoint on the same"
        " server",
        "api-load",
        "ratio_submit_to_bare",
        at_least=True,
        goal=0.5,
        percent=True,
    ),
    Target(
        "GPU: 64 concurrent GPT-2-small-shaped chat jobs ≥ 20× one at a time",
        "gpu-lm-batching-nvidia-*",
        "ratio",
        at_least=True,
        goal=20,
    ),
]

_NAME = re.compile(
    r"^(?P<kind>.+?)(?P<before>-before)?-(?P<stamp>\d{4}-?\d{2}-?\d{2}T\d{4,6}Z?)\.json$"
)


@dataclass
class Run:
    kind: str
    stamp: str  # sortable: YYYYMMDDTHHMMSS
    before: bool
    path: Path
    data: Any = field(repr=False)

    @property
    def label(self) -> str:
        s = self.stamp
        if not s:
            return self.path.name
        text = f"{s[0:4]}-{s[4:6]}-{s[6:8]} {s[9:11]}:{s[11:13]}"
        return text + (" (before)" if self.before else "")


def load_runs(results: Path = RESULTS) -> dict[str, list[Run]]:
    """Every result file, grouped by kind, latest first. A file whose name or JSON does not
    parse stops the script with its name (a broken result must not vanish from the tables)."""
    kinds: dict[str, list[Run]] = {}
    for path in sorted(results.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except ValueError as error:
            raise SystemExit(f"{path}: {error}") from error
        match = _NAME.match(path.name)
        if match is None:  # not named as the benchmarks name theirs: a kind of its own
            run = Run(path.stem, "", False, path, data)
        else:
            stamp = match["stamp"].replace("-", "").rstrip("Z").ljust(15, "0")
            run = Run(match["kind"], stamp, bool(match["before"]), path, data)
        kinds.setdefault(run.kind, []).append(run)
    for runs in kinds.values():
        runs.sort(key=lambda r: (r.stamp, r.path.name), reverse=True)
    return kinds


def leaves(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """The scalar leaves of a JSON value by dotted path (lists are left out)."""
    if isinstance(data, dict):
        found: list[tuple[str, Any]] = []
        for key, value in data.items():
            found += leaves(value, f"{prefix}.{key}" if prefix else str(key))
        return found
    if isinstance(data, list):
        # A list of records (rounds of a run) shows each by its index; a list of plain values
        # (ids, a workload's parameters) is not a figure.
        found = []
        for i, item in enumerate(data):
            if isinstance(item, dict):
                found += leaves(item, f"{prefix}[{i}]")
        return found
    return [(prefix, data)]


def number(value: Any) -> str:
    """A figure as the README shows it: three significant digits at most, thousands apart."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        size = abs(value)
        if size >= 100 or value.is_integer():
            return f"{value:,.0f}"
        if size >= 10:
            return f"{value:.1f}"
        if size >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    text = " ".join(str(value).split())
    return text if len(text) <= 40 else text[:39] + "…"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def table(kind: str, runs: list[Run]) -> str:
    """The Markdown table of one kind's latest runs."""
    spec = INDEX.get(kind, Kind())
    shown = runs[: spec.runs]
    rows: dict[str, list[str]] = {}
    for column, run in enumerate(shown):
        for path, value in leaves(run.data):
            if path in ALWAYS_HIDDEN or any(re.fullmatch(p, path) for p in spec.hide):
                continue
            rows.setdefault(path, [""] * len(shown))[column] = number(value)
    lines = [
        "| figure | " + " | ".join(r.label for r in shown) + " |",
        "|---|" + "---:|" * len(shown),
    ]
    for path, cells in list(rows.items())[:MAX_ROWS]:
        lines.append(f"| {_cell(path)} | " + " | ".join(_cell(c) for c in cells) + " |")
    notes = [f"`bench/results/{kind}-*.json`: {len(runs)} run{'s' if len(runs) > 1 else ''}"]
    if len(runs) > len(shown):
        notes.append(f"the {len(runs) - len(shown)} older not shown")
    if len(rows) > MAX_ROWS:
        notes.append(f"{len(rows) - MAX_ROWS} more figures in the files")
    return "\n".join(lines) + "\n\n(" + "; ".join(notes) + ".)\n"


def _figure(data: Any, path: str) -> Any:
    for key in path.split("."):
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def targets(kinds: dict[str, list[Run]]) -> str:
    """The targets table: each target against the latest run (per `per`) that has its figure."""
    lines = ["| target | measured (latest run) | met |", "|---|---|---|"]
    for target in TARGETS:
        runs = [
            run
            for name in sorted(kinds)
            if fnmatch.fnmatchcase(name, target.kind)
            for run in kinds[name]
            if not run.before and isinstance(_figure(run.data, target.figure), int | float)
        ]
        runs.sort(key=lambda r: r.stamp, reverse=True)
        latest: dict[str, Run] = {}
        for run in runs:
            latest.setdefault(str(_figure(run.data, target.per)) if target.per else "", run)
        if not latest:
            lines.append(f"| {target.text} | no run yet | — |")
            continue
        measured, met = [], []
        for group, run in latest.items():
            value = float(_figure(run.data, target.figure))
            shown = f"{value:.0%}" if target.percent else number(value) + target.unit
            where = f"{group}, " if group else ""
            measured.append(f"{shown} ({where}{run.label})")
            ok = value >= target.goal if target.at_least else value <= target.goal
            met.append(("yes" if ok else "no") + (f" ({group})" if group else ""))
        lines.append(f"| {target.text} | {'; '.join(measured)} | {', '.join(met)} |")
    return "\n".join(lines) + "\n"


def render(readme: str, kinds: dict[str, list[Run]]) -> str:
    """`readme` with every marked table rewritten from `kinds`."""
    marker = re.compile(r"(<!-- report:([\w.-]+) -->\n).*?(<!-- /report:\2 -->)", re.S)
    placed = {m[2] for m in marker.finditer(readme)} - {UNPLACED, "targets"}

    def fill(match: re.Match[str]) -> str:
        kind = match[2]
        if kind == "targets":
            body = "\n" + targets(kinds) + "\n"
        elif kind == UNPLACED:
            body = ""
            for name in sorted(set(kinds) - placed):
                title = INDEX.get(name, Kind()).title or name
                body += f"\n### {title}\n\n" + table(name, kinds[name])
            body = body.lstrip("\n") + "\n" if body else "\n"
        elif kind in kinds:
            body = "\n" + table(kind, kinds[kind]) + "\n"
        else:
            body = f"\nNo `{kind}` results yet.\n\n"
        return match[1] + body + match[3]

    return marker.sub(fill, readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the README would change")
    args = parser.parse_args(argv)
    old = README.read_text()
    new = render(old, load_runs())
    if args.check:
        if new != old:
            print("bench/README.md's tables differ from bench/results/: run python bench/report.py")
            return 1
        return 0
    if new != old:
        README.write_text(new)
        print("bench/README.md: tables rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
