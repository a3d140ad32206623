"""Wake-ups for the followers of a job's events. Once a transaction that recorded events of a
job has committed, the recorder publishes the job's id on that job's Redis channel; an event
stream that follows the job (api/events.py, the OpenAI-compatible text stream) waits on the
channel between its SQL reads instead of sleeping, so it reads a new event a few milliseconds
after its commit rather than at its next poll.

Only ids travel through Redis: the events are read from SQL, which keeps their order, their ids
(Last-Event-ID) and their history. A lost wake-up (Redis down, a follower subscribed a moment
late) costs latency, never an event: the follower still reads SQL at its poll interval.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable

import redis

log = logging.getLogger(__name__)

EVENTS_CHANNEL = "genq:events:{job_id}"


def announce(client: redis.Redis, job_id: str) -> None:
    """Wake the followers of `job_id`: it has new events in SQL. Never raises (a job must not
    stop because its followers cannot be told; they find the events at their next poll)."""
    try:
        client.publish(EVENTS_CHANNEL.format(job_id=job_id), job_id)
    except (redis.RedisError, OSError) as exc:
        log.debug("could not announce new events: %s", exc, extra={"job_id": job_id})


class Wakeups:
    """A follower's subscription to the wake-ups of some jobs. Subscribe before the first SQL
    read: a wake-up published between a read and the next `wait` is then kept for that wait.
    Without Redis, `wait` sleeps its timeout (plain polling)."""

    def __init__(self, client: redis.Redis, job_ids: Iterable[str]) -> None:
        self.pubsub: redis.client.PubSub | None = None
        channels = [EVENTS_CHANNEL.format(job_id=job_id) for job_id in job_ids]
        try:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(*channels)
            self.pubsub = pubsub
        except (redis.RedisError, OSError) as exc:
            log.warning("event wake-ups unavailable, polling: %s", exc)

    def wait(self, timeout_s: float) -> bool:
        """Until a wake-up comes or `timeout_s` passes; True if woken. Every wake-up already
        queued is taken, so a burst of commits costs one read."""
        if self.pubsub is None:
            time.sleep(timeout_s)
            return False
        started = time.monotonic()
        try:
            woken = self.pubsub.get_message(timeout=timeout_s) is not None
            while self.pubsub.get_message(timeout=0) is not None:
                woken = True
            return woken
        except (redis.RedisError, OSError) as exc:
            log.warning("event wake-ups lost, polling: %s", exc)
            self.close()
            time.sleep(max(0.0, timeout_s - (time.monotonic() - started)))
            return False

    def close(self) -> None:
        if self.pubsub is not None:
            pubsub, self.pubsub = self.pubsub, None
            with contextlib.suppress(redis.RedisError, OSError):
                pubsub.close()
