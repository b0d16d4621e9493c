"""Anthropic Messages API over real HTTP with SmolLM2: the official anthropic SDK (streaming
helpers, tool-use round trip) and raw HTTP for the exact event order and error shapes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import import_or_missing

from .test_server_openai import Server

pytestmark = pytest.mark.e2e

WEATHER = {"name": "get_weather", "description": "Get the weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def server(engine: Any, smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    d = tmp_path_factory.mktemp("amodels")
    (d / "smollm2.gguf").symlink_to(smollm2_path)
    (d / "smol.yaml").write_text(json.dumps({"name": "smol", "parameters": {"model": "smollm2.gguf", "temperature": 0.0}}))
    s = Server(d, "--api-keys", "secret")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[Any]:
    anthropic = import_or_missing("anthropic")
    with anthropic.Anthropic(base_url=server.url, api_key="secret", max_retries=0, timeout=120) as c:  # closes its connections: no socket is left for the GC to warn about
        yield c


def post(server: Server, body: Any, path: str = "/v1/messages", **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body)
    return httpx.post(server.url + path, content=content, timeout=120,
                      headers={"x-api-key": "secret", "anthropic-version": "2023-06-01", "content-type": "application/json", **headers})


def events(resp: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for frame in resp.text.strip().split("\n\n"):
        lines = frame.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), frame
        name, data = lines[0][7:], json.loads(lines[1][6:])
        assert data["type"] == name
        out.append((name, data))
    return out


def test_create_with_the_sdk(client: Any) -> None:
    m = client.messages.create(model="smol", max_tokens=16, system="Answer in one word.",
                               messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert m.content[0].type == "text" and "Paris" in m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert m.usage.input_tokens > 5 and 0 < m.usage.output_tokens <= 16


def test_max_tokens_and_stop_sequence_reasons(client: Any) -> None:
    m = client.messages.create(model="smol", max_tokens=3, messages=[{"role": "user", "content": "Count to twenty"}])
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 3
    ref = client.messages.create(model="smol", max_tokens=30, messages=[{"role": "user", "content": "Count from 1 to 10"}]).content[0].text
    stop = ref.strip()[2:5]
    m = client.messages.create(model="smol", max_tokens=30, stop_sequences=[stop], messages=[{"role": "user", "content": "Count from 1 to 10"}])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert stop not in m.content[0].text


def test_ignore_eos_extension_gives_the_full_length(client: Any) -> None:
    # "Say OK." ends after a couple of tokens; with llama.cpp's ignore_eos it runs to max_tokens
    short = client.messages.create(model="smol", max_tokens=200, messages=[{"role": "user", "content": "Say OK."}])
    assert short.stop_reason == "end_turn" and short.usage.output_tokens < 200
    m = client.messages.create(model="smol", max_tokens=200, messages=[{"role": "user", "content": "Say OK."}],
                               extra_body={"ignore_eos": True})
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 200


def test_streaming_event_order(server: Server) -> None:
    resp = post(server, {"model": "smol", "max_tokens": 6, "stream": True, "messages": [{"role": "user", "content": "Hi"}]})
    assert resp.status_code == 200
    evs = events(resp)
    names = [n for n, _ in evs if n != "ping"]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names[1] == "content_block_start" and names[-3] == "content_block_stop"
    assert set(names[2:-3]) == {"content_block_delta"}
    start = evs[0][1]["message"]
    assert start["usage"]["input_tokens"] > 0 and start["content"] == []
    delta = [d for n, d in evs if n == "message_delta"][0]
    assert delta["delta"]["stop_reason"] == "max_tokens" and delta["usage"]["output_tokens"] == 6


def test_streaming_helper_of_the_sdk(client: Any) -> None:
    with client.messages.stream(model="smol", max_tokens=10, messages=[{"role": "user", "content": "Say hello"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text and text.strip()


def test_tool_use_round_trip(client: Any) -> None:
    m = client.messages.create(model="smol", max_tokens=60, tools=[WEATHER], tool_choice={"type": "any"},
                               messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    assert m.stop_reason == "tool_use"
    block = next(b for b in m.content if b.type == "tool_use")
    assert block.id.startswith("toolu_") and block.name == "get_weather" and isinstance(block.input["city"], str)
    m2 = client.messages.create(model="smol", max_tokens=20, tools=[WEATHER], messages=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "sunny, 21C"}]}])
    assert m2.content and m2.stop_reason in ("end_turn", "max_tokens")


def test_named_tool_streams_input_json_deltas(server: Server) -> None:
    resp = post(server, {"model": "smol", "max_tokens": 60, "stream": True, "tools": [WEATHER],
                         "tool_choice": {"type": "tool", "name": "get_weather"},
                         "messages": [{"role": "user", "content": "Weather in Rome?"}]})
    evs = [(n, d) for n, d in events(resp) if n != "ping"]
    starts = [d["content_block"] for n, d in evs if n == "content_block_start"]
    assert starts[-1]["type"] == "tool_use" and starts[-1]["name"] == "get_weather"
    partial = "".join(d["delta"]["partial_json"] for n, d in evs if n == "content_block_delta" and d["delta"]["type"] == "input_json_delta")
    assert "city" in json.loads(partial)
    assert [d for n, d in evs if n == "message_delta"][0]["delta"]["stop_reason"] == "tool_use"


def test_max_tokens_zero_only_warms_the_cache(server: Server, client: Any) -> None:
    body = {"model": "smol", "system": "You are terse. " * 20, "messages": [{"role": "user", "content": "Hi"}]}
    m = client.messages.create(max_tokens=0, **body)
    assert m.content == [] and m.stop_reason == "max_tokens" and m.usage.output_tokens == 0
    again = client.messages.create(max_tokens=2, **body)  # the prompt is in a slot's cache now
    assert again.usage.cache_read_input_tokens >= again.usage.input_tokens - 1
    evs = events(post(server, {**body, "max_tokens": 0, "stream": True}))
    assert [n for n, _ in evs] == ["message_start", "message_delta", "message_stop"]
    assert evs[1][1]["delta"]["stop_reason"] == "max_tokens" and evs[1][1]["usage"]["output_tokens"] == 0


def test_a_final_assistant_message_is_continued(client: Any) -> None:
    ask = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    whole = client.messages.create(model="smol", max_tokens=12, messages=ask).content[0].text
    head = whole.split(" ")[0]  # the first word of the answer, given as the assistant's prefill
    m = client.messages.create(model="smol", max_tokens=12, messages=[*ask, {"role": "assistant", "content": head}])
    assert m.content[0].text == whole[len(head):][: len(m.content[0].text)]  # the answer goes on from the prefill
    n_prefilled = post_count(client, [*ask, {"role": "assistant", "content": head}])
    assert n_prefilled < post_count(client, ask) + 4  # no closed assistant turn and new header in the prompt


def post_count(client: Any, messages: list[dict[str, Any]]) -> int:
    return int(client.messages.count_tokens(model="smol", messages=messages).input_tokens)


def test_count_tokens(server: Server, client: Any) -> None:
    body = {"model": "smol", "messages": [{"role": "user", "content": "Hello there"}]}
    n = post(server, body, "/v1/messages/count_tokens").json()["input_tokens"]
    m = client.messages.create(max_tokens=1, **body)
    assert n == m.usage.input_tokens


@pytest.mark.parametrize(("body", "status", "etype"), [
    (b"{oops", 400, "invalid_request_error"),
    ({"model": "smol", "messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request_error"),
    ({"model": "smol", "max_tokens": -1, "messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request_error"),
    ({"model": "smol", "max_tokens": "ten", "messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request_error"),
    ({"model": "smol", "max_tokens": 5}, 400, "invalid_request_error"),
    ({"model": "smol", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, 400, "invalid_request_error"),
    ({"model": "nope", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, 404, "not_found_error"),
    ({"model": "smol", "max_tokens": 5, "messages": [{"role": "user", "content": []}]}, 400, "invalid_request_error"),
    ({"model": "smol", "max_tokens": 5, "temperature": 1.5, "messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request_error"),
    ({"model": "smol", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]}, 400, "invalid_request_error"),
])
def test_errors_in_anthropic_shape(server: Server, body: Any, status: int, etype: str) -> None:
    r = post(server, body)
    assert r.status_code == status, r.text
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == etype and r.json()["error"]["message"]


def test_wrong_method_and_path_are_in_anthropic_shape(server: Server) -> None:
    r = httpx.get(server.url + "/v1/messages", headers={"x-api-key": "secret"}, timeout=30)
    assert r.status_code == 405 and r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
    r = post(server, {"model": "smol"}, "/v1/messages/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_authentication_error_shape(server: Server) -> None:
    r = httpx.post(server.url + "/v1/messages", json={"model": "smol", "max_tokens": 5, "messages": []}, timeout=30)
    assert r.status_code == 401
    assert r.json() == {"type": "error", "error": {"type": "authentication_error", "message": r.json()["error"]["message"]}}
