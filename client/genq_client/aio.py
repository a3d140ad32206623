"""`AsyncClient`: `genq_client.client.Client` for asyncio, method for method.

async with AsyncClient("http://127.0.0.1:8000", key) as genq:
    job = await genq.submit(model="digits-ddpm", params={"label": 3}, wait_s=60)
    async for event in genq.events(job.id):
        ...
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from genq_client import protocol
from genq_client.errors import JobFailed, TransportError, WaitTimeout
from genq_client.models import Batch, Dataset, Event, Job, Model, Output


class AsyncClient:
    def __init__(
        self,
        url: str | None = None,
        key: str | None = None,
        *,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`url` and `key` default to the environment's GENQ_URL and GENQ_API_KEY."""
        self.url = (url or os.environ.get("GENQ_URL") or protocol.DEFAULT_URL).rstrip("/")
        key = key or os.environ.get("GENQ_API_KEY")
        if not key:
            raise ValueError("no API key: pass key= or set GENQ_API_KEY")
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.http = httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=timeout_s,
            transport=transport,
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    # -- requests --------------------------------------------------------------------------------

    async def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One call with the retry rule; raises the problem's exception on failure."""
        attempt = 0
        while True:
            try:
                response = await self.http.request(method, path, **kw)
            except httpx.TransportError as exc:
                delay = protocol.retry_delay_s(None, attempt)
                if attempt >= self.max_retries or delay is None:
                    raise TransportError(f"cannot reach {self.url}: {exc}") from exc
            else:
                delay = protocol.retry_delay_s(response, attempt)
                if attempt >= self.max_retries or delay is None:
                    return protocol.check(response)
            await asyncio.sleep(delay)
            attempt += 1

    async def _json(self, method: str, path: str, **kw: Any) -> Any:
        return (await self.request(method, path, **kw)).json()

    # -- jobs ------------------------------------------------------------------------------------

    async def submit(
        self,
        kind: str = "generate",
        *,
        model: str | None = None,
        family: str | None = None,
        dataset: str | None = None,
        name: str | None = None,
        params: dict[str, Any] | None = None,
        priority: int | str | None = None,
        idempotency_key: str | None = None,
        wait_s: int | None = None,
        **extra: Any,
    ) -> Job:
        """Submit a job. With `wait_s`, the server holds the call until the job ends or that
        many seconds pass (`Prefer: wait`); the job comes back as it is then."""
        body = protocol.job_body(
            kind,
            model=model,
            family=family,
            dataset=dataset,
            name=name,
            params=params,
            priority=priority,
            extra=extra,
        )
        headers = protocol.submit_headers(idempotency_key, wait_s)
        kw: dict[str, Any] = {"json": body, "headers": headers}
        if wait_s is not None:
            kw["timeout"] = httpx.Timeout(self.timeout_s + wait_s)
        return Job.from_json(await self._json("POST", "/v1/jobs", **kw))

    async def get_job(self, job_id: str) -> Job:
        return Job.from_json(await self._json("GET", f"/v1/jobs/{job_id}"))

    async def iter_jobs(
        self,
        *,
        state: str | None = None,
        kind: str | None = None,
        model: str | None = None,
        batch: str | None = None,
        page_size: int = 50,
    ) -> AsyncIterator[Job]:
        """Every job that matches, newest first, following the pages' cursors."""
        params = protocol.list_params(
            state=state, kind=kind, model=model, batch=batch, limit=page_size
        )
        while True:
            page = await self._json("GET", "/v1/jobs", params=params)
            for item in page["items"]:
                yield Job.from_json(item)
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    async def cancel(self, job_id: str) -> Job:
        return Job.from_json(await self._json("POST", f"/v1/jobs/{job_id}/cancel"))

    async def retry(self, job_id: str) -> Job:
        return Job.from_json(await self._json("POST", f"/v1/jobs/{job_id}/retry"))

    async def wait(
        self,
        job: Job | str,
        *,
        timeout_s: float | None = None,
        poll_s: float = 0.2,
        max_poll_s: float = 2.0,
        on_update: Callable[[Job], None] | None = None,
        raise_on_failure: bool = True,
    ) -> Job:
        """The job once it ends, polling with a growing interval. A failed or canceled job
        raises `JobFailed` (unless `raise_on_failure` is False); `timeout_s` passing raises
        `WaitTimeout` (the job goes on)."""
        current = job if isinstance(job, Job) else await self.get_job(job)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        interval = poll_s
        while not current.is_done:
            if on_update is not None:
                on_update(current)
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(current, timeout_s or 0)
            await asyncio.sleep(interval)
            interval = min(max_poll_s, interval * 1.5)
            current = await self.get_job(current.id)
        if on_update is not None:
            on_update(current)
        if raise_on_failure and current.state != "succeeded":
            raise JobFailed(current)
        return current

    async def events(
        self, job_id: str, *, last_event_id: int | None = None
    ) -> AsyncIterator[Event]:
        """The job's events (history, then live) until it ends. A dropped connection is
        resumed from the last event seen (Last-Event-ID), so no event is missed or repeated."""
        last = last_event_id
        attempt = 0
        while True:
            headers = {"Last-Event-ID": str(last)} if last is not None else {}
            seen = last
            try:
                async with self.http.stream(
                    "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=None
                ) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        delay = protocol.retry_delay_s(response, attempt)
                        if delay is None or attempt >= self.max_retries:
                            protocol.check(response)
                        await asyncio.sleep(delay or 0)
                        attempt += 1
                        continue
                    parser = protocol.SseParser()
                    async for line in response.aiter_lines():
                        event = parser.line(line)
                        if event is not None:
                            last = event.id
                            yield event
                # The server ends the stream when the job ends, or when it fails itself: then
                # the job goes on, and the stream is resumed.
                if (await self.get_job(job_id)).is_done:
                    return
                if last != seen:
                    attempt = 0
                else:  # nothing new on that connection: back off before the next
                    if attempt >= self.max_retries:
                        raise TransportError(f"the event stream of job {job_id} keeps ending")
                    await asyncio.sleep(protocol.retry_delay_s(None, attempt) or 0)
                    attempt += 1
            except httpx.TransportError as exc:
                if attempt >= self.max_retries:
                    raise TransportError(f"event stream of job {job_id} broke: {exc}") from exc
                await asyncio.sleep(protocol.retry_delay_s(None, attempt) or 0)
                attempt += 1

    # -- files, models, data sets, batches -------------------------------------------------------

    async def download(self, output: Output | str, path: str | Path | None = None) -> bytes:
        """An output's bytes (an Output, or its URL); also written to `path` if given."""
        url = output.url if isinstance(output, Output) else output
        data = (await self.request("GET", url)).content
        if path is not None:
            Path(path).write_bytes(data)
        return data

    async def upload_dataset(self, name: str, kind: str, file: str | Path) -> Dataset:
        """Upload a data set: `kind` `images` (a zip of class folders) or `text`."""
        path = Path(file)
        with path.open("rb") as handle:
            files = {"file": (path.name, handle.read())}
        data = {"name": name, "kind": kind}
        return Dataset.from_json(await self._json("POST", "/v1/datasets", data=data, files=files))

    async def list_datasets(self) -> list[Dataset]:
        return [Dataset.from_json(d) for d in (await self._json("GET", "/v1/datasets"))["items"]]

    async def register_model(
        self,
        name: str,
        *,
        family: str,
        path: str,
        description: str = "",
        tenant: str | None = None,
    ) -> Model:
        """Register a pretrained folder on the server (an admin key): `diffusers` or
        `transformers`."""
        body: dict[str, Any] = {
            "name": name,
            "family": family,
            "path": path,
            "description": description,
        }
        if tenant is not None:
            body["tenant"] = tenant
        return Model.from_json(await self._json("POST", "/v1/models", json=body))

    async def list_models(self) -> list[Model]:
        return [Model.from_json(m) for m in (await self._json("GET", "/v1/models"))["items"]]

    # -- deleting ------------------------------------------------------------------------------

    async def delete_job(self, job_id: str) -> None:
        """Delete a finished job with its events and outputs (`Conflict` if it has not
        finished: cancel it first)."""
        await self.request("DELETE", f"/v1/jobs/{job_id}")

    async def delete_output(self, output: Output | str) -> None:
        """Delete one output of a finished job (an Output, or its id)."""
        output_id = output.id if isinstance(output, Output) else output
        await self.request("DELETE", f"/v1/artifacts/{output_id}")

    async def delete_model(self, name: str, version: int, *, force: bool = False) -> None:
        """Delete a model version (`Conflict` while jobs wait for or run on it, or while other
        versions were fine-tuned from it unless `force`: they are kept, without the link)."""
        params = {"force": "true"} if force else None
        await self.request("DELETE", f"/v1/models/{name}/{version}", params=params)

    async def delete_dataset(self, dataset_id: str) -> None:
        """Delete a data set (`Conflict` while a waiting or running job trains on it)."""
        await self.request("DELETE", f"/v1/datasets/{dataset_id}")

    async def submit_batch(
        self, jobs: list[dict[str, Any]], *, idempotency_key: str | None = None
    ) -> Batch:
        """Submit up to 1,000 job bodies (as `submit` sends them) at once: all or none."""
        headers = protocol.submit_headers(idempotency_key, None)
        return Batch.from_json(
            await self._json("POST", "/v1/batches", json={"jobs": jobs}, headers=headers)
        )

    async def get_batch(self, batch_id: str) -> Batch:
        return Batch.from_json(await self._json("GET", f"/v1/batches/{batch_id}"))
