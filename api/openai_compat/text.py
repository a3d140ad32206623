"""`POST /openai/v1/chat/completions` and `POST /openai/v1/completions` on the language-model
families (`charlm`, `transformers`), answered in OpenAI's shapes, or streamed as OpenAI's
server-sent chunks with `stream: true`.

Each choice is one genq job (`n` > 1: n jobs, their seeds `seed`, `seed + 1`, ...; a list of
prompts: n jobs per prompt), created together and batched by their model's server. A chat
on a `transformers` model goes through its tokenizer's chat template; `charlm` has none, so
its chat is written out as `role: content` lines ending in `assistant: `. Family parameters
OpenAI lacks (`top_k`) come through `extra_body`; other unknown fields are ignored.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from flask import Blueprint, Response, g, jsonify, stream_with_context
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from api.jobs import read_json_body
from api.openai_compat import calls
from api.openai_compat.errors import JOB_ID_HEADER, JobWaitError, error_event
from api.state import genq
from core.errors import InvalidInputError
from core.states import is_terminal
from core.tables import Job, JobEvent, Model
from scheduler.enqueue import Wakeups
from workers.families.base import OpenAIShape
from workers.registry import FAMILIES

bp = Blueprint("text", __name__)

LANGUAGE_SHAPES = (OpenAIShape.CHAT, OpenAIShape.TEXT)
STOP_MAX = 16


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str = ""


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class Sampling(BaseModel):
    """What chat and completions share. Unknown fields are ignored, as OpenAI's servers do."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(..., min_length=1, max_length=140)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(..., min_length=1, max_length=500)


class CompletionRequest(Sampling):
    prompt: str | list[str] = Field(..., max_length=64)
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


