"""The collectors behind GET /metrics (api/metrics.py), built afresh for each scrape.

`SqlCollector` reads jobs, queues, waits, run times, retries, usage and webhooks from SQL
(core/census.py): the job rows are the counters, so every API process answers the same and a
restart loses nothing. `ClusterCollector` reads the cluster as the Celery workers last saw it
in Ray (their Redis snapshots, scheduler/snapshot.py: workers, nodes, warm model servers and
replicas, batches, GPU memory and utilisation per node and GPU), and the event counters of
core/tally.py. Labels stay bounded: tenants by name, models as name:version, never job ids.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session

from core import census
from core.deletion import read_counters
from core.jobs import priority_class
from core.states import TERMINAL
from core.tables import utcnow
from core.usage import fair_share_report

UNKNOWN = "unknown"


def _histogram(
    name: str, doc: str, labels: list[str], series: Iterable[census.Histogram]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for h in series:
        buckets: list[tuple[str, float]] = [(repr(float(b)), n) for b, n in h.buckets]
        buckets.append(("+Inf", h.count))
        family.add_metric(list(h.labels), buckets, h.sum_s)
    return family


def _merged(
    parts: Iterable[tuple[tuple[str, ...], census.Histogram]],
) -> list[census.Histogram]:
    """The groups' histograms added up under the given labels (empty ones left out)."""
    found: dict[tuple[str, ...], census.Histogram] = {}
    for labels, histogram in parts:
        if histogram.count == 0:
            continue
        labelled = census.Histogram(labels, histogram.buckets, histogram.count, histogram.sum_s)
        found[labels] = found[labels].plus(labelled) if labels in found else labelled
    return [found[labels] for labels in sorted(found)]


