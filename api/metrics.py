"""GET /metrics: the whole stack in the Prometheus text format, in one scrape.

Three sources, each chosen so that any API process (and any API host of a cluster) answers
the same for the stack:

- state and job counts read from SQL at scrape time (core/census.py): the job table is the
  counter, so Celery workers, the periodic scheduler and restarts need nothing of their own;
- the cluster as the Celery workers last saw it in Ray (their Redis snapshots,
  scheduler/snapshot.py): live workers, nodes, warm model servers and replicas, batches, and
  GPU memory and utilisation per node and GPU; the API host imports no Ray;
- counters of events that leave no row (core/tally.py, in Redis), and this API host's own
  request and rate-limit counters (api/instruments.py, multi-process across gunicorn workers).

The collectors are in api/collectors.py. Protected: `Authorization: Bearer
<GENQ_METRICS_TOKEN>` or an admin key.
"""

from __future__ import annotations

import contextlib
import hmac
import logging

import redis
from flask import Blueprint, Response, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from api import instruments
from api.auth import public, rate_guarded
from api.collectors import ClusterCollector, SqlCollector
from api.ratelimits import client_address
from api.state import genq
from core import census, tally
from core.db import Database
from core.errors import ForbiddenError, UnauthorizedError
from core.keys import authenticate
from core.settings import Settings

log = logging.getLogger(__name__)

bp = Blueprint("metrics", __name__)

# The SQL figures' text, shared by every API process for `metrics_cache_s`.
SQL_CACHE_KEY = "genq:metrics:sql"


def _check_access() -> None:
    """The scrape token, or an admin key; 401 without either, 403 for another key."""
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        raise UnauthorizedError("send the metrics token or an admin key as a Bearer token")
    state = genq()
    token = state.settings.metrics_token
    if token and hmac.compare_digest(given.encode(), token.encode()):
        return
    limits = state.rate_limits
    address = client_address()
    if limits is not None:
        rate_guarded(lambda: limits.check_address(address))
    try:
        with state.database.read() as session:
            who = authenticate(session, given)
    except UnauthorizedError:
        if limits is not None:
            rate_guarded(lambda: limits.count_failure(address))
        raise
    if not who.is_admin:
        raise ForbiddenError("GET /metrics needs the metrics token or an admin key")


def _sql_text(settings: Settings, database: Database, client: redis.Redis) -> bytes:
    """The SQL figures' text, shared through Redis for `metrics_cache_s`: every API process
    and host scraped within that time answers the same text from one set of queries."""
    ttl_s = settings.metrics_cache_s
    if ttl_s > 0:
        try:
            cached = client.get(SQL_CACHE_KEY)
        except redis.RedisError:
            cached = None
        if isinstance(cached, bytes):
            return cached
    registry = CollectorRegistry(auto_describe=False)
    with database.read() as session:
        registry.register(SqlCollector(session))
        text = generate_latest(registry)
    if ttl_s > 0:
        with contextlib.suppress(redis.RedisError):
            client.set(SQL_CACHE_KEY, text, px=max(1, round(ttl_s * 1000)))
    return text


def exposition() -> bytes:
    """The text of one scrape: this host's per-process figures, the cluster's and SQL's."""
    from scheduler.enqueue import read_snapshots

    state = genq()
    registry = CollectorRegistry(auto_describe=False)
    if instruments.is_multiprocess():
        MultiProcessCollector(registry)
    else:
        for metric in (instruments.REQUESTS, instruments.LATENCY, instruments.RATE_LIMITED):
            registry.register(metric)
    client = state.publisher.redis
    try:
        snapshots, counters = read_snapshots(client), tally.read(client)
    except redis.RedisError:  # Redis away: the SQL figures still answer, the cluster's do not
        log.warning("metrics: Redis did not answer; cluster figures left out", exc_info=True)
        snapshots, counters = [], {}
    with state.database.read() as session:
        models = census.model_refs(session)
    registry.register(ClusterCollector(snapshots, counters, models))
    return generate_latest(registry) + _sql_text(state.settings, state.database, client)


@bp.get("/metrics")
@public
def metrics() -> Response:
    """Every metric of the stack (README, "Metrics")."""
    _check_access()
    return Response(exposition(), mimetype=None, content_type=CONTENT_TYPE_LATEST)
