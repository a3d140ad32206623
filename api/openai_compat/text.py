"""`POST /openai/v1/chat/completions` and `POST /openai/v1/completions` on the language-model
families (`charlm`, `transformers`), answered in OpenAI's shapes, or streamed as OpenAI's
server-sent chunks with `stream: true` (api/openai_compat/text_answers.py writes both).

Each choice is one genq job (`n` > 1: n jobs, their seeds `seed`, `seed + 1`, ...; a list of
prompts: n jobs per prompt), created together and batched by their model's server. A chat
on a `transformers` model goes through its tokenizer's chat template; `charlm` has none, so
its chat is written out as `role: content` lines ending in `assistant: `. Family parameters
OpenAI lacks (`top_k`) come through `extra_body`; other unknown fields are ignored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from flask import Blueprint, Response, g, jsonify, stream_with_context
from pydantic import BaseModel, ConfigDict, Field

from api.jobs import read_json_body
from api.openai_compat import calls
from api.openai_compat.errors import JOB_ID_HEADER
from api.openai_compat.text_answers import completion_body, stream_choices
from core.errors import InvalidInputError
from core.tables import Model
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
        stream = stream_choices(
            job_ids, model.ref, created, chat, heads, req.n, include_usage, wait_s
        )
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