class SqlCollector(Collector):
    """Jobs, queues, waits, run times, usage and webhooks, read from SQL when scraped."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def collect(self) -> Iterator[Metric]:
        s = self.session
        names = census.tenant_names(s)

        def tenant(tenant_id: str) -> str:
            return names.get(tenant_id, tenant_id)

        groups = census.job_groups(s)
        jobs = GaugeMetricFamily(
            "genq_jobs",
            "Jobs by state, kind and tenant (every row).",
            labels=["state", "kind", "tenant"],
        )
        submitted = CounterMetricFamily(
            "genq_jobs_submitted",
            "Jobs submitted, by kind, family and tenant.",
            labels=["kind", "family", "tenant"],
        )
        finished = CounterMetricFamily(
            "genq_jobs_finished",
            "Jobs that ended, by kind, family, state (succeeded, failed, canceled) and tenant.",
            labels=["kind", "family", "state", "tenant"],
        )
        gauge_sum: dict[tuple[str, str, str], int] = defaultdict(int)
        submitted_sum: dict[tuple[str, str, str], int] = defaultdict(int)
        for g in groups:
            gauge_sum[(g.state, g.kind, tenant(g.tenant_id))] += g.jobs
            submitted_sum[(g.kind, g.family, tenant(g.tenant_id))] += g.jobs
            if g.state in TERMINAL:
                finished.add_metric([g.kind, g.family, g.state, tenant(g.tenant_id)], g.jobs)
        for labels, n in sorted(gauge_sum.items()):
            jobs.add_metric(list(labels), n)
        for labels, n in sorted(submitted_sum.items()):
            submitted.add_metric(list(labels), n)
        yield from (jobs, submitted, finished)

        depth = GaugeMetricFamily(
            "genq_queue_depth",
            "Queued jobs by queue, priority class (interactive, normal, batch) and tenant.",
            labels=["queue", "priority_class", "tenant"],
        )
        depth_sum: dict[tuple[str, str, str], int] = defaultdict(int)
        for queue, priority, tenant_id, n in census.queue_depth(s):
            depth_sum[(queue, priority_class(priority), tenant(tenant_id))] += n
        for labels, n in sorted(depth_sum.items()):
            depth.add_metric(list(labels), n)
        yield depth

        running = GaugeMetricFamily(
            "genq_jobs_running",
            "Jobs running (or canceling) by queue, kind and tenant.",
            labels=["queue", "kind", "tenant"],
        )
        for queue, kind, tenant_id, n in census.running_jobs(s):
            running.add_metric([queue, kind, tenant(tenant_id)], n)
        yield running

        retries = CounterMetricFamily(
            "genq_job_retries",
            "Attempts after a job's first (transient failures, reaped leases, retries asked for).",
            labels=["kind", "family"],
        )
        retried: dict[tuple[str, str], int] = defaultdict(int)
        for g in groups:
            retried[(g.kind, g.family)] += g.retries
        for (kind, family), n in sorted(retried.items()):
            retries.add_metric([kind, family], n)
        yield retries

        dead = GaugeMetricFamily(
            "genq_jobs_dead_letter",
            "Failed jobs that used up their attempts (GET /v1/dead-letter), by tenant.",
            labels=["tenant"],
        )
        dead_sum: dict[str, int] = defaultdict(int)
        for g in groups:
            if g.dead_letter:
                dead_sum[tenant(g.tenant_id)] += g.dead_letter
        for name, n in sorted(dead_sum.items()):
            dead.add_metric([name], n)
        yield dead

        deliveries = CounterMetricFamily(
            "genq_webhook_deliveries",
            "Webhook messages by event and outcome (pending, delivered, failed).",
            labels=["event", "outcome"],
        )
        attempts = CounterMetricFamily(
            "genq_webhook_attempts",
            "Webhook send attempts, by the event and the outcome of their message.",
            labels=["event", "outcome"],
        )
        for event, state, n, tries in census.webhook_deliveries(s):
            deliveries.add_metric([event, state], n)
            attempts.add_metric([event, state], tries)
        yield from (deliveries, attempts)

        yield _histogram(
            "genq_job_queue_wait_seconds",
            "Seconds from submit to start (of the latest attempt), by family and kind.",
            ["family", "kind"],
            _merged(((g.family, g.kind), g.wait) for g in groups),
        )
        yield _histogram(
            "genq_job_run_seconds",
            "Seconds from start to end of finished jobs' last attempt, by family, kind, state.",
            ["family", "kind", "state"],
            _merged(((g.family, g.kind, g.state), g.run) for g in groups),
        )
        yield _histogram(
            "genq_model_cold_start_seconds",
            "Seconds jobs waited for their model server to load, by family.",
            ["family"],
            census.cold_starts(s),
        )

        usage = GaugeMetricFamily(
            "genq_tenant_usage_gpu_seconds",
            "Decayed GPU-seconds charged to each tenant (core/usage.py), running jobs included.",
            labels=["tenant"],
        )
        share = GaugeMetricFamily(
            "genq_tenant_fair_share_ratio",
            "Each tenant's share of the usage over its weighted share (below 1: goes first).",
            labels=["tenant"],
        )
        report = fair_share_report(s, utcnow(), census.tenant_weights(s))
        for tenant_id, figures in sorted(report.items()):
            usage.add_metric([tenant(tenant_id)], float(figures["gpu_seconds"] or 0.0))
            share.add_metric([tenant(tenant_id)], float(figures["ratio"] or 0.0))
        yield from (usage, share)

        freed = CounterMetricFamily(
            "genq_retention_freed",
            "What retention's purge (source=retention) and the DELETE endpoints (source=api) "
            "freed: files, bytes, artifacts, events, jobs, models, datasets, runs.",
            labels=["source", "item"],
        )
        for source, items in sorted(read_counters(s).items()):
            for item, total in sorted(items.items()):
                freed.add_metric([source, item], float(total))
        yield freed


class ClusterCollector(Collector):
    """Workers, Ray nodes, model servers and GPUs from the workers' snapshots in Redis, and
    the event counters of core/tally.py."""

    def __init__(
        self,
        snapshots: list[dict[str, Any]],
        counters: dict[str, list[tuple[dict[str, str], float]]],
        models: dict[str, tuple[str, str]],
    ) -> None:
        self.snapshots, self.counters, self.models = snapshots, counters, models

    def _model(self, model_id: str) -> tuple[str, str]:
        """(name:version, family) of a model id; a model deleted since is `unknown`."""
        return self.models.get(model_id, (UNKNOWN, UNKNOWN))

    def collect(self) -> Iterator[Metric]:
        workers = GaugeMetricFamily("genq_workers", "Live Celery workers (fresh snapshots).")
        workers.add_metric([], len(self.snapshots))
        slots = GaugeMetricFamily("genq_worker_slots", "Task slots of the live Celery workers.")
        slots.add_metric([], sum(int(s.get("concurrency") or 0) for s in self.snapshots))
        yield from (workers, slots)

        reaped = CounterMetricFamily(
            "genq_leases_reaped",
            "Jobs whose lease expired, by outcome (queued again, failed as lost, canceled).",
            labels=["outcome"],
        )
        for labels, value in self.counters.get("leases_reaped", []):
            reaped.add_metric([labels.get("outcome", UNKNOWN)], value)
        yield reaped

        # Every worker sees the same Ray cluster: the freshest view that reached it speaks.
        views = [s for s in self.snapshots if (s.get("ray") or {}).get("connected")]
        view: dict[str, Any] = {}
        age = GaugeMetricFamily(
            "genq_cluster_snapshot_age_seconds", "Age of the freshest worker view of Ray."
        )
        if views:
            freshest = max(views, key=lambda s: float(s.get("taken_at") or 0))
            view = freshest["ray"]
            age.add_metric([], max(0.0, time.time() - float(freshest.get("taken_at") or 0)))
        yield age
        yield from self._nodes(view)
        yield from self._servers(view)

    def _nodes(self, view: dict[str, Any]) -> Iterator[Metric]:
        nodes = GaugeMetricFamily("genq_ray_nodes", "Ray nodes by liveness.", labels=["alive"])
        alive = [n for n in view.get("nodes", []) if n.get("alive")]
        if view:
            nodes.add_metric(["true"], len(alive))
            nodes.add_metric(["false"], len(view.get("nodes", [])) - len(alive))
        yield nodes
        declared = GaugeMetricFamily(
            "genq_node_gpus", "GPUs each alive Ray node declares.", labels=["node"]
        )
        for node in alive:
            gpus = float((node.get("resources") or {}).get("GPU", 0.0))
            declared.add_metric([str(node.get("address") or UNKNOWN)], gpus)
        yield declared
        resources = GaugeMetricFamily(
            "genq_cluster_resources",
            "Ray's cluster resources (CPU, GPU, gpu_memory_gb), total and available.",
            labels=["resource", "kind"],
        )
        for kind, source in (("total", "cluster_resources"), ("available", "available_resources")):
            for name in ("CPU", "GPU", "gpu_memory_gb"):
                value = (view.get(source) or {}).get(name)
                if value is not None:
                    resources.add_metric([name, kind], float(value))
        yield resources

    def _servers(self, view: dict[str, Any]) -> Iterator[Metric]:
        servers = GaugeMetricFamily(
            "genq_model_servers",
            "Warm model server actors (replicas), by model and family, ready or loading.",
            labels=["model", "family", "ready"],
        )
        desired = GaugeMetricFamily(
            "genq_model_replicas_desired",
            "Replicas the scaler wants for each model (core/scaling.py).",
            labels=["model"],
        )
        batches = CounterMetricFamily(
            "genq_batches",
            "Model runs that served two jobs or more at once, by model (warm servers only).",
            labels=["model"],
        )
        batch_jobs = CounterMetricFamily(
            "genq_batch_jobs",
            "Jobs served in a batch or alone, by model (warm servers only).",
            labels=["model", "mode"],
        )
        largest = GaugeMetricFamily(
            "genq_batch_size_max",
            "Largest batch (jobs) a warm server ran, by model.",
            labels=["model"],
        )
        pool = view.get("pool") or {}
        counts: dict[tuple[str, str, str], int] = defaultdict(int)
        for server in pool.get("servers", []):
            model, family = self._model(str(server.get("model_id")))
            counts[
                (model, str(server.get("family") or family), str(bool(server.get("ready"))).lower())
            ] += 1
        for labels, n in sorted(counts.items()):
            servers.add_metric(list(labels), n)
        for model_id, entry in sorted((pool.get("models") or {}).items()):
            desired.add_metric([self._model(model_id)[0]], float(entry.get("desired") or 0))
        per_model: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        gpus: dict[tuple[str, str], dict[str, float]] = {}
        for server in view.get("model_servers", []):
            model = self._model(str(server.get("model_id")))[0]
            stats = server.get("batching") or {}
            figures = per_model[model]
            figures["batches"] += float(stats.get("batches") or 0)
            figures["batched"] += float(stats.get("batched_jobs") or 0)
            figures["solo"] += float(stats.get("solo_jobs") or 0)
            figures["largest"] = max(
                figures["largest"], float(stats.get("largest_batch_jobs") or 0)
            )
            gpu = server.get("gpu")
            if gpu:
                ids = server.get("gpu_ids") or [gpu.get("index")]
                key = (str(server.get("node_ip") or UNKNOWN), str(ids[0]))
                seen = gpus.setdefault(key, {"used": 0.0})
                seen["used"] += float(gpu.get("memory_reserved_bytes") or 0)
                seen["total"] = float(gpu.get("memory_total_bytes") or 0)
                if gpu.get("utilization_percent") is not None:
                    seen["util"] = float(gpu["utilization_percent"])
        for model, figures in sorted(per_model.items()):
            batches.add_metric([model], figures["batches"])
            batch_jobs.add_metric([model, "batched"], figures["batched"])
            batch_jobs.add_metric([model, "solo"], figures["solo"])
            largest.add_metric([model], figures["largest"])
        yield from (servers, desired, batches, batch_jobs, largest)
        memory_used = GaugeMetricFamily(
            "genq_gpu_memory_used_bytes",
            "GPU memory genq's model servers hold (reserved by torch), per node and GPU.",
            labels=["node", "gpu"],
        )
        memory_total = GaugeMetricFamily(
            "genq_gpu_memory_total_bytes", "GPU memory per node and GPU.", labels=["node", "gpu"]
        )
        util = GaugeMetricFamily(
            "genq_gpu_utilization_percent",
            "GPU utilisation (NVML) per node and GPU; absent without NVML.",
            labels=["node", "gpu"],
        )
        for (node, gpu_id), seen in sorted(gpus.items()):
            memory_used.add_metric([node, gpu_id], seen["used"])
            memory_total.add_metric([node, gpu_id], seen.get("total", 0.0))
            if "util" in seen:
                util.add_metric([node, gpu_id], seen["util"])
        yield from (memory_used, memory_total, util)
