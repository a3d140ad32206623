"""genq_client's retry rule and problem mapping, through httpx's transport seam (a server
that answers what the test says: a 503 with Retry-After is not something a real stack does
on demand). Everything else of the client runs against a real stack in test_openai_api.py."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from genq_client import AsyncClient, Busy, Client, NotFound, QuotaExceeded
from genq_client.protocol import retry_delay_s

PROBLEM = {"type": "busy", "title": "Busy", "status": 503, "detail": "full"}


def _server(answers: list[httpx.Response], seen: list[httpx.Request]):  # type: ignore[no-untyped-def]
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0)

    return handle


def _job() -> dict[str, object]:
    return {"id": "j1", "state": "queued", "kind": "generate"}


def test_retry_after_is_honoured_then_the_call_succeeds() -> None:
    seen: list[httpx.Request] = []
    answers = [
        httpx.Response(503, json=PROBLEM, headers={"Retry-After": "0"}),
        httpx.Response(429, json={**PROBLEM, "status": 429}, headers={"Retry-After": "0"}),
        httpx.Response(202, json=_job()),
    ]
    transport = httpx.MockTransport(_server(answers, seen))
    with Client("http://genq", "k", transport=transport) as genq:
        job = genq.submit(model="echo", idempotency_key="once")
    assert job.id == "j1" and len(seen) == 3
    assert all(r.headers["Idempotency-Key"] == "once" for r in seen)
    assert seen[0].headers["Authorization"] == "Bearer k"


def test_retries_run_out_and_long_waits_are_not_waited_for() -> None:
    seen: list[httpx.Request] = []
    busy = [httpx.Response(503, json=PROBLEM, headers={"Retry-After": "0"}) for _ in range(3)]
    with (
        Client(
            "http://genq", "k", max_retries=2, transport=httpx.MockTransport(_server(busy, seen))
        ) as genq,
        pytest.raises(Busy),
    ):
        genq.get_job("j1")
    assert len(seen) == 3
    later = httpx.Response(429, json={**PROBLEM, "status": 429}, headers={"Retry-After": "3600"})
    assert retry_delay_s(later, 0) is None
    assert retry_delay_s(httpx.Response(503, headers={"Retry-After": "7"}), 0) == 7
    assert retry_delay_s(httpx.Response(404), 0) is None
    quota = [later]
    with (
        Client("http://genq", "k", transport=httpx.MockTransport(_server(quota, []))) as genq,
        pytest.raises(QuotaExceeded),
    ):
        genq.get_job("j1")


def test_async_client_maps_problems() -> None:
    answers = [httpx.Response(404, json={**PROBLEM, "status": 404, "type": "not-found"})]

    async def run() -> None:
        transport = httpx.MockTransport(_server(answers, []))
        async with AsyncClient("http://genq", "k", transport=transport) as genq:
            await genq.get_job("nope")

    with pytest.raises(NotFound) as info:
        asyncio.run(run())
    assert info.value.type == "not-found" and info.value.status == 404


def test_an_event_stream_that_ends_early_is_resumed_after_the_last_event() -> None:
    seen: list[httpx.Request] = []

    def sse(event_id: int, state: str) -> httpx.Response:
        body = f'id: {event_id}\nevent: state\ndata: {{"to": "{state}"}}\n\n'
        return httpx.Response(200, text=body, headers={"Content-Type": "text/event-stream"})

    answers = [
        sse(1, "running"),  # the server's stream ended although the job goes on
        httpx.Response(200, json={**_job(), "state": "running"}),
        sse(2, "succeeded"),
        httpx.Response(200, json={**_job(), "state": "succeeded"}),
    ]
    transport = httpx.MockTransport(_server(answers, seen))
    with Client("http://genq", "k", transport=transport) as genq:
        events = list(genq.events("j1"))
    assert [(e.id, e.data["to"]) for e in events] == [(1, "running"), (2, "succeeded")]
    assert "Last-Event-ID" not in seen[0].headers
    assert seen[2].headers["Last-Event-ID"] == "1"
