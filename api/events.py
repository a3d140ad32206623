"""`GET /v1/jobs/{id}/events`: a job's history as Server-Sent Events, then its live events
until it reaches a terminal state.

The stream reads the job_event table, each read in its own short transaction, so no
transaction stays open while the client listens. Between reads it waits for the job's wake-up
(scheduler/wakeups.py: the recorder publishes one on Redis after each commit), so an event
reaches the client a few milliseconds after it is written; without one it reads again after
`stream_poll_s`. Each event is sent as `id: <job_event.id>`,
`event: <type>`, `data: <json>`; a client that reconnects with `Last-Event-ID` (or
`?last_event_id=`) gets only what it missed. A comment line is sent as a keep-alive when
nothing else has been sent for a while, so proxies do not close an idle stream.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator

import redis
from flask import Blueprint, Response, request
from sqlalchemy import select

from api.auth import principal
from api.jobs import find_job
from api.payloads import event_payload
from api.state import genq
from core.db import Database
from core.errors import BusyError, InvalidInputError, RateLimitedError
from core.numbers import parse_whole
from core.states import is_terminal
from core.tables import Job, JobEvent
from scheduler.enqueue import Wakeups

log = logging.getLogger(__name__)

bp = Blueprint("events", __name__, url_prefix="/v1/jobs")

BATCH = 500
# Seconds a client turned away for want of a stream slot is asked to wait (Retry-After).
STREAM_RETRY_AFTER_S = 5


def _last_event_id() -> int:
    """The event id to resume after: the Last-Event-ID header (what browsers send on a
    reconnect) wins over the query parameter; each must be an event id if given."""
    found = 0
    for field, raw in (
        ("last_event_id", request.args.get("last_event_id")),
        ("Last-Event-ID", request.headers.get("Last-Event-ID")),
    ):
        if raw is None or raw == "":
            continue
        event_id = parse_whole(raw)
        if event_id is None:
            raise InvalidInputError.one(field, "must be an event id (a non-negative integer)")
        found = event_id
    return found


def format_event(event: JobEvent) -> str:
    data = json.dumps(event_payload(event), separators=(",", ":"))
    return f"id: {event.id}\nevent: {event.type}\ndata: {data}\n\n"


def stream_events(
    database: Database,
    job_id: str,
    after_id: int,
    *,
    poll_s: float,
    keepalive_s: float,
    wakeups: redis.Redis | None = None,
) -> Iterator[str]:
    """Events of `job_id` with ids above `after_id`, until the job is terminal and drained.
    `wakeups`: the Redis whose wake-ups say when to read again (else every `poll_s`)."""
    last_id = after_id
    last_sent = time.monotonic()
    yield "retry: 2000\n\n"
    # Subscribed before the first read, so that no wake-up falls between a read and a wait.
    woken = Wakeups(wakeups, [job_id]) if wakeups is not None else None
    try:
        while True:
            try:
                state, events = _poll(database, job_id, last_id)
            except Exception:  # the response has started: end the stream, the client resumes
                log.exception("event stream failed", extra={"job_id": job_id})
                return
            for event in events:
                yield format_event(event)
                last_id = event.id
            if events:
                last_sent = time.monotonic()
                if len(events) == BATCH:
                    continue
            if state is None or is_terminal(state):
                return
            if time.monotonic() - last_sent >= keepalive_s:
                yield ": keep-alive\n\n"
                last_sent = time.monotonic()
            if woken is not None:
                woken.wait(poll_s)
            else:
                time.sleep(poll_s)
    finally:
        if woken is not None:
            woken.close()


def _poll(database: Database, job_id: str, after_id: int) -> tuple[str | None, list[JobEvent]]:
    """The job's state and its events after `after_id`, in one short transaction.

    The state is read before the events: a job seen terminal here has all its events
    committed, so the query after it drains them. Every writer of a job's events holds the
    job's row lock, so a job's event ids are committed in order and `id > after_id` misses
    none.
    """
    with database.read() as session:
        state = session.scalar(select(Job.state).where(Job.id == job_id))
        events = list(
            session.scalars(
                select(JobEvent)
                .where(JobEvent.job_id == job_id, JobEvent.id > after_id)
                .order_by(JobEvent.id)
                .limit(BATCH)
            )
        )
    return state, events


@bp.get("/<job_id>/events")
def events(job_id: str) -> Response:
    after_id = _last_event_id()
    state = genq()
    with state.database.read() as session:
        job_id = find_job(session, job_id).id
    # A stream holds a server thread for as long as the job runs: past the process's limit the
    # caller is told to come back (or poll), and the other threads keep answering everyone. One
    # tenant may hold only its share of them, so that it cannot shut the others out.
    tenant_id = principal().tenant_id
    full = state.open_stream(tenant_id)
    if full == "tenant":
        raise RateLimitedError(
            f"your tenant holds its {state.tenant_stream_limit} event streams of this API "
            "process (GENQ_API_MAX_STREAMS_PER_TENANT); close one, retry later, or poll "
            "GET /v1/jobs/{id}",
            policy="streams",
            retry_after_s=STREAM_RETRY_AFTER_S,
        )
    if full == "process":
        raise BusyError(
            f"this API process has its {state.stream_limit} event streams open "
            "(GENQ_API_MAX_STREAMS); retry later, or poll GET /v1/jobs/{id}",
            retry_after_s=STREAM_RETRY_AFTER_S,
        )
    stream = stream_events(
        state.database,
        job_id,
        after_id,
        poll_s=state.stream_poll_s,
        keepalive_s=state.stream_keepalive_s,
        wakeups=state.publisher.redis,
    )
    response = Response(stream, mimetype="text/event-stream")
    # The server closes it however it ended (and a client may close it twice): free it once.
    slot = [tenant_id]

    def free_slot() -> None:
        if slot:
            state.close_stream(slot.pop())

    response.call_on_close(free_slot)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
    return response
