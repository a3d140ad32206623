"""What makes polling a job cheap (`GET /v1/jobs/{id}`, the main traffic of a job API).

- The rendered job (`JobDocuments`) is kept in the broker's Redis, shared by every API process,
  for at most `settings.status_staleness_s` (1 s by default) after the oldest thing it was
  computed from. A poll that finds it answers from it: no SQL, no rendering.
- The figures behind a queued job's `queue_position` and `eta_s` (`Figures`: the queue's
  summary per tenant and priority, its running jobs, the model's mean run time) are computed
  once per half of that time in each API process rather than for every job rendered.

So an answer is never older than the bound: a job that a worker starts or finishes is seen so
by the first poll after it. A change made through the API itself (cancel, retry, priority,
deleting a job or an output) writes the changed document (or a marker that there is none) at
once, so the next poll, through any API process, sees it. Each document carries its row's
version (`updated_at` in microseconds) and Redis keeps the newer of two writes, so a document
rendered from a read that began before a change can never replace the changed one. A change
that touches many jobs at once (deleting a model or a data set they name, a purge) moves an
epoch instead: documents stamped with an earlier one are not used.

A document also carries its job's tenant: a tenant's key that asks for another tenant's job
gets the same 404 as from SQL. An unanswered Redis turns the store off for a second at a time
(polls read SQL meanwhile): a broker outage must not become an API one.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import redis
from flask import Response, current_app, request

from api.state import genq

log = logging.getLogger(__name__)

KEY_PREFIX = "genq:jobdoc:"
EPOCH_KEY = "genq:jobdoc-epoch"
EXTENSION = "genq.polling"
# After Redis fails to answer, how long polls go straight to SQL before trying it again.
REDIS_BACKOFF_S = 1.0

# Keep the newer document: a write whose version is older than the stored one's is dropped.
# A stored value is "<version> <epoch> <tenant id> <etag>\n<body>"; a marker (no document) has
# no body. The epoch is the one read before the document's SQL read (none: the current one).
_STORE_IF_NEWER = """
local current = redis.call('GET', KEYS[1])
if current then
  local version = tonumber(string.match(current, '^(%d+) '))
  if version and version > tonumber(ARGV[1]) then return 0 end
end
local epoch = ARGV[2]
if epoch == '' then epoch = redis.call('GET', KEYS[2]) or '0' end
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. epoch .. ' ' .. ARGV[3], 'PX', ARGV[4])
return 1
"""


@dataclass(frozen=True)
class Document:
    """A rendered job as stored: who may read it, its ETag, and the JSON body."""

    tenant_id: str
    etag: str
    body: bytes


def version_of(updated_at: Any) -> int:
    """A row's version: its updated_at in microseconds (0 without one)."""
    return int(updated_at.timestamp() * 1_000_000) if updated_at is not None else 0


