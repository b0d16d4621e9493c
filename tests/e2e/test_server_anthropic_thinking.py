"""Anthropic thinking on a model whose chat template reasons (Qwen3-style <think> blocks): thinking
blocks and thinking_delta events when enabled, none when disabled, and metadata reaching the
template. A tiny random model is steered by a GBNF grammar (LocalAI's extension) so its answer is
known: "<think>\\nlet me see\\n</think>\\nHello"."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests import ggufgen

from .test_server_anthropic import events
from .test_server_openai import Server

pytestmark = pytest.mark.e2e

THINK_TEMPLATE = """{%- for message in messages %}<|im_start|>{{ message.role }}
{%- if message.role == 'assistant' and message.reasoning_content %}
<think>
{{ message.reasoning_content }}
</think>
{%- endif %}
{{ message.content }}<|im_end|>
{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant
{%- if enable_thinking is defined and enable_thinking is false %}
<think>

</think>
{%- endif %}
{% endif %}"""
GRAMMAR = 'root ::= "<think>\\nlet me see\\n</think>\\nHello"'


@pytest.fixture(scope="module")
def server(engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    d = tmp_path_factory.mktemp("tmodels")
    vocab = ggufgen.ROOT / "third_party" / "llama.cpp" / "models" / "ggml-vocab-qwen2.gguf"
    ggufgen.write_tiny_llama(d / "thinker.gguf", vocab_path=vocab, chat_template=THINK_TEMPLATE)
    (d / "thinker.yaml").write_text(json.dumps({"name": "thinker", "parameters": {"model": "thinker.gguf", "temperature": 0.0}}))
    s = Server(d)
    yield s
    s.stop()


def post(server: Server, body: Any, path: str = "/v1/messages") -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120, headers={"anthropic-version": "2023-06-01"})


def ask(**extra: Any) -> dict[str, Any]:
    return {"model": "thinker", "max_tokens": 40, "grammar": GRAMMAR,
            "messages": [{"role": "user", "content": "Say hello"}], **extra}


def test_thinking_enabled_gives_a_thinking_block_then_text(server: Server) -> None:
    r = post(server, ask(thinking={"type": "enabled", "budget_tokens": 1024}))
    assert r.status_code == 200, r.text
    content = r.json()["content"]
    assert [b["type"] for b in content] == ["thinking", "text"], content
    assert content[0]["thinking"].strip() == "let me see" and "signature" in content[0]
    assert content[1]["text"].strip() == "Hello"
    assert r.json()["stop_reason"] == "end_turn"


def test_thinking_streams_thinking_deltas_before_text(server: Server) -> None:
    r = post(server, ask(thinking={"type": "enabled", "budget_tokens": 1024}, stream=True))
    assert r.status_code == 200
    evs = [(n, d) for n, d in events(r) if n != "ping"]
    starts = [d["content_block"]["type"] for n, d in evs if n == "content_block_start"]
    assert starts == ["thinking", "text"]
    thinking = "".join(d["delta"]["thinking"] for n, d in evs
                       if n == "content_block_delta" and d["delta"]["type"] == "thinking_delta")
    text = "".join(d["delta"]["text"] for n, d in evs if n == "content_block_delta" and d["delta"]["type"] == "text_delta")
    assert thinking.strip() == "let me see" and text.strip() == "Hello"
    first_text = next(i for i, (n, d) in enumerate(evs) if n == "content_block_delta" and d["delta"]["type"] == "text_delta")
    last_thinking = max(i for i, (n, d) in enumerate(evs) if n == "content_block_delta" and d["delta"]["type"] == "thinking_delta")
    assert last_thinking < first_text
    assert [n for n, _ in evs][-2:] == ["message_delta", "message_stop"]


def test_thinking_disabled_gives_no_thinking_block(server: Server) -> None:
    r = post(server, ask(thinking={"type": "disabled"}))
    assert r.status_code == 200, r.text
    assert all(b["type"] != "thinking" for b in r.json()["content"])


def test_metadata_reaches_the_chat_template(server: Server) -> None:
    # enable_thinking=false makes this template close an empty <think> block in the prompt
    on = post(server, ask(metadata={"enable_thinking": "true"}), "/v1/messages/count_tokens")
    off = post(server, ask(metadata={"enable_thinking": "false"}), "/v1/messages/count_tokens")
    assert on.status_code == 200 and off.status_code == 200, off.text
    assert off.json()["input_tokens"] > on.json()["input_tokens"]
    r = post(server, ask(metadata={"enable_thinking": "false"}, thinking={"type": "enabled", "budget_tokens": 1024}))
    assert r.status_code == 200 and all(b["type"] != "thinking" for b in r.json()["content"])


CITY = {"name": "get_weather", "description": "Weather for a city",
        "input_schema": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}}


@pytest.mark.parametrize("choice", ["none", {"type": "none"}])
def test_tool_choice_none_forms_offer_no_tools(server: Server, choice: Any) -> None:
    r = post(server, {"model": "thinker", "max_tokens": 8, "tools": [CITY], "tool_choice": choice,
                      "messages": [{"role": "user", "content": "Weather in Paris?"}]})
    assert r.status_code == 200, r.text
    assert all(b["type"] != "tool_use" for b in r.json()["content"]) and r.json()["stop_reason"] != "tool_use"
