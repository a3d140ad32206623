"""The API process's own metrics: requests by route and status with their latency, and
rate-limit refusals. These are per process, so under gunicorn they use prometheus_client's
multi-process mode (PROMETHEUS_MULTIPROC_DIR, set by `genq api`): each worker writes its
values to files there, and a scrape of any worker adds up every worker's files.

The objects are registered in no registry: GET /metrics (api/metrics.py) builds its own per
scrape, so that importing the app twice (tests) never registers a name twice.
"""

from __future__ import annotations

import os
import time

from flask import Flask, Response, g, request
from prometheus_client import Counter, Histogram

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

REQUESTS = Counter(
    "genq_http_requests",
    "API requests answered, by method, route (the URL rule, not the path) and status.",
    ["method", "route", "status"],
    registry=None,
)
LATENCY = Histogram(
    "genq_http_request_duration_seconds",
    "Seconds from a request's arrival to its response's headers, by method and route.",
    ["method", "route"],
    buckets=LATENCY_BUCKETS_S,
    registry=None,
)
RATE_LIMITED = Counter(
    "genq_rate_limit_refusals",
    "Requests refused with 429 by a rate limit, by policy (key, tenant, auth).",
    ["policy"],
    registry=None,
)


def is_multiprocess() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def _started() -> None:
    g.metrics_started = time.perf_counter()


def _observed(response: Response) -> Response:
    rule = request.url_rule
    # An unmatched path is one series, whatever the path: labels stay bounded.
    route = rule.rule if rule is not None else "unmatched"
    method = request.method if request.method in _METHODS else "other"
    REQUESTS.labels(method, route, str(response.status_code)).inc()
    started = g.get("metrics_started")
    if started is not None:
        LATENCY.labels(method, route).observe(time.perf_counter() - started)
    return response


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def install(app: Flask) -> None:
    """Time every request: first in, last out."""
    app.before_request_funcs.setdefault(None, []).insert(0, _started)
    app.after_request(_observed)