class Figures:
    """Per-queue and per-model figures of one API process, each reused for `ttl_s`. Entries
    are replaced whole, so threads share it without a lock (a race computes one twice)."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._memo: dict[Hashable, tuple[float, Any]] = {}

    def get(self, key: Hashable, compute: Callable[[], Any]) -> tuple[Any, float]:
        """The figure and the monotonic time it was computed at."""
        now = time.monotonic()
        entry = self._memo.get(key)
        if entry is not None and now - entry[0] < self.ttl_s:
            return entry[1], entry[0]
        value = compute()
        if len(self._memo) > 10_000:  # queues and models come and go: drop the stale
            self._memo = {k: v for k, v in self._memo.items() if now - v[0] < self.ttl_s}
        self._memo[key] = (now, value)
        return value, now


class JobDocuments:
    """Rendered jobs in Redis, and the figures they are computed from, for one app."""

    def __init__(self, client: redis.Redis, staleness_s: float) -> None:
        self.redis = client
        self.staleness_s = staleness_s
        self.figures = Figures(staleness_s / 2)
        self._store = client.register_script(_STORE_IF_NEWER)
        self._down_until = 0.0

    @property
    def enabled(self) -> bool:
        return self.staleness_s > 0

    def _usable(self) -> bool:
        return self.enabled and time.monotonic() >= self._down_until

    def _failed(self, exc: Exception) -> None:
        if not isinstance(exc, redis.RedisError | OSError):
            raise exc
        if time.monotonic() >= self._down_until:
            log.warning("job documents not cached (Redis did not answer): %s", exc)
        self._down_until = time.monotonic() + REDIS_BACKOFF_S

    def read(self, job_id: str) -> tuple[Document | None, str]:
        """The stored document of the job, or None (none, a marker, an earlier epoch's, or
        Redis not answering); and the epoch now, for a document rendered afresh."""
        if not self._usable():
            return None, ""
        try:
            raw, epoch = self.redis.mget([KEY_PREFIX + job_id, EPOCH_KEY])
        except Exception as exc:
            self._failed(exc)
            return None, ""
        now = _text(epoch) if epoch else "0"
        if not raw:
            return None, now
        data = raw if isinstance(raw, bytes) else str(raw).encode()
        header, _, body = data.partition(b"\n")
        fields = header.decode().split(" ")
        if len(fields) != 4 or fields[1] != now or not body:
            return None, now
        return Document(fields[2], fields[3], body), now

    def write(
        self,
        job_id: str,
        *,
        version: int,
        tenant_id: str,
        payload: Mapping[str, object] | None,
        as_of: float,
        epoch: str = "",
    ) -> Document | None:
        """Store the job's document (None: a marker that the next poll must read SQL), to
        expire `staleness_s` after `as_of` (the monotonic time of the oldest thing it was
        computed from), stamped with `epoch` (the one read before rendering it; "": the
        current one). Returns the document (for the response), also when not stored."""
        document = None
        if payload is not None:
            body = (current_app.json.dumps(payload) + "\n").encode()
            etag = hashlib.blake2b(body, digest_size=12).hexdigest()
            document = Document(tenant_id, etag, body)
        if not self._usable():
            return document
        left_ms = int((as_of + self.staleness_s - time.monotonic()) * 1000)
        if left_ms < 1:
            return document
        etag_field = document.etag if document else "-"
        value = f"{tenant_id} {etag_field}\n".encode() + (document.body if document else b"")
        try:
            self._store(
                keys=[KEY_PREFIX + job_id, EPOCH_KEY], args=[version, epoch, value, left_ms]
            )
        except Exception as exc:
            self._failed(exc)
        return document

    def new_epoch(self) -> None:
        """Stop using every stored document (a change touched many jobs)."""
        if not self.enabled:
            return
        try:
            self.redis.incr(EPOCH_KEY)
        except Exception as exc:
            # What it holds expires within the bound all the same.
            self._failed(exc)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def documents() -> JobDocuments:
    """The current app's store, made on first use from its publisher's Redis and settings."""
    extensions = current_app.extensions
    found: JobDocuments | None = extensions.get(EXTENSION)
    if found is None:
        state = genq()
        found = extensions.setdefault(
            EXTENSION, JobDocuments(state.publisher.redis, state.settings.status_staleness_s)
        )
    return found


def changed(
    job_id: str, *, version: int, tenant_id: str, payload: Mapping[str, object] | None
) -> None:
    """After a change to a job through the API has committed: the next poll shows it. With
    `payload` (the job as the change left it) that is what it answers; without, it reads SQL."""
    documents().write(
        job_id, version=version, tenant_id=tenant_id, payload=payload, as_of=time.monotonic()
    )


def many_changed() -> None:
    """After a change through the API that touched many jobs has committed (a purge, deleting
    a model or a data set that jobs name): the next poll of any job reads SQL."""
    documents().new_epoch()


def respond(document: Document) -> Response:
    """The document as a 200, or a 304 when the client already holds it (If-None-Match)."""
    if document.etag in request.if_none_match:
        response = Response(status=304)
    else:
        response = Response(document.body, mimetype="application/json")
    response.set_etag(document.etag)
    return response
