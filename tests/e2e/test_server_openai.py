"""The server over real HTTP on 127.0.0.1 with SmolLM2: the official openai SDK, plus raw HTTP for
exact wire checks, errors, auth, model resolution, configs, options and templates."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import import_or_missing

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]

CHATML_GO = {
    "chat_message": (
        "<|im_start|>{{ .RoleName }}\n{{ if .FunctionCall -}}\nFunction call:\n{{ else if eq .RoleName \"tool\" -}}\n"
        "Function response:\n{{ end -}}\n{{ if .Content -}}\n{{.Content }}\n{{ end -}}\n{{ if .FunctionCall -}}\n"
        "{{toJson .FunctionCall}}\n{{ end -}}<|im_end|>\n"
    ),
    "chat": "{{.Input -}}\n<|im_start|>assistant\n",
    "completion": "Q: {{.Input}}\nA:",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, models: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = models.parent / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "pylocalai.cli", "serve", "--address", f"127.0.0.1:{self.port}",
               "--models-path", str(models), "--threads", "2", "--context-size", "1024",
               "--data-path", str(models.parent / f"data-{self.port}"), *extra]
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
            if self.proc.poll() is not None:
                break
        self.stop()
        raise AssertionError("server did not start:\n" + self.log.read_text()[-3000:])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()

    def ready(self) -> dict[str, Any]:
        return dict(httpx.get(self.url + "/readyz", timeout=10).json())


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Path:
    d = tmp_path_factory.mktemp("models")
    (d / "smollm2.gguf").symlink_to(smollm2_path)
    (d / "smol.yaml").write_text(json.dumps({
        "name": "smol", "parameters": {"model": "smollm2.gguf", "temperature": 0.0},
        "context_size": 1024, "options": ["parallel:4"],
    }))
    (d / "smol-go.yaml").write_text(json.dumps({
        "name": "smol-go", "parameters": {"model": "smollm2.gguf", "temperature": 0.0},
        "template": CHATML_GO, "stopwords": ["<|im_end|>"], "options": ["parallel:2", "cont_batching:false"],
    }))
    (d / "aliases.yaml").write_text("- {name: gpt-4, alias: smol}\n- {name: off-model, disabled: true, parameters: {model: smollm2.gguf}}\n")
    (d / "broken.yaml").write_text("name: broken\nparameters: {model: smollm2.gguf}\noptions: ['cache_reuse:256']\n")
    (d / "escape.yaml").write_text("name: escape\nparameters: {model: ../outside.gguf}\n")
    return d


@pytest.fixture(scope="module")
def server(engine: Any, models_dir: Path) -> Iterator[Server]:
    s = Server(models_dir, "--max-loaded-models", "2")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[Any]:
    openai = import_or_missing("openai")
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:  # closes its connections: no socket is left for the GC to warn about
        yield c


def post(server: Server, path: str, body: Any, **kw: Any) -> httpx.Response:
    content = body if isinstance(body, bytes | str) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json", **kw.pop("headers", {})},
                      timeout=120, **kw)


def sse(resp: httpx.Response) -> list[Any]:
    frames = [line[6:] for line in resp.text.split("\n") if line.startswith("data: ")]
    assert frames and frames[-1] == "[DONE]"
    return [json.loads(f) for f in frames[:-1]]


# ---------------------------------------------------------------- models and configs


def test_models_lists_configs_and_reports_broken_ones(server: Server, client: Any) -> None:
    ids = {m.id for m in client.models.list().data}
    assert {"smol", "smol-go"} <= ids
    assert "broken" not in ids and "escape" not in ids
    errors = server.ready()["config_errors"]
    assert any("broken.yaml" in e and "cache_reuse" in e for e in errors)
    assert any("escape.yaml" in e and "inside the models folder" in e for e in errors)


def test_options_take_effect(server: Server, client: Any) -> None:
    client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    client.chat.completions.create(model="smol-go", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    loaded = server.ready()["loaded"]
    assert loaded["smol"]["n_slots"] == 4  # parallel:4
    assert loaded["smol"]["n_ctx_seq"] >= 1024  # context_size is per request
    assert loaded["smol-go"]["n_slots"] == 1  # cont_batching:false serves one at a time
    assert loaded["smol"]["checkpoints_saved"] == 0  # no sliding window, no recurrent state: none needed


# ---------------------------------------------------------------- chat completions


def test_chat_non_stream_with_the_sdk(client: Any) -> None:
    r = client.chat.completions.create(model="smol", messages=[
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}], max_tokens=12)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    c = r.choices[0]
    assert c.index == 0 and c.finish_reason in ("stop", "length")
    assert "Paris" in c.message.content
    assert r.usage.prompt_tokens > 5 and 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_wire_shape(server: Server) -> None:
    resp = post(server, "/v1/chat/completions", {"model": "smol", "messages": [{"role": "user", "content": "Count to five"}],
                                                 "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    chunks = sse(resp)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    body = chunks[1:-1]
    assert all(c["choices"][0]["finish_reason"] is None for c in body[:-1])
    assert body[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in body)
    assert text.strip()


def test_chat_stream_with_the_sdk_matches_non_stream(client: Any) -> None:
    msgs = [{"role": "user", "content": "Name a color."}]
    full = client.chat.completions.create(model="smol", messages=msgs, max_tokens=10).choices[0].message.content
    parts = [ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model="smol", messages=msgs, max_tokens=10, stream=True) if ch.choices]
    assert "".join(parts) == full


def test_n_choices_are_indexed(client: Any) -> None:
    r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, n=2,
                                       temperature=1.0, seed=3)
    assert [c.index for c in r.choices] == [0, 1]


def test_a_failing_choice_of_several_is_a_protocol_error(server: Server) -> None:
    body = {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "grammar": "root ::= (", "n": 2}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    r = post(server, "/v1/chat/completions", {**body, "stream": True})
    frames = sse(r)  # an error frame, then [DONE]: the stream ends cleanly
    assert frames[-1]["error"]["type"] == "invalid_request_error" and "grammar" in frames[-1]["error"]["message"]
    assert post(server, "/v1/chat/completions", {**body, "grammar": ""}).status_code == 200  # still serving


def test_streamed_completions_carry_every_choice_and_logprobs(server: Server) -> None:
    body = {"model": "smol", "prompt": "The sky is", "max_tokens": 4, "n": 2, "temperature": 1.0, "seed": 5,
            "logprobs": 2, "stream": True, "stream_options": {"include_usage": True}}
    frames = sse(post(server, "/v1/completions", body))
    by_index: dict[int, list[dict[str, Any]]] = {}
    for f in frames[:-1]:
        for c in f["choices"]:
            by_index.setdefault(c["index"], []).append(c)
    assert sorted(by_index) == [0, 1]
    for chunks in by_index.values():
        lps = [c["logprobs"] for c in chunks if c["logprobs"]]
        assert sum(len(lp["tokens"]) for lp in lps) == 4  # every generated token, with its logprob and top 2
        assert all(len(lp["top_logprobs"][0]) >= 1 and lp["token_logprobs"][0] <= 0 for lp in lps)
        assert "".join(c["text"] for c in chunks) == "".join(t for lp in lps for t in lp["tokens"])
        assert chunks[-1]["finish_reason"] == "length"
    usage = frames[-1]["usage"]
    assert frames[-1]["choices"] == [] and usage["completion_tokens"] == 8
    one = post(server, "/v1/completions", {"model": "smol", "prompt": "The sky is", "max_tokens": 1}).json()
    assert usage["prompt_tokens"] == one["usage"]["prompt_tokens"]  # the prompt counts once for its n choices


def test_n_zero_is_one_choice_and_edits_finish_reason_is_null(server: Server) -> None:
    r = post(server, "/v1/chat/completions", {"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "n": 0})
    assert r.status_code == 200 and len(r.json()["choices"]) == 1
    r = post(server, "/v1/edits", {"model": "smol", "instruction": "Fix", "input": "helo", "max_tokens": 2})
    assert r.json()["choices"][0]["finish_reason"] is None


def test_edits_count_the_prompt_tokens_of_every_input(server: Server) -> None:
    inputs = ["helo", "wrld is a very long input with many words in it"]
    each = [post(server, "/v1/edits", {"model": "smol", "instruction": "Fix", "input": t, "max_tokens": 2}).json()["usage"]
            for t in inputs]
    both = post(server, "/v1/edits", {"model": "smol", "instruction": "Fix", "input": inputs, "max_tokens": 2}).json()["usage"]
    assert both["prompt_tokens"] == sum(u["prompt_tokens"] for u in each)
    assert both["completion_tokens"] == sum(u["completion_tokens"] for u in each)


def test_seeds_beyond_32_bits_and_negative_seeds(server: Server) -> None:
    body = {"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 1.5}
    big = [post(server, "/v1/chat/completions", {**body, "seed": 2**40 + 7}).json()["choices"][0]["message"]["content"]
           for _ in range(2)]
    assert big[0] == big[1]  # a 64-bit seed is reproducible
    assert post(server, "/v1/chat/completions", {**body, "seed": -1}).status_code == 200  # random, as in LocalAI


def test_embeddings_input_forms_and_encodings(server: Server, client: Any) -> None:
    import base64

    import numpy as np

    text = client.embeddings.create(model="smol", input="hello world").data[0].embedding
    toks = post(server, "/v1/tokenize", {"model": "smol", "content": "hello world"}).json()["tokens"]
    by_tokens = post(server, "/v1/embeddings", {"model": "smol", "input": toks}).json()
    assert np.allclose(by_tokens["data"][0]["embedding"], text, atol=1e-4) and by_tokens["usage"]["prompt_tokens"] == len(toks)
    two = post(server, "/v1/embeddings", {"model": "smol", "input": [toks, toks[:1]]}).json()["data"]
    assert len(two) == 2 and not np.allclose(two[0]["embedding"], two[1]["embedding"])
    b64 = post(server, "/v1/embeddings", {"model": "smol", "input": "hello world", "encoding_format": "base64"}).json()
    assert np.allclose(np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4"), text, atol=1e-4)
    assert client.embeddings.create(model="smol", input="hello world", dimensions=576).data[0].embedding == text
    r = post(server, "/v1/embeddings", {"model": "smol", "input": "x", "dimensions": 64})
    assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions"
    r = post(server, "/v1/embeddings", {"model": "smol", "input": [10**7]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    # longer than 512 tokens (the old fixed size) still embeds; beyond the context it is a clear 400
    assert post(server, "/v1/embeddings", {"model": "smol", "input": "word " * 700}).status_code == 200
    r = post(server, "/v1/embeddings", {"model": "smol", "input": "word " * 3000})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_deeply_nested_json_is_a_400(server: Server) -> None:
    r = post(server, "/v1/chat/completions", "[" * 100000 + "]" * 100000)
    assert r.status_code == 400 and "nests" in r.json()["error"]["message"]


def test_model_routes(server: Server, client: Any) -> None:
    assert client.models.retrieve("smol").id == "smol"
    r = httpx.get(server.url + "/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert [m["id"] for m in httpx.get(server.url + "/v1/models/").json()["data"]] == \
        [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]  # a trailing slash is stripped
    assert [m["id"] for m in httpx.get(server.url + "/v1/models", params={"filter": "^smol-"}).json()["data"]] == ["smol-go"]
    assert httpx.get(server.url + "/v1/models", params={"filter": "("}).status_code == 400
    caps = {m["id"]: m for m in httpx.get(server.url + "/v1/models/capabilities").json()["data"]}
    assert caps["smol"]["input_modalities"] == ["text"] and "chat" in caps["smol"]["capabilities"]


def test_stop_and_logprobs(client: Any) -> None:
    r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Count: 1, 2, 3,"}],
                                       max_tokens=20, logprobs=True, top_logprobs=2)
    lp = r.choices[0].logprobs.content
    assert lp and all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in lp)
    assert "".join(t.token for t in lp) == r.choices[0].message.content


def test_forced_tool_call_with_the_sdk(client: Any) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                       tools=tools, tool_choice="required", max_tokens=60)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    call = c.message.tool_calls[0]
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert "city" in json.loads(call.function.arguments)
    # round trip: the tool result goes back through the template
    r2 = client.chat.completions.create(model="smol", max_tokens=20, tools=tools, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"}])
    assert r2.choices[0].message.content is not None


def test_legacy_functions_answer_with_function_call(server: Server) -> None:
    fn = {"name": "get_weather", "description": "Weather for a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    body = {"model": "smol", "messages": [{"role": "user", "content": "Weather in Paris?"}], "functions": [fn],
            "function_call": {"name": "get_weather"}, "max_tokens": 60}
    c = post(server, "/v1/chat/completions", body).json()["choices"][0]
    assert c["finish_reason"] == "function_call" and "tool_calls" not in c["message"]
    assert c["message"]["function_call"]["name"] == "get_weather"
    assert "city" in json.loads(c["message"]["function_call"]["arguments"])
    frames = sse(post(server, "/v1/chat/completions", {**body, "stream": True}))
    deltas = [ch["delta"] for f in frames for ch in f["choices"]]
    assert all("tool_calls" not in d for d in deltas)
    fcs = [d["function_call"] for d in deltas if "function_call" in d]
    assert fcs[0]["name"] == "get_weather" and "city" in json.loads("".join(f["arguments"] for f in fcs))
    assert frames[-1]["choices"][0]["finish_reason"] == "function_call"


def test_forced_tool_call_streams_as_tool_call_deltas(server: Server) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}]
    chunks = sse(post(server, "/v1/chat/completions", {"model": "smol", "stream": True, "max_tokens": 60, "tools": tools,
                      "tool_choice": {"type": "function", "function": {"name": "lookup"}},
                      "messages": [{"role": "user", "content": "Look up llamas"}]}))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert not any((d.get("content") or "").strip() for d in deltas)  # no raw JSON leaks as content
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "lookup" and calls[0]["id"]
    args = "".join(tc["function"].get("arguments", "") for tc in calls)
    assert "q" in json.loads(args)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_json_schema_response_format(client: Any) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 20}}, "required": ["answer"],
              "additionalProperties": False}
    r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Capital of France as JSON"}],
                                       max_tokens=40, response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert isinstance(json.loads(r.choices[0].message.content)["answer"], str)


def test_go_template_model_answers(client: Any) -> None:
    r = client.chat.completions.create(model="smol-go", messages=[{"role": "user", "content": "Say hello."}], max_tokens=10)
    assert r.choices[0].message.content.strip()
    assert "<|im_end|>" not in r.choices[0].message.content


# ---------------------------------------------------------------- completions, edits, embeddings, tokenize


def test_completions_echo_uses_the_completion_template(client: Any) -> None:
    r = client.completions.create(model="smol-go", prompt="Two plus two?", max_tokens=4, echo=True)
    assert r.choices[0].text.startswith("Q: Two plus two?\nA:")


def test_completions_list_and_stream(client: Any) -> None:
    r = client.completions.create(model="smol", prompt=["The sky is", "Grass is"], max_tokens=3)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 6
    parts = [c.choices[0].text for c in client.completions.create(model="smol", prompt="The sky is", max_tokens=3, stream=True) if c.choices]
    assert "".join(parts) == client.completions.create(model="smol", prompt="The sky is", max_tokens=3).choices[0].text


def test_edits(server: Server) -> None:
    r = post(server, "/v1/edits", {"model": "smol", "instruction": "Fix the spelling", "input": "helo wrld", "max_tokens": 8})
    assert r.status_code == 200 and r.json()["object"] == "edit" and r.json()["choices"][0]["text"] is not None


def test_embeddings_and_tokenize(server: Server, client: Any) -> None:
    e = client.embeddings.create(model="smol", input=["hello", "world"])
    assert len(e.data) == 2 and len(e.data[0].embedding) == 576
    toks = post(server, "/v1/tokenize", {"model": "smol", "content": "Hello world"}).json()["tokens"]
    assert toks and post(server, "/v1/detokenize", {"model": "smol", "tokens": toks}).json()["content"] == "Hello world"


# ---------------------------------------------------------------- errors and resolution


@pytest.mark.parametrize(("body", "param"), [
    (b"{not json", None),
    ({"model": "smol"}, "messages"),
    ({"model": "smol", "messages": []}, "messages"),
    ({"model": "smol", "messages": "hi"}, "messages"),
    ({"model": "smol", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"model": "smol", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "smol", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ({"model": 5, "messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "smol", "messages": [{"role": "user", "content": "x"}], "top_k": 2**40}, "top_k"),
    ({"model": "smol", "messages": [{"role": "user", "content": "x"}], "seed": 2**70}, "seed"),
    ({"model": "smol", "messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}}, "response_format"),
])
def test_bad_input_is_a_400_in_openai_shape(server: Server, body: Any, param: str | None) -> None:
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param:
        assert err["param"] == param


def test_unknown_model_is_404(server: Server) -> None:
    r = post(server, "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_prompt_longer_than_context_is_context_length_exceeded(server: Server) -> None:
    r = post(server, "/v1/chat/completions", {"model": "smol", "messages": [{"role": "user", "content": "word " * 3000}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = post(server, "/v1/chat/completions", {"model": "smol", "stream": True, "messages": [{"role": "user", "content": "word " * 3000}]})
    assert r.status_code == 400  # checked before the stream starts


def test_bearer_token_naming_a_model_selects_it(server: Server) -> None:
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
             headers={"Authorization": "Bearer smol-go"})
    assert r.status_code == 200 and r.json()["model"] == "smol-go"



def test_lacking_a_model_the_first_with_the_usecase_serves(server: Server) -> None:
    """LocalAI's default: the first configured model (by name here) with the endpoint's usecase;
    aliases and disabled models are passed over."""
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1})
    assert r.status_code == 200 and r.json()["model"] == "smol"
    r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1})  # only smol-go has a completion template
    assert r.status_code == 200 and r.json()["model"] == "smol-go"
    r = post(server, "/v1/edits", {"instruction": "x", "input": "y"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model" and "edit" in r.json()["error"]["message"]


def test_aliases_and_disabled_models(server: Server) -> None:
    r = post(server, "/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1})
    assert r.status_code == 200 and r.json()["model"] == "gpt-4"  # served by smol, under the name asked for
    assert "gpt-4" not in server.ready()["loaded"]
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
             headers={"Authorization": "Bearer gpt-4"})
    assert r.status_code == 200 and r.json()["model"] == "gpt-4"  # named by the token: the same
    r = post(server, "/v1/chat/completions?model=gpt-4", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1})
    assert r.status_code == 200 and r.json()["model"] == "gpt-4"  # LocalAI's ?model=
    r = post(server, "/v1/chat/completions", {"model": "off-model", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
    r = post(server, "/v1/messages", {"model": "off-model", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"


def test_disconnect_mid_stream_frees_the_slot(server: Server) -> None:
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={
            "model": "smol", "stream": True, "max_tokens": 2000, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Tell a long story"}]}) as resp:
        lines = resp.iter_lines()
        for _ in range(6):
            next(lines)
        assert server.ready()["loaded"]["smol"]["active_slots"] == 1
    deadline = time.monotonic() + 10
    while server.ready()["loaded"]["smol"]["active_slots"] != 0:
        assert time.monotonic() < deadline, "slot not freed after the client left"
        time.sleep(0.05)
    # the server still serves
    assert post(server, "/v1/chat/completions", {"model": "smol", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}).status_code == 200


def test_unknown_route_and_method(server: Server) -> None:
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    assert httpx.get(server.url + "/v1/chat/completions").status_code == 405


# ---------------------------------------------------------------- auth and the default model


def test_api_keys_and_default_model(engine: Any, smollm2_path: Path, tmp_path: Path) -> None:
    s = Server(tmp_path / "empty-models", "--api-keys", "k1,k2")
    try:
        assert httpx.get(s.url + "/healthz").status_code == 200  # open
        r = httpx.get(s.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["WWW-Authenticate"] == "Bearer"
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = httpx.get(s.url + "/v1/models", headers={"x-api-key": "k2"})
        assert ok.status_code == 200
        # no models folder: the default small model serves every request
        assert [m["id"] for m in ok.json()["data"]] == ["smollm2-135m-instruct"]
        # a refused request whose body was never read: the same pooled connection serves the next one
        with httpx.Client(base_url=s.url, timeout=10) as c:
            r = c.post("/v1/chat/completions", content=b"x" * 1_000_000, headers={"Content-Type": "application/json"})
            assert r.status_code == 401 and r.headers["Connection"] == "close"
            assert c.get("/v1/models", headers={"x-api-key": "k1"}).status_code == 200
        r = httpx.post(s.url + "/v1/chat/completions", headers={"Authorization": "Bearer k1"}, timeout=60,
                       json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        s.stop()


# ---------------------------------------------------------------- /metrics, /version, /system


def metrics(server: Server) -> dict[str, float]:
    r = httpx.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    out: dict[str, float] = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_metrics_count_requests_tokens_and_routes(server: Server) -> None:
    post(server, "/v1/chat/completions", {"model": "smol", "messages": [{"role": "user", "content": "warm"}], "max_tokens": 1})
    before = metrics(server)
    r = post(server, "/v1/chat/completions", {"model": "smol", "messages": [{"role": "user", "content": "Count to ten."}],
                                              "max_tokens": 3})
    usage = r.json()["usage"]
    assert httpx.get(server.url + "/no/such/route").status_code == 404
    assert httpx.request("BREW", server.url + "/v1/models").status_code in (404, 405)
    after = metrics(server)
    model = '{model="smol",engine="llama_cpp"}'

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta(f"pylocalai_requests_total{model}") == 1
    assert delta(f"pylocalai_prompt_tokens_total{model}") == usage["prompt_tokens"]
    assert delta(f"pylocalai_tokens_generated_total{model}") == usage["completion_tokens"] == 3
    assert 0 < delta(f"pylocalai_prompt_tokens_cached_total{model}") < usage["prompt_tokens"]  # the chat template's start
    assert delta('pylocalai_requests_finished_total{model="smol",engine="llama_cpp",reason="length"}') == 1
    assert delta('pylocalai_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}') == 1
    assert delta('pylocalai_http_requests_total{method="GET",route="<unmatched>",status="404"}') == 1
    assert not any('method="BREW"' in k for k in after)  # a made-up method is "other": no new series per method
    assert any('method="other"' in k for k in after)
    assert delta('pylocalai_http_request_duration_seconds_count{method="POST",route="/v1/chat/completions"}') == 1
    assert after[f"pylocalai_slots{model}"] == 4 and after[f"pylocalai_requests_processing{model}"] == 0
    assert after["pylocalai_models_loaded"] >= 1 and after["pylocalai_models_configured"] == 4


def test_version_and_system(server: Server) -> None:
    import pylocalai

    assert httpx.get(server.url + "/version").json() == {"version": pylocalai.__version__}
    system = httpx.get(server.url + "/system").json()
    assert "llama_cpp" in system["backends"] and {"id": "smol"} in system["loaded_models"]
