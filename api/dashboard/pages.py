"""The dashboard's pages (overview, jobs, a job, models, data sets, tenants and keys), the
artifact files they show, and the small JSON endpoints under `/admin/live/` that the page script
polls to keep progress bars, states and counts current without a reload (on a job's page also
its timeline, attempt, log lines, outputs, loss chart and latest metrics, as they happen).

Filters are checked like `/v1` input: a bad value answers 422 naming the field, never a guess.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import Response, jsonify, redirect, render_template, request, url_for
from markupsafe import Markup
from sqlalchemy import select

from api.artifacts import send_artifact
from api.dashboard import bp, charts, queries
from api.dashboard.session import admin
from api.state import genq
from core.audit import recent_actions
from core.errors import InvalidInputError, NotFoundError
from core.numbers import parse_whole
from core.states import JobKind, JobState
from core.tables import Artifact, Dataset, Job, JobEvent, Model, Tenant, utcnow
from scheduler.enqueue import read_dropped

PAGE_SIZE = 50
# Latency points sit at the end of their 5-minute bucket, in minutes before now.
HOUR_AXIS: dict[str, Any] = {"x_range": (-60.0, 0.0), "x_labels": ("-60 min", "now")}
TEXT_PREVIEW_BYTES = 20_000


def cluster() -> tuple[list[dict[str, Any]], str | None]:
    """Live workers' snapshots (scheduler/snapshot.py), or an error to show instead."""
    from scheduler.enqueue import read_snapshots

    try:
        return read_snapshots(genq().publisher.redis), None
    except Exception as exc:  # the page still shows SQL's view when Redis is away
        return [], f"{type(exc).__name__}: {exc}"


