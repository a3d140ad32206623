"""The answers to `POST /openai/v1/chat/completions` and `POST /openai/v1/completions` (and to
their lines in an OpenAI batch): the whole body once every choice's job has finished, or, with
`stream: true`, OpenAI's server-sent chunks as the jobs' text deltas are recorded, each choice's
finish reason, the usage if asked for and `[DONE]`. A job that runs again after a failure does
not repeat the text a choice has streamed (`ChoiceText`). The views are api/openai_compat/text.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import select

from api.openai_compat import calls
from api.openai_compat.errors import JobWaitError, error_event
from api.state import genq
from core.states import is_terminal
from core.tables import Job, JobEvent
from scheduler.enqueue import Wakeups


def text_output(result: calls.Result) -> tuple[str, dict[str, Any]]:
    """A finished job's text and its output's meta (token counts, finish reason)."""
    for artifact in result.outputs:
        if artifact.kind == "text":
            return calls.read_output(artifact).decode("utf-8", "replace"), artifact.meta or {}
    return "", {}


def finish_reason(meta: dict[str, Any]) -> str:
    """OpenAI's finish_reason of a choice: `length` unless the model stopped on its own."""
    return "length" if meta.get("finish_reason", "length") == "length" else "stop"


def completion_body(
    found: list[calls.Result], ref: str, created: int, chat: bool, heads: list[str], n: int
) -> dict[str, Any]:
    """The answer to a chat or completion call whose jobs finished (`found`)."""
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for index, result in enumerate(found):
        text, meta = text_output(result)
        if index % n == 0:  # the prompt is counted once, however many choices continue it
            prompt_tokens += int(meta.get("prompt_tokens") or 0)
        completion_tokens += int(meta.get("completion_tokens") or 0)
        if chat:
            choice: dict[str, Any] = {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason(meta),
                "logprobs": None,
            }
        else:
            choice = {
                "index": index,
                "text": heads[index] + text,
                "finish_reason": finish_reason(meta),
                "logprobs": None,
            }
        choices.append(choice)
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{found[0].job.id}",
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": ref,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "system_fingerprint": None,
    }


def _chunk(
    call_id: str,
    ref: str,
    created: int,
    chat: bool,
    index: int,
    *,
    text: str | None = None,
    finish: str | None = None,
    role: bool = False,
) -> str:
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish}
    choice["logprobs"] = None
    body = {
        "id": call_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": ref,
        "choices": [choice],
    }
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def _poll(job_ids: list[str], after_id: int) -> tuple[dict[str, str], list[JobEvent]]:
    """The jobs' states, then their text deltas after `after_id` (read in this order, a job
    seen finished has all its events visible: see api.events)."""
    with genq().database.read() as session:
        states = dict(session.execute(select(Job.id, Job.state).where(Job.id.in_(job_ids))).all())
        events = list(
            session.scalars(
                select(JobEvent)
                .where(
                    JobEvent.job_id.in_(job_ids),
                    JobEvent.id > after_id,
                    JobEvent.type == "text_delta",
                )
                .order_by(JobEvent.id)
            )
        )
        session.expunge_all()
    return states, events


class ChoiceText:
    """The text one choice's stream has sent. A job that runs again after a failure streams
    its text again from the start (its text_delta events name the new attempt): what repeats
    the text sent is skipped, and text that differs from it (another seed drawn) ends the
    stream with an error, since what was sent cannot be taken back."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.sent = ""
        self.attempt: int | None = None
        # The text of an attempt after the first that streamed, while it repeats `sent`.
        self.again: str | None = None

    def add(self, attempt: int | None, text: str) -> str:
        """What to send of a text_delta of `attempt` ("" when it repeats what was sent)."""
        if attempt is not None and self.attempt is not None and attempt > self.attempt:
            self.again = ""
        if attempt is not None:
            self.attempt = attempt
        if self.again is None:
            self.sent += text
            return text
        self.again += text
        common = min(len(self.again), len(self.sent))
        if self.again[:common] != self.sent[:common]:
            raise JobWaitError(
                f"job {self.job_id} ran again after a failure and made other text than it "
                f"had streamed; GET /v1/jobs/{self.job_id} has its final text",
                status=500,
                code="job_text_changed",
                job_ids=[self.job_id],
            )
        new = self.again[len(self.sent) :]
        self.sent += new
        return new


def stream_choices(
    job_ids: list[str],
    ref: str,
    created: int,
    chat: bool,
    heads: list[str],
    n: int,
    include_usage: bool,
    wait_s: int,
) -> Iterator[str]:
    """The choices' text deltas as they are recorded, then each choice's finish reason, the
    usage if asked for, and `[DONE]`; a failure (a failed job, the wait running out) is the
    last event, in OpenAI's error shape."""
    state = genq()
    call_id = f"{'chatcmpl' if chat else 'cmpl'}-{job_ids[0]}"
    index_of = {job_id: i for i, job_id in enumerate(job_ids)}
    open_ = set(job_ids)
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    for i in range(len(job_ids)):
        if chat:
            yield _chunk(call_id, ref, created, chat, i, role=True)
        elif heads[i]:
            yield _chunk(call_id, ref, created, chat, i, text=heads[i])
    deadline = time.monotonic() + wait_s
    last_id = 0
    texts = {job_id: ChoiceText(job_id) for job_id in job_ids}
    # Subscribed before the first read: each commit of the jobs' events wakes the stream.
    woken = Wakeups(state.publisher.redis, job_ids)
    try:
        while open_:
            states, events = _poll(sorted(open_), last_id)
            for event in events:
                last_id = event.id
                data = event.data or {}
                text = texts[event.job_id].add(data.get("attempt"), data.get("text", ""))
                if text:
                    index = index_of[event.job_id]
                    yield _chunk(call_id, ref, created, chat, index, text=text)
            finished = sorted(
                (j for j in open_ if is_terminal(states.get(j, "succeeded"))),
                key=index_of.__getitem__,
            )
            for result in calls.results(finished) if finished else []:
                _, meta = text_output(result)
                index = index_of[result.job.id]
                usage["completion_tokens"] += int(meta.get("completion_tokens") or 0)
                if index % n == 0:
                    usage["prompt_tokens"] += int(meta.get("prompt_tokens") or 0)
                yield _chunk(call_id, ref, created, chat, index, finish=finish_reason(meta))
                open_.discard(result.job.id)
            if not open_ or finished:
                continue
            if time.monotonic() > deadline:
                raise calls.timed_out(job_ids, wait_s)
            woken.wait(state.stream_poll_s)
    except Exception as exc:  # the response has started: the error is the stream's last event
        yield error_event(exc)
        return
    finally:
        woken.close()
    if include_usage:
        total = usage["prompt_tokens"] + usage["completion_tokens"]
        body: dict[str, Any] = {
            "id": call_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": ref,
            "choices": [],
            "usage": {**usage, "total_tokens": total},
        }
        yield f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
    yield "data: [DONE]\n\n"