def _text(content: str | list[TextPart] | None, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    for part in content:
        if part.type != "text":
            raise InvalidInputError.one(
                f"messages.{index}.content", f"{part.type} parts are not supported, only text"
            )
    return "".join(part.text for part in content)


def _messages(req: ChatRequest) -> list[dict[str, str]]:
    return [
        {"role": "system" if m.role == "developer" else m.role, "content": _text(m.content, i)}
        for i, m in enumerate(req.messages)
    ]


def chat_as_text(messages: list[dict[str, str]]) -> str:
    """A chat for a model without a chat template (a `text` family: charlm)."""
    lines = [f"{m['role']}: {m['content']}\n" for m in messages]
    return "".join(lines) + "assistant: "


def _sampling(req: Sampling, model: Model, body: dict[str, Any]) -> dict[str, Any]:
    """The family's generate params from the OpenAI fields, plus its own from extra_body."""
    params: dict[str, Any] = {}
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else None
    if max_tokens is None:
        max_tokens = req.max_tokens
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    for name in ("temperature", "top_p"):
        if (value := getattr(req, name)) is not None:
            params[name] = value
    if req.stop is not None:
        params["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    spec = FAMILIES[model.family].generate_params
    taken = {"prompt", "messages", "seed", *params}
    params.update(calls.family_fields(spec, body, taken))
    return params


def _seeded(params: dict[str, Any], seed: int | None, n: int) -> list[dict[str, Any]]:
    return [{**params, "seed": seed + i if seed is not None else None} for i in range(n)]


def _language_model(ref: str) -> Model:
    model = calls.find_model(ref)
    family = FAMILIES.get(model.family)
    if family is None or family.openai not in LANGUAGE_SHAPES:
        speaking = sorted(name for name, f in FAMILIES.items() if f.openai in LANGUAGE_SHAPES)
        raise InvalidInputError.one(
            "model",
            f"model {model.ref} is a {model.family} model; chat and completions take a "
            f"language model ({', '.join(speaking)})",
        )
    return model


@dataclass
class TextCall:
    """A chat or completion request turned into its jobs' params (one per choice)."""

    model: Model
    req: Sampling
    choices: list[dict[str, Any]]
    chat: bool
    # What each prompt's choices start with: the prompt itself with `echo`, else "".
    heads: list[str]


def chat_call(body: dict[str, Any]) -> TextCall:
    req = calls.parse(ChatRequest, body)
    model = _language_model(req.model)
    base = _sampling(req, model, body)
    messages = _messages(req)
    if FAMILIES[model.family].openai == OpenAIShape.TEXT:
        base["prompt"] = chat_as_text(messages)
    else:
        base["messages"] = messages
    return TextCall(model, req, _seeded(base, req.seed, req.n), chat=True, heads=[""])


def completion_call(body: dict[str, Any]) -> TextCall:
    req = calls.parse(CompletionRequest, body)
    if req.suffix:
        raise InvalidInputError.one("suffix", "is not supported")
    if req.logprobs:
        raise InvalidInputError.one("logprobs", "is not supported")
    model = _language_model(req.model)
    base = _sampling(req, model, body)
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not prompts:
        raise InvalidInputError.one("prompt", "must not be an empty list")
    choices = [
        params
        for prompt in prompts
        for params in _seeded({**base, "prompt": prompt}, req.seed, req.n)
    ]
    heads = prompts if req.echo else ["" for _ in prompts]
    return TextCall(model, req, choices, chat=False, heads=heads)


@bp.post("/chat/completions")
def chat() -> Response:
    body = read_json_body()
    g.openai_renames = {}
    call = chat_call(body)
    return _answer(call.model, call.req, body, call.choices, chat=True, prompts=call.heads)


@bp.post("/completions")
def completions() -> Response:
    body = read_json_body()
    g.openai_renames = {}
    call = completion_call(body)
    return _answer(call.model, call.req, body, call.choices, chat=False, prompts=call.heads)


def _answer(
    model: Model,
    req: Sampling,
    body: dict[str, Any],
    choices: list[dict[str, Any]],
    *,
    chat: bool,
    prompts: list[str],
) -> Response:
    submissions = calls.submissions_for(model, choices, body)
    wait_s = calls.wait_s(body)
    slots = calls.take_slot()
    try:
        job_ids = calls.create_jobs(submissions)
    except BaseException:
        slots.release()
        raise
    created = int(time.time())
    # Choice i echoes the prompt it continues (completions with echo: true).
    heads = [prompts[i // req.n] for i in range(len(job_ids))]
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        stream = _stream(job_ids, model.ref, created, chat, heads, req.n, include_usage, wait_s)
        # The stream reads the app's database as it goes: it keeps the request's context.
        response = Response(stream_with_context(stream), mimetype="text/event-stream")
        response.call_on_close(slots.release)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
    else:
        try:
            calls.wait_done(job_ids, wait_s)
            found = calls.results(job_ids)
        finally:
            slots.release()
        response = jsonify(completion_body(found, model.ref, created, chat, heads, req.n))
    response.headers[JOB_ID_HEADER] = ", ".join(job_ids)
    return response


def _text_output(result: calls.Result) -> tuple[str, dict[str, Any]]:
    for artifact in result.outputs:
        if artifact.kind == "text":
            return calls.read_output(artifact).decode("utf-8", "replace"), artifact.meta or {}
    return "", {}


def _finish(meta: dict[str, Any]) -> str:
    return "length" if meta.get("finish_reason", "length") == "length" else "stop"


def completion_body(
    found: list[calls.Result], ref: str, created: int, chat: bool, heads: list[str], n: int
) -> dict[str, Any]:
    """The answer to a chat or completion call whose jobs finished (`found`)."""
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for index, result in enumerate(found):
        text, meta = _text_output(result)
        if index % n == 0:  # the prompt is counted once, however many choices continue it
            prompt_tokens += int(meta.get("prompt_tokens") or 0)
        completion_tokens += int(meta.get("completion_tokens") or 0)
        if chat:
            choice: dict[str, Any] = {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "finish_reason": _finish(meta),
                "logprobs": None,
            }
        else:
            choice = {
                "index": index,
                "text": heads[index] + text,
                "finish_reason": _finish(meta),
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


def _stream(
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
                _, meta = _text_output(result)
                index = index_of[result.job.id]
                usage["completion_tokens"] += int(meta.get("completion_tokens") or 0)
                if index % n == 0:
                    usage["prompt_tokens"] += int(meta.get("prompt_tokens") or 0)
                yield _chunk(call_id, ref, created, chat, index, finish=_finish(meta))
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
