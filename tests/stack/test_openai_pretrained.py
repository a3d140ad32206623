"""The OpenAI-compatible API on pretrained folders (tests/support/pretrained_models.py), through a
real `genq up`, with the official `openai` client: chat through a `transformers` model's
chat template (streamed and not, with stop strings and usage counted in its tokens), a model
without a template refused naming `messages`, and `diffusers` images at a requested size."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from PIL import Image

from genq_client import Client
from tests.support.pretrained_models import build_tiny_lm, build_tiny_sd
from tests.support.stackproc import StackProcess, running_stack

pytestmark = pytest.mark.stack


def _ready(stack: StackProcess, name: str, family: str, path: Path) -> None:
    with Client(stack.url, stack.admin_key) as genq:
        assert genq.register_model(name, family=family, path=str(path)).status == "checking"
    deadline = time.monotonic() + 180
    while True:
        (model,) = stack.call("GET", f"/v1/models/{name}").json()["items"]
        if model["status"] != "checking":
            assert model["status"] == "ready", model
            return
        assert time.monotonic() < deadline, f"{name} still checking"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    root = tmp_path_factory.mktemp("openai-pretrained")
    # Ray counts CPUs as slots: each warm model server holds one (the tiny models hardly
    # use them).
    with running_stack(root / "var", {"GENQ_RAY_NUM_CPUS": "8"}, check_leftovers=False) as proc:
        _ready(proc, "chat", "transformers", build_tiny_lm(root / "lm"))
        _ready(proc, "plain", "transformers", build_tiny_lm(root / "plain", chat_template=False))
        _ready(proc, "sd", "diffusers", build_tiny_sd(root / "sd"))
        yield proc


def _oa(stack: StackProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/openai/v1", api_key=stack.admin_key, max_retries=0)


def test_transformers_chat(stack: StackProcess) -> None:
    client = _oa(stack)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
    ]
    reply = client.chat.completions.create(
        model="chat", messages=messages, max_tokens=8, seed=2, temperature=0.7
    )
    text = reply.choices[0].message.content or ""
    assert reply.usage is not None and reply.usage.prompt_tokens > 0
    assert 0 < reply.usage.completion_tokens <= 8
    streamed = client.chat.completions.create(
        model="chat", messages=messages, max_tokens=8, seed=2, temperature=0.7, stream=True
    )
    chunks = list(streamed)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    if len(text) > 3:
        stop = text[2:4]
        cut = client.chat.completions.create(
            model="chat", messages=messages, max_tokens=8, seed=2, temperature=0.7, stop=stop
        )
        assert cut.choices[0].finish_reason == "stop"
        assert cut.choices[0].message.content == text[: text.find(stop)]

    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="plain", messages=messages, max_tokens=4)
    assert refused.value.param == "messages"
    completion = client.completions.create(model="plain", prompt="Hello", max_tokens=4, seed=1)
    assert completion.choices[0].text is not None


def test_diffusers_images(stack: StackProcess) -> None:
    client = _oa(stack)
    images = client.images.generate(
        model="sd",
        prompt="a red fox",
        n=2,
        size="48x40",
        response_format="b64_json",
        extra_body={"steps": 2, "seed": 7},
    )
    pictures = [Image.open(io.BytesIO(base64.b64decode(d.b64_json or ""))) for d in images.data]
    assert [p.size for p in pictures] == [(48, 40), (48, 40)]
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(model="sd", prompt="x", size="50x50")
    assert bad.value.param == "size"
