"""`Client`: genq's HTTP API from Python, synchronously, on httpx.

    with Client("http://127.0.0.1:8000", key) as genq:
        job = genq.submit(model="digits-ddpm", params={"label": 3}, wait_s=60)
        job = genq.wait(job)                      # returns at once if it finished in time
        png = genq.download(job.outputs[0])

Requests answered 429 or 503 are retried (`max_retries` times) after the server's
Retry-After, or a backoff; so are requests that could not connect. Problem responses become
the exceptions of `genq_client.errors`. `transport` is the test seam: pass an httpx
transport (e.g. `httpx.MockTransport`) instead of patching.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from genq_client import protocol
from genq_client.errors import JobFailed, TransportError, WaitTimeout
from genq_client.models import Batch, Dataset, Event, Job, Model, Output


class Client:
    def __init__(
        self,
        url: str | None = None,
        key: str | None = None,
        *,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """`url` and `key` default to the environment's GENQ_URL and GENQ_API_KEY."""
        self.url = (url or os.environ.get("GENQ_URL") or protocol.DEFAULT_URL).rstrip("/")
        key = key or os.environ.get("GENQ_API_KEY")
        if not key:
            raise ValueError("no API key: pass key= or set GENQ_API_KEY")
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=timeout_s,
            transport=transport,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # -- requests --------------------------------------------------------------------------------

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One call with the retry rule; raises the problem's exception on failure."""
        attempt = 0
        while True:
            try:
                response = self.http.request(method, path, **kw)
            except httpx.TransportError as exc:
                delay = protocol.retry_delay_s(None, attempt)
                if attempt >= self.max_retries or delay is None:
                    raise TransportError(f"cannot reach {self.url}: {exc}") from exc
            else:
                delay = protocol.retry_delay_s(response, attempt)
                if attempt >= self.max_retries or delay is None:
                    return protocol.check(response)
            time.sleep(delay)
            attempt += 1

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        return self.request(method, path, **kw).json()

    # -- jobs ------------------------------------------------------------------------------------

    def submit(
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
        return Job.from_json(self._json("POST", "/v1/jobs", **kw))

    def get_job(self, job_id: str) -> Job:
        return Job.from_json(self._json("GET", f"/v1/jobs/{job_id}"))

    def iter_jobs(
        self,
        *,
        state: str | None = None,
        kind: str | None = None,
        model: str | None = None,
        batch: str | None = None,
        page_size: int = 50,
    ) -> Iterator[Job]:
        """Every job that matches, newest first, following the pages' cursors."""
        params = protocol.list_params(
            state=state, kind=kind, model=model, batch=batch, limit=page_size
        )
        while True:
            page = self._json("GET", "/v1/jobs", params=params)
            for item in page["items"]:
                yield Job.from_json(item)
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    def cancel(self, job_id: str) -> Job:
        return Job.from_json(self._json("POST", f"/v1/jobs/{job_id}/cancel"))

    def retry(self, job_id: str) -> Job:
        return Job.from_json(self._json("POST", f"/v1/jobs/{job_id}/retry"))

    def wait(
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
        current = job if isinstance(job, Job) else self.get_job(job)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        interval = poll_s
        while not current.is_done:
            if on_update is not None:
                on_update(current)
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(current, timeout_s or 0)
            time.sleep(interval)
            interval = min(max_poll_s, interval * 1.5)
            current = self.get_job(current.id)
        if on_update is not None:
            on_update(current)
        if raise_on_failure and current.state != "succeeded":
            raise JobFailed(current)
        return current

    def events(self, job_id: str, *, last_event_id: int | None = None) -> Iterator[Event]:
        """The job's events (history, then live) until it ends. A dropped connection is
        resumed from the last event seen (Last-Event-ID), so no event is missed or repeated."""
        last = last_event_id
        attempt = 0
        while True:
            headers = {"Last-Event-ID": str(last)} if last is not None else {}
            seen = last
            try:
                with self.http.stream(
                    "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=None
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        delay = protocol.retry_delay_s(response, attempt)
                        if delay is None or attempt >= self.max_retries:
                            protocol.check(response)
                        time.sleep(delay or 0)
                        attempt += 1
                        continue
                    for event in protocol.SseParser().feed(response.iter_lines()):
                        last = event.id
                        yield event
                # The server ends the stream when the job ends, or when it fails itself: then
                # the job goes on, and the stream is resumed.
                if (self.get_job(job_id)).is_done:
                    return
                if last != seen:
                    attempt = 0
                else:  # nothing new on that connection: back off before the next
                    if attempt >= self.max_retries:
                        raise TransportError(f"the event stream of job {job_id} keeps ending")
                    time.sleep(protocol.retry_delay_s(None, attempt) or 0)
                    attempt += 1
            except httpx.TransportError as exc:
                if attempt >= self.max_retries:
                    raise TransportError(f"event stream of job {job_id} broke: {exc}") from exc
                time.sleep(protocol.retry_delay_s(None, attempt) or 0)
                attempt += 1

    # -- files, models, data sets, batches -------------------------------------------------------

    def download(self, output: Output | str, path: str | Path | None = None) -> bytes:
        """An output's bytes (an Output, or its URL); also written to `path` if given."""
        url = output.url if isinstance(output, Output) else output
        data = self.request("GET", url).content
        if path is not None:
            Path(path).write_bytes(data)
        return data

    def upload_dataset(self, name: str, kind: str, file: str | Path) -> Dataset:
        """Upload a data set: `kind` `images` (a zip of class folders) or `text`."""
        path = Path(file)
        with path.open("rb") as handle:
            files = {"file": (path.name, handle.read())}
        data = {"name": name, "kind": kind}
        return Dataset.from_json(self._json("POST", "/v1/datasets", data=data, files=files))

    def list_datasets(self) -> list[Dataset]:
        return [Dataset.from_json(d) for d in self._json("GET", "/v1/datasets")["items"]]

    def register_model(
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
        return Model.from_json(self._json("POST", "/v1/models", json=body))

    def list_models(self) -> list[Model]:
        return [Model.from_json(m) for m in self._json("GET", "/v1/models")["items"]]

    # -- deleting ------------------------------------------------------------------------------

    def delete_job(self, job_id: str) -> None:
        """Delete a finished job with its events and outputs (`Conflict` if it has not
        finished: cancel it first)."""
        self.request("DELETE", f"/v1/jobs/{job_id}")

    def delete_output(self, output: Output | str) -> None:
        """Delete one output of a finished job (an Output, or its id)."""
        output_id = output.id if isinstance(output, Output) else output
        self.request("DELETE", f"/v1/artifacts/{output_id}")

    def delete_model(self, name: str, version: int, *, force: bool = False) -> None:
        """Delete a model version (`Conflict` while jobs wait for or run on it, or while other
        versions were fine-tuned from it unless `force`: they are kept, without the link)."""
        params = {"force": "true"} if force else None
        self.request("DELETE", f"/v1/models/{name}/{version}", params=params)

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete a data set (`Conflict` while a waiting or running job trains on it)."""
        self.request("DELETE", f"/v1/datasets/{dataset_id}")

    def submit_batch(
        self, jobs: list[dict[str, Any]], *, idempotency_key: str | None = None
    ) -> Batch:
        """Submit up to 1,000 job bodies (as `submit` sends them) at once: all or none."""
        headers = protocol.submit_headers(idempotency_key, None)
        return Batch.from_json(
            self._json("POST", "/v1/batches", json={"jobs": jobs}, headers=headers)
        )

    def get_batch(self, batch_id: str) -> Batch:
        return Batch.from_json(self._json("GET", f"/v1/batches/{batch_id}"))
