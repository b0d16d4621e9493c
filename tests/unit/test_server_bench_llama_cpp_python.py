"""The server benchmark's optional llama-cpp-python column reads that server's wire format.

llama-cpp-python's server (0.3.x) streams chat chunks without `usage`, has no `ignore_eos`, and
defaults to repeat_penalty 1.1. A stand-in on 127.0.0.1 that answers exactly the way it does checks
that the load generator sends the fields that give it the same sampling as the other servers, counts
its tokens from the `length` finish, and takes prompt token counts from a non-streamed answer.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trio

from tests.conftest import bench_module

pytestmark = pytest.mark.engine  # eog_tokens() reads the vocabulary with the llama.cpp engine


def _server_bench() -> ModuleType:
    return bench_module("server_bench")


PROMPT_TOKENS = 37


class _LlamaCppPythonLike(BaseHTTPRequestHandler):
    """Chat completions the way llama_cpp.server answers them: one chunk per token, no usage in a
    stream, `finish_reason` "length" on the last chunk when max_tokens were made."""

    bodies: list[dict[str, Any]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        n = int(body["max_tokens"])
        if not body.get("stream"):
            out = {"id": "chatcmpl-1", "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "a"}, "finish_reason": "length"}],
                "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": n, "total_tokens": PROMPT_TOKENS + n}}
            data = json.dumps(out).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()  # HTTP/1.0: the body ends when the connection closes

        def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
            c = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": body["model"],
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            return b"data: " + json.dumps(c).encode() + b"\r\n\r\n"

        early = "stop early" in body["messages"][-1]["content"]  # as an end-of-generation token would
        self.wfile.write(chunk({"role": "assistant"}, None))
        for i in range(3 if early else n):
            self.wfile.write(chunk({"content": f" w{i}"}, None))
        self.wfile.write(chunk({}, "stop" if early else "length"))
        self.wfile.write(b"data: [DONE]\r\n\r\n")


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[tuple[ModuleType, Any]]:
    sb = _server_bench()
    _LlamaCppPythonLike.bodies = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _LlamaCppPythonLike)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield sb, httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_llama_cpp_python_requests_carry_its_sampling_fields(fake: tuple[ModuleType, Any], smollm2_path: Path,
                                                             tmp_path: Path) -> None:
    sb, _ = fake
    server = sb.LlamaCppPythonServer(sb.Settings(model=smollm2_path, threads=2, ctx=2048, parallel=1), tmp_path)
    extra = server.request_extra()
    assert extra["repeat_penalty"] == 1.0
    # every end-of-generation token of SmolLM2 is banned, so each answer runs to max_tokens
    assert sorted(int(t) for t in extra["logit_bias"]) == sb.eog_tokens(smollm2_path) == [0, 2, 4]
    assert all(v <= -1e3 for v in extra["logit_bias"].values())
    assert sb.PylocalaiServer(server.settings, tmp_path).request_extra() == {}


def test_a_stream_without_usage_is_counted_from_its_length_finish(fake: tuple[ModuleType, Any], tmp_path: Path) -> None:
    sb, httpd = fake
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    extra = {"repeat_penalty": 1.0, "logit_bias": {"2": -1e4}}
    jobs = [(None, "one"), (None, "two"), (None, "three")]
    results, wall = trio.run(sb.run_load, base, "chat", "bench", jobs, 2, 16, 30.0, extra)
    assert [r.error for r in results] == ["", "", ""]
    assert all(r.ok and r.tokens == 16 and r.finish_reason == "length" for r in results)
    m = sb.load_metrics(results, wall)
    assert m["errors"] == 0 and m["aggregate_tps"] == pytest.approx(48 / wall)
    assert math.isfinite(m["decode_tps_p50"]) and m["decode_tps_p50"] > 0
    sent = _LlamaCppPythonLike.bodies
    assert len(sent) == 3 and all(b["repeat_penalty"] == 1.0 and b["logit_bias"] == {"2": -1e4} for b in sent)
    assert all(b["temperature"] == 0.0 and b["max_tokens"] == 16 and b["stream"] is True for b in sent)


def test_a_stream_that_stops_early_is_an_error(fake: tuple[ModuleType, Any]) -> None:
    """Without usage, only a `length` finish proves max_tokens were made: a stream that stops sooner is an
    error of that request, not a short answer counted as a full one."""
    sb, httpd = fake
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    results, _ = trio.run(sb.run_load, base, "chat", "bench", [(None, "stop early"), (None, "go on")], 1, 16, 30.0)
    assert not results[0].ok and results[0].error == "got 0 of 16 tokens" and results[0].finish_reason == "stop"
    assert results[1].ok and results[1].tokens == 16


def test_prompt_tokens_come_from_a_non_streamed_answer(fake: tuple[ModuleType, Any], smollm2_path: Path,
                                                       tmp_path: Path) -> None:
    sb, httpd = fake
    server = sb.Server(sb.Settings(model=smollm2_path, threads=2, ctx=2048, parallel=1), tmp_path)
    server.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    assert trio.run(sb.count_prompt_tokens, server, "be brief", "hello") == PROMPT_TOKENS
    body = _LlamaCppPythonLike.bodies[-1]
    assert body["stream"] is False and "stream_options" not in body and body["max_tokens"] == 1
    assert body["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]


def test_a_non_streamed_answer_is_counted_from_its_usage(fake: tuple[ModuleType, Any]) -> None:
    """The `whole` scenario: one request, the answer in one body; tokens from its usage, the request
    time from sending it to having the body. A request that gets no answer is that request's error."""
    import httpx

    sb, httpd = fake
    base = f"http://127.0.0.1:{httpd.server_address[1]}"

    async def main() -> list[tuple[Any, float]]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as client:
            return [await sb.whole_request(client, base, "bench", "one", 16, {"repeat_penalty": 1.0}),
                    await sb.whole_request(client, "http://127.0.0.1:1", "bench", "two", 16)]  # nothing listens

    (res, latency), (bad, bad_latency) = trio.run(main)
    assert res.ok and res.error == "" and (res.tokens, res.prompt_tokens) == (16, PROMPT_TOKENS)
    assert 0 < latency < 30
    sent = _LlamaCppPythonLike.bodies[0]
    assert sent["stream"] is False and "stream_options" not in sent and sent["repeat_penalty"] == 1.0
    assert not bad.ok and bad.error and math.isnan(bad_latency)
