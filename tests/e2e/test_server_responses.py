"""Open Responses API over real HTTP with SmolLM2: the official openai SDK's client.responses
(create, stream helper, background + retrieve + cancel, resume, previous_response_id, function
calling round trip), raw HTTP for the exact event order, and a restart that reads a stored response."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import import_or_missing

from .test_server_openai import Server

pytestmark = pytest.mark.e2e

TOOL = {"type": "function", "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}

RESOURCE_FIELDS = {
    "id", "object", "created_at", "completed_at", "status", "incomplete_details", "model", "previous_response_id",
    "instructions", "output", "error", "tools", "tool_choice", "truncation", "parallel_tool_calls", "text", "top_p",
    "presence_penalty", "frequency_penalty", "top_logprobs", "temperature", "reasoning", "usage", "max_output_tokens",
    "max_tool_calls", "store", "background", "service_tier", "metadata", "safety_identifier", "prompt_cache_key",
}


@pytest.fixture(scope="module")
def models(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("rmodels")
    (d / "smollm2.gguf").symlink_to(smollm2_path)
    (d / "smol.yaml").write_text(json.dumps({"name": "smol", "parameters": {"model": "smollm2.gguf", "temperature": 0.0},
                                             "context_size": 512}))
    return d


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rdata")


@pytest.fixture(scope="module")
def server(engine: Any, models: Path, data_dir: Path) -> Iterator[Server]:
    s = Server(models, "--data-path", str(data_dir))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[Any]:
    openai = import_or_missing("openai")
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120) as c:  # closes its connections: no socket is left for the GC to warn about
        yield c


def post(server: Server, body: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body)
    return httpx.post(server.url + "/v1/responses", content=content, timeout=120, headers={"content-type": "application/json"})


def sse_events(text: str) -> list[dict[str, Any]]:
    frames = text.strip().split("\n\n")
    assert frames[-1] == "data: [DONE]"
    out = []
    for f in frames[:-1]:
        ev_line, data_line = f.split("\n")
        ev = json.loads(data_line[6:])
        assert ev_line == "event: " + ev["type"]
        out.append(ev)
    assert [e["sequence_number"] for e in out] == list(range(out[0]["sequence_number"], out[0]["sequence_number"] + len(out)))
    return out


def test_create_has_every_resource_field(client: Any, server: Server) -> None:
    r = client.responses.create(model="smol", input="What is the capital of France? One word.", max_output_tokens=8)
    assert r.status in ("completed", "incomplete") and r.id.startswith("resp_")
    raw = httpx.get(f"{server.url}/v1/responses/{r.id}").json()
    assert RESOURCE_FIELDS <= set(raw)
    assert r.output[0].type == "message" and "Paris" in r.output_text
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    assert r.usage.input_tokens_details.cached_tokens >= 0 and r.usage.output_tokens_details.reasoning_tokens == 0


def test_max_output_tokens_gives_incomplete(client: Any) -> None:
    r = client.responses.create(model="smol", input="Tell me a long story.", max_output_tokens=4)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[-1].status == "incomplete" and r.usage.output_tokens == 4


def test_stream_event_order(server: Server) -> None:
    resp = post(server, {"model": "smol", "input": "Say hi", "max_output_tokens": 5, "stream": True})
    evs = sse_events(resp.text)
    types = [e["type"] for e in evs]
    assert types[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert evs[0]["sequence_number"] == 0
    deltas = [e for e in evs if e["type"] == "response.output_text.delta"]
    assert all(e["output_index"] == 0 and e["content_index"] == 0 and "logprobs" in e for e in deltas)
    done = [e for e in evs if e["type"] == "response.output_text.done"][0]
    assert done["text"] == "".join(e["delta"] for e in deltas)
    assert len({e["response"]["id"] for e in evs if "response" in e}) == 1


def test_stream_helper_of_the_sdk(client: Any) -> None:
    with client.responses.stream(model="smol", input="Name a fruit. Answer in one word.", max_output_tokens=100) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == text


def test_previous_response_id_continues_the_conversation(client: Any) -> None:
    first = client.responses.create(model="smol", input="My name is Ada. Reply OK.", max_output_tokens=5)
    second = client.responses.create(model="smol", input="What is my name?", previous_response_id=first.id, max_output_tokens=8)
    assert second.previous_response_id == first.id
    # the prompt holds the first input, the first output, then the new input
    assert second.usage.input_tokens >= first.usage.input_tokens + first.usage.output_tokens + 5


def test_function_calling_round_trip(client: Any) -> None:
    r = client.responses.create(model="smol", input="Weather in Paris?", tools=[TOOL], tool_choice="required", max_output_tokens=60)
    call = next(o for o in r.output if o.type == "function_call")
    assert call.name == "get_weather" and "city" in json.loads(call.arguments)
    r2 = client.responses.create(model="smol", previous_response_id=r.id, tools=[TOOL], max_output_tokens=20,
                                 input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert r2.status in ("completed", "incomplete") and r2.output


def test_allowed_tools_offers_only_the_listed_tools(server: Server) -> None:
    other = {**TOOL, "name": "get_time", "description": "Get the time in a city"}
    body = {"model": "smol", "input": "Weather in Paris?", "tools": [other, TOOL], "max_output_tokens": 60,
            "tool_choice": {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_weather"}]}}
    r = post(server, body)
    assert r.status_code == 200, r.text
    calls = [o for o in r.json()["output"] if o["type"] == "function_call"]
    assert calls and all(c["name"] == "get_weather" for c in calls)  # required: a call, and only to an allowed tool
    assert [t["name"] for t in r.json()["tools"]] == ["get_time", "get_weather"]  # the response lists every tool
    only_time = {**body, "tool_choice": {**body["tool_choice"], "tools": [{"type": "function", "name": "get_time"}]}}
    calls = [o for o in post(server, only_time).json()["output"] if o["type"] == "function_call"]
    assert calls and all(c["name"] == "get_time" for c in calls)
    bad = post(server, {**body, "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "nope"}]}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tool_choice" and "nope" in bad.json()["error"]["message"]


def test_item_reference_brings_back_a_stored_item(client: Any, server: Server) -> None:
    r = client.responses.create(model="smol", input="Say hello to the crew of the ship.", max_output_tokens=12)
    msg = next(o for o in r.output if o.type == "message")
    ask = {"type": "message", "role": "user", "content": "Say it again."}
    alone = post(server, {"model": "smol", "input": [ask], "max_output_tokens": 2}).json()
    with_ref = post(server, {"model": "smol", "input": [{"type": "item_reference", "id": msg.id}, ask], "max_output_tokens": 2})
    assert with_ref.status_code == 200, with_ref.text
    # the referenced assistant message is part of the prompt now
    assert with_ref.json()["usage"]["input_tokens"] >= alone["usage"]["input_tokens"] + r.usage.output_tokens
    missing = post(server, {"model": "smol", "input": [{"type": "item_reference", "id": "msg_nope"}]})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "input[0].id"
    assert missing.json()["error"]["type"] == "not_found"


def test_json_schema_text_format(client: Any) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"], "additionalProperties": False}
    r = client.responses.create(model="smol", input="Capital of France?", max_output_tokens=40,
                                text={"format": {"type": "json_schema", "name": "c", "schema": schema}})
    assert isinstance(json.loads(r.output_text)["city"], str)


def test_background_retrieve_cancel_and_resume(client: Any, server: Server) -> None:
    bg = client.responses.create(model="smol", input="Write a very long essay about llamas.", background=True,
                                 max_output_tokens=400, extra_body={"ignore_eos": True})
    assert bg.status in ("queued", "in_progress")
    deadline = time.monotonic() + 30
    while client.responses.retrieve(bg.id).status == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cancelled = client.responses.cancel(bg.id)
    assert cancelled.status == "cancelled"
    time.sleep(0.5)
    assert client.responses.retrieve(bg.id).status == "cancelled"  # stays cancelled after the worker stops
    r = httpx.post(f"{server.url}/v1/responses/{bg.id}/cancel")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request"
    # a finished background stream replays from the start, or after starting_after
    done = client.responses.create(model="smol", input="Say hello.", background=True, stream=True, max_output_tokens=6)
    live = [e for e in done]
    assert live[0].type == "response.created" and live[-1].type in ("response.completed", "response.incomplete")
    rid = live[0].response.id
    replay = sse_events(httpx.get(f"{server.url}/v1/responses/{rid}", params={"stream": "true"}).text)
    assert [e["type"] for e in replay] == [e.type for e in live]
    tail = sse_events(httpx.get(f"{server.url}/v1/responses/{rid}", params={"stream": "true", "starting_after": 3}).text)
    assert tail[0]["sequence_number"] == 4 and len(tail) == len(replay) - 4
    resumed = [e.type for e in client.responses.retrieve(rid, stream=True, starting_after=2)]
    assert resumed == [e["type"] for e in replay[3:]]


def test_delete_and_unknown_ids(client: Any, server: Server) -> None:
    r = client.responses.create(model="smol", input="Hi", max_output_tokens=2)
    assert httpx.delete(f"{server.url}/v1/responses/{r.id}").status_code == 200
    assert httpx.get(f"{server.url}/v1/responses/{r.id}").status_code == 404
    assert httpx.post(f"{server.url}/v1/responses/resp_nope/cancel").status_code == 404
    missing = httpx.get(f"{server.url}/v1/responses/resp_nope")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "response_id"
    # Open Responses' own error types: not_found for an unknown id (not a "model not found")
    assert missing.json()["error"]["type"] == "not_found" and missing.json()["error"]["code"] == "not_found"
    model = post(server, {"model": "nope", "input": "x"}).json()["error"]
    assert (model["type"], model["code"]) == ("not_found", "model_not_found")


@pytest.mark.parametrize("body", [
    b"{x",
    {"model": "smol"},
    {"model": "smol", "input": []},
    {"model": "smol", "input": 5},
    {"model": "smol", "input": "x", "max_output_tokens": 0},
    {"model": "smol", "input": "x", "background": True, "store": False},
    {"model": "smol", "input": "x", "truncation": "sometimes"},
    {"model": "smol", "input": "x", "text": {"format": {"type": "xml"}}},
    {"model": "smol", "input": "x", "previous_response_id": "resp_missing"},
    {"model": "smol", "input": [{"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]},
])
def test_bad_input_is_an_error_in_openai_shape(server: Server, body: Any) -> None:
    r = post(server, body)
    assert r.status_code in (400, 404), r.text
    assert set(r.json()["error"]) >= {"message", "type", "param", "code"}
    assert r.json()["error"]["type"] == {400: "invalid_request", 404: "not_found"}[r.status_code]


def test_truncation(server: Server) -> None:
    long = [{"type": "message", "role": "user", "content": "word " * 150} for _ in range(4)] + \
        [{"type": "message", "role": "user", "content": "Say OK."}]
    r = post(server, {"model": "smol", "input": long, "max_output_tokens": 3, "truncation": "disabled"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = post(server, {"model": "smol", "input": long, "max_output_tokens": 3, "truncation": "auto"})
    assert r.status_code == 200 and r.json()["status"] in ("completed", "incomplete")


def test_stored_response_survives_a_restart(engine: Any, models: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    s = Server(models, "--data-path", str(data))
    try:
        rid = post(s, {"model": "smol", "input": "Say hi", "max_output_tokens": 3}).json()["id"]
        running = post(s, {"model": "smol", "input": "Write a long essay", "background": True, "max_output_tokens": 2000,
                           "ignore_eos": True}).json()["id"]
        time.sleep(0.5)
    finally:
        s.stop()
    s2 = Server(models, "--data-path", str(data))
    try:
        back = httpx.get(f"{s2.url}/v1/responses/{rid}").json()
        assert back["id"] == rid and back["status"] in ("completed", "incomplete") and back["output"]
        interrupted = httpx.get(f"{s2.url}/v1/responses/{running}").json()
        assert interrupted["status"] == "failed" and "restart" in interrupted["error"]["message"]
    finally:
        s2.stop()