def ray_view_of(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """Nodes, model servers and GPU totals as the freshest snapshot that reached Ray reports
    them (GPUs in use = declared minus available, as Ray counts them)."""
    for snap in sorted(snapshots, key=lambda s: -float(s.get("taken_at", 0))):
        ray = snap.get("ray") or {}
        if ray.get("connected"):
            total = float((ray.get("cluster_resources") or {}).get("GPU", 0))
            free = float((ray.get("available_resources") or {}).get("GPU", 0))
            return {
                "nodes": list(ray.get("nodes", [])),
                "servers": list(ray.get("model_servers", [])),
                "pool": dict(ray.get("pool") or {}),
                "gpu_total": total,
                "gpu_used": max(0.0, total - free),
            }
    return {"nodes": [], "servers": [], "pool": {}, "gpu_total": 0.0, "gpu_used": 0.0}


@bp.get("/")
def overview() -> str:
    snapshots, cluster_error = cluster()
    ray_view = ray_view_of(snapshots)
    servers = ray_view["servers"]
    with genq().database.transaction() as db:
        counts = queries.jobs_by_state(db)
        depths = queries.queue_depths(db)
        hour = queries.last_hour(db)
        model_ids = [s.get("model_id") for s in servers]
        model_ids += list((ray_view["pool"].get("models") or {}).keys())
        refs = {m.id: m.ref for m in db.scalars(select(Model).where(Model.id.in_(model_ids)))}
    wait = {
        "p50": _bucket_series(hour.wait_s, 50),
        "p95": _bucket_series(hour.wait_s, 95),
    }
    run = {
        "p50": _bucket_series(hour.run_s, 50),
        "p95": _bucket_series(hour.run_s, 95),
    }
    try:  # workers drop malformed broker messages and count them (scheduler/intake.py)
        dropped: dict[str, Any] | None = read_dropped(genq().publisher.redis)
    except Exception:  # the broker does not answer: the page says nothing about it
        dropped = None
    return render_template(
        "dashboard/overview.html",
        dropped=dropped,
        counts=counts,
        depths=depths,
        hour=hour,
        summary=hour.summary(),
        throughput=charts.bars(
            hour.per_minute, "jobs finished per minute", x_labels=("-60 min", "now")
        ),
        wait_chart=charts.lines(wait, "queue wait p50/p95 (s)", unit="s", **HOUR_AXIS),
        run_chart=charts.lines(run, "run time p50/p95 (s)", unit="s", **HOUR_AXIS),
        snapshots=snapshots,
        cluster_error=cluster_error,
        ray_view=ray_view,
        servers=servers,
        refs=refs,
    )


def _bucket_series(buckets: list[list[float]], q: float) -> list[tuple[float, float]]:
    # x: minutes before now at the bucket's end (-55 ... 0).
    points = []
    for i, values in enumerate(buckets):
        value = queries.percentile(values, q)
        if value is not None:
            points.append((float(-55 + 5 * i), value))
    return points


def _parse_time(field: str) -> datetime | None:
    raw = request.args.get(field, "").strip()
    if not raw:
        return None
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInputError.one(
            field, "must be a date and time like 2026-11-30T01:00"
        ) from None
    # A datetime-local input has no zone: the dashboard shows and reads UTC.
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00+14:00, before year 1 in UTC
        raise InvalidInputError.one(field, "must fall within the years 1 to 9999 in UTC") from None


def _parse_cursor(field: str) -> str | None:
    raw = request.args.get(field, "").strip()
    if not raw:
        return None
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise InvalidInputError.one(field, "is not a job id") from None


@dataclass(frozen=True)
class JobFilterArgs:
    flt: queries.JobFilter
    window: str  # the "created in the last ..." choice, shown selected again


def _parse_filter() -> JobFilterArgs:
    args = request.args
    states = [s for v in args.getlist("state") for s in v.split(",") if s]
    for s in states:
        if s not in JobState.__members__.values():
            raise InvalidInputError.one("state", f"unknown state {s!r}")
    kind = args.get("kind", "").strip() or None
    if kind is not None and kind not in JobKind.__members__.values():
        raise InvalidInputError.one("kind", f"unknown kind {kind!r}")
    window = args.get("window", "").strip()
    since = _parse_time("since")
    if window:
        hours = {"1h": 1, "24h": 24, "7d": 24 * 7}.get(window)
        if hours is None:
            raise InvalidInputError.one("window", "must be 1h, 24h or 7d")
        since = utcnow() - timedelta(hours=hours)
    q = args.get("q", "").strip().lower()
    if q and not all(c in "0123456789abcdef-" for c in q):
        raise InvalidInputError.one("q", "search by job id: hexadecimal digits and dashes")
    return JobFilterArgs(
        queries.JobFilter(
            states=states,
            kind=kind,
            model=args.get("model", "").strip() or None,
            tenant=args.get("tenant", "").strip() or None,
            since=since,
            until=_parse_time("until"),
            id_prefix=q or None,
        ),
        window,
    )


@bp.get("/jobs")
def jobs() -> Any:
    parsed = _parse_filter()
    flt = parsed.flt
    if flt.id_prefix and len(flt.id_prefix) == 36:
        return redirect(url_for("dashboard.job", job_id=flt.id_prefix))
    before, after = _parse_cursor("before"), _parse_cursor("after")
    with genq().database.transaction() as db:
        page = queries.list_jobs(db, flt, limit=PAGE_SIZE, before=before, after=after)
        models, tenants = queries.names_for(db, page.jobs)
        model_names = sorted(set(db.scalars(select(Model.name))))
        tenant_names = sorted(db.scalars(select(Tenant.name)))
    keep = {k: v for k, v in request.args.items(multi=True) if k not in ("before", "after")}
    return render_template(
        "dashboard/jobs.html",
        page=page,
        models=models,
        tenants=tenants,
        flt=flt,
        window=parsed.window,
        args=request.args,
        keep=keep,
        states=list(JobState),
        kinds=list(JobKind),
        model_names=model_names,
        tenant_names=tenant_names,
    )


def _get_job(db: Any, job_id: str) -> Job:
    job = db.get(Job, job_id)
    if job is None:
        raise NotFoundError(f"no job {job_id}")
    return job


@bp.get("/jobs/<job_id>")
def job(job_id: str) -> str:
    with genq().database.transaction() as db:
        found = _get_job(db, job_id)
        # The page shows events up to here; its script asks for the ones after.
        cursor = queries.last_event_id(db, found.id)
        history = queries.job_history(db, found.id, upto=cursor)
        models, tenants = queries.names_for(db, [found])
        dataset = db.get(Dataset, found.dataset_id) if found.dataset_id else None
        audit = recent_actions(db, target_type="job", target_id=found.id)
        previews = {a.id: _text_preview(a) for a in history["outputs"] if a.kind == "text"}
        preempted = queries.preemptions(db, found)
    curves = history["curves"]
    return render_template(
        "dashboard/job.html",
        job=found,
        history=history,
        cursor=cursor,
        models=models,
        tenants=tenants,
        dataset=dataset,
        audit=audit,
        previews=previews,
        preempted=preempted,
        loss_chart=_loss_chart(curves),
        latest=_latest(curves),
        params=json.dumps(found.params or {}, indent=2, sort_keys=True),
        metrics=json.dumps(found.metrics or {}, indent=2, sort_keys=True),
    )


def _loss_chart(curves: dict[str, list[tuple[int, float]]]) -> Markup | None:
    """The job page's loss chart, drawn by the page and again by its poll when points come."""
    losses = {k: v for k, v in curves.items() if "loss" in k}
    return charts.lines(losses, "loss by step") if losses else None


def _latest(curves: dict[str, list[tuple[int, float]]]) -> list[dict[str, Any]]:
    """Each metric's newest point, by name: what the job page shows while the job runs."""
    return [
        {"name": name, "step": points[-1][0], "value": points[-1][1]}
        for name, points in sorted(curves.items())
    ]


def _text_preview(artifact: Artifact) -> str:
    try:
        with genq().artifacts.open(artifact.path) as f:
            return f.read(TEXT_PREVIEW_BYTES).decode("utf-8", errors="replace")
    except Exception:  # gone, or the object store is unreachable: the page still shows
        return "(the file is gone)"


@bp.get("/artifacts/<artifact_id>")
def artifact(artifact_id: str) -> Response:
    """An output file for the dashboard's gallery (the admin sees every tenant's)."""
    state = genq()
    with state.database.transaction() as db:
        found = db.get(Artifact, artifact_id)
    if found is None:
        raise NotFoundError(f"no artifact {artifact_id}")
    # The same bytes as the API sends, presigned redirect included (its CSP allows no other
    # origin for images, so the dashboard always streams).
    response = send_artifact(found, allow_redirect=False)
    # An output is shown, never run: no script in an SVG or HTML output can act as the admin.
    response.headers["Content-Security-Policy"] = "default-src 'none'; img-src 'self'; sandbox"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@bp.get("/datasets")
def datasets() -> str:
    with genq().database.transaction() as db:
        rows = list(db.scalars(select(Dataset).order_by(Dataset.name)))
        tenants = dict(db.execute(select(Tenant.id, Tenant.name)).all())
    return render_template("dashboard/datasets.html", datasets=rows, tenants=tenants)


@bp.get("/tenants")
def tenants() -> str:
    with genq().database.transaction() as db:
        usage = queries.tenant_usage(db)
        audit = recent_actions(db, limit=50)
    names = {u["tenant"].id: u["tenant"].name for u in usage}
    settings = genq().settings
    # The retention days a tenant without its own keeps (placeholders of the form).
    defaults = {
        f: getattr(settings, f)
        for f in ("retain_outputs_days", "retain_events_days", "retain_jobs_days")
    }
    return render_template(
        "dashboard/tenants.html",
        usage=usage,
        audit=audit,
        me=admin(),
        tenant_names=names,
        defaults=defaults,
    )


# -- live data for the page script -----------------------------------------------------------


@bp.get("/live/jobs")
def live_jobs() -> Response:
    """State and progress of up to 200 jobs: `?ids=a,b,c`."""
    ids = [i for i in request.args.get("ids", "").split(",") if i][:200]
    with genq().database.transaction() as db:
        rows = db.execute(
            select(
                Job.id, Job.state, Job.progress_step, Job.progress_total, Job.progress_message
            ).where(Job.id.in_(ids))
        ).all()
    return jsonify(
        {
            row.id: {
                "state": row.state,
                "step": row.progress_step,
                "total": row.progress_total,
                "message": row.progress_message or "",
            }
            for row in rows
        }
    )


def _after_arg() -> int:
    raw = request.args.get("after", "0")
    event_id = parse_whole(raw)
    if event_id is None:
        raise InvalidInputError.one("after", "must be an event id")
    return event_id


@bp.get("/live/jobs/<job_id>")
def live_job(job_id: str) -> Response:
    """One job for its page: state, progress and attempt, and the timeline entries, log lines
    and outputs of its events after event id `after` (what the page already shows), with the
    cursor to send next time. `more` is true when there are more events than one answer
    carries. When metric events came, also the loss chart's SVG (our own chart code: numbers
    and escaped names) and each metric's newest point."""
    after = _after_arg()
    with genq().database.read() as db:
        updates = queries.job_updates(db, job_id, after=after)
        if updates is None:
            raise NotFoundError(f"no job {job_id}")
        # Only when new points came: the whole series, for a chart drawn as the page draws it.
        curves = (
            queries.metric_curves(db, job_id, upto=updates.cursor)
            if any(e.type == "metric" for e in updates.events)
            else None
        )
    previews = {a.id: _text_preview(a) for a in updates.outputs.values() if a.kind == "text"}
    job = updates.job
    timeline, logs, outputs = [], [], []
    for e in updates.events:
        if e.type == "state":
            timeline.append(
                {
                    "id": e.id,
                    "from": str(e.data.get("from") or ""),
                    "to": str(e.data.get("to") or ""),
                    "at": e.created_at.isoformat(),
                    "when": e.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                    "attempt": e.data.get("attempt") or None,
                    "reason": str(e.data.get("reason") or ""),
                }
            )
        elif e.type == "log":
            logs.append(_log_line(e))
        elif e.type == "output" and (
            (found := updates.outputs.get(str(e.data.get("artifact_id")))) is not None
        ):
            outputs.append(
                {
                    "id": found.id,
                    "name": found.name,
                    "kind": found.kind,
                    "content_type": found.content_type,
                    "size_bytes": found.size_bytes,
                    "url": url_for("dashboard.artifact", artifact_id=found.id),
                    "preview": previews.get(found.id),
                }
            )
    return jsonify(
        {
            "state": job.state,
            "attempt": job.attempt,
            "max_attempts": job.max_attempts,
            "step": job.progress_step,
            "total": job.progress_total,
            "message": job.progress_message or "",
            "cursor": updates.cursor,
            "more": updates.has_more,
            "timeline": timeline,
            "logs": logs,
            "outputs": outputs,
            # Null when no metric event came after `after`: the page keeps what it shows.
            "loss_chart": None if curves is None else str(_loss_chart(curves) or ""),
            "metrics": None if curves is None else _latest(curves),
        }
    )


def _log_line(e: JobEvent) -> dict[str, Any]:
    return {
        "id": e.id,
        "time": e.created_at.strftime("%H:%M:%S"),
        "level": str(e.data.get("level", "info")),
        "message": str(e.data.get("message", "")),
    }


@bp.get("/live/overview")
def live_overview() -> Response:
    snapshots, error = cluster()
    with genq().database.transaction() as db:
        counts = queries.jobs_by_state(db)
        depths = queries.queue_depths(db)
    return jsonify(
        {"counts": counts, "depths": depths, "workers": len(snapshots), "cluster_error": error}
    )
