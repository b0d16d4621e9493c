"""Images over real HTTP on every chat protocol: a tiny random llama with a tiny LLaVA-style projector
(mmproj in its YAML), a Go-template config of the same model, and a model without a projector that
refuses images in each protocol's own error format. Images come as data URIs / base64 and as URLs
served on 127.0.0.1."""

from __future__ import annotations

import base64
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests import ggufgen
from tests.conftest import import_or_missing

from .test_server_openai import Server

pytestmark = pytest.mark.e2e

N_IMAGE_TOKENS = 4  # write_tiny_mmproj's default: (28 // 14) ** 2


def _png(rgb: tuple[int, int, int]) -> bytes:
    return ggufgen.write_png(None, np.full((28, 28, 3), rgb, np.uint8))


RED, BLUE = _png((255, 0, 0)), _png((0, 0, 255))
B64_RED = base64.b64encode(RED).decode()


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = {"/red.png": RED, "/blue.png": BLUE}.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def server(engine: Any, ik_engine: Any, tiny_llama: Path, tiny_mmproj: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    d = tmp_path_factory.mktemp("mmodels")
    (d / "tiny.gguf").symlink_to(tiny_llama)
    (d / "tiny-mmproj.gguf").symlink_to(tiny_mmproj)
    base = {"parameters": {"model": "tiny.gguf", "temperature": 0.0}, "context_size": 512}
    (d / "vlm.yaml").write_text(json.dumps({**base, "name": "vlm", "mmproj": "tiny-mmproj.gguf"}))
    (d / "vlm-go.yaml").write_text(json.dumps({**base, "name": "vlm-go", "mmproj": "tiny-mmproj.gguf",
                                               "template": {"chat_message": "{{.RoleName}}: {{.Content}}",
                                                            "chat": "{{.Input}}\nassistant:"}}))
    (d / "vlm-ik.yaml").write_text(json.dumps({**base, "name": "vlm-ik", "mmproj": "tiny-mmproj.gguf",
                                               "backend": "ik-llama-cpp"}))
    (d / "plain.yaml").write_text(json.dumps({**base, "name": "plain"}))
    s = Server(d)
    yield s
    s.stop()


def post(server: Server, path: str, body: Any) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120,
                      headers={"anthropic-version": "2023-06-01"} if path.startswith("/v1/messages") else {})


def chat(model: str, *parts: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What colour is this?"}, *parts]}], **extra}


def image_url(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def prompt_tokens(server: Server, model: str, *parts: dict[str, Any]) -> int:
    r = post(server, "/v1/chat/completions", chat(model, *parts))
    assert r.status_code == 200, r.text
    return int(r.json()["usage"]["prompt_tokens"])


@pytest.mark.parametrize("model", ["vlm", "vlm-go", "vlm-ik"])
def test_openai_chat_takes_images_as_data_uri_and_url(server: Server, image_host: str, model: str) -> None:
    n_text = prompt_tokens(server, model)
    by_data = post(server, "/v1/chat/completions", chat(model, image_url(f"data:image/png;base64,{B64_RED}")))
    by_url = post(server, "/v1/chat/completions", chat(model, image_url(f"{image_host}/red.png")))
    # jinja: the marker follows the text, which tokenizes as before; the Go default template puts it
    # before the text, which then starts a new piece ("What" instead of " What": one token more)
    extra = 1 if model == "vlm-go" else 0
    for r in (by_data, by_url):
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == n_text + N_IMAGE_TOKENS + extra
    assert by_data.json()["choices"][0]["message"] == by_url.json()["choices"][0]["message"]
    two = prompt_tokens(server, model, image_url(f"{image_host}/red.png"), image_url(f"{image_host}/blue.png"))
    assert two == n_text + 2 * N_IMAGE_TOKENS + extra


def test_openai_streaming_with_an_image(server: Server) -> None:
    r = post(server, "/v1/chat/completions", chat("vlm", image_url(f"data:image/png;base64,{B64_RED}"), stream=True,
                                                 stream_options={"include_usage": True}))
    assert r.status_code == 200
    frames = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert frames[-1]["usage"]["prompt_tokens"] == prompt_tokens(server, "vlm") + N_IMAGE_TOKENS


def test_anthropic_image_blocks_base64_and_url(server: Server, image_host: str) -> None:
    def msg(*blocks: dict[str, Any]) -> dict[str, Any]:
        return {"model": "vlm", "max_tokens": 4, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What colour is this?"}, *blocks]}]}

    b64 = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": B64_RED}}
    url = {"type": "image", "source": {"type": "url", "url": f"{image_host}/red.png"}}
    plain = post(server, "/v1/messages", msg())
    assert plain.status_code == 200, plain.text
    n_text = plain.json()["usage"]["input_tokens"]
    for block in (b64, url):
        r = post(server, "/v1/messages", msg(block))
        assert r.status_code == 200, r.text
        assert r.json()["type"] == "message" and r.json()["usage"]["input_tokens"] == n_text + N_IMAGE_TOKENS
    counted = post(server, "/v1/messages/count_tokens", msg(b64))
    assert counted.status_code == 200 and counted.json() == {"input_tokens": n_text + N_IMAGE_TOKENS}
    # an image inside a tool result reaches the model too
    turn = {"model": "vlm", "max_tokens": 4, "messages": [
        {"role": "user", "content": "Take a photo"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "camera", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [b64]}]}]}
    no_image = json.loads(json.dumps(turn))
    no_image["messages"][2]["content"][0]["content"] = [{"type": "text", "text": ""}]
    with_img, without = post(server, "/v1/messages/count_tokens", turn), post(server, "/v1/messages/count_tokens", no_image)
    assert with_img.status_code == 200 and without.status_code == 200, with_img.text
    assert with_img.json()["input_tokens"] == without.json()["input_tokens"] + N_IMAGE_TOKENS


def test_anthropic_sdk_sends_an_image(server: Server) -> None:
    anthropic = import_or_missing("anthropic")
    with anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0, timeout=120) as client:
        m = client.messages.create(model="vlm", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": B64_RED}},
            {"type": "text", "text": "What colour is this?"}]}])
        ref = client.messages.create(model="vlm", max_tokens=4, messages=[{"role": "user", "content": "What colour is this?"}])
    assert m.usage.input_tokens == ref.usage.input_tokens + N_IMAGE_TOKENS and m.usage.output_tokens >= 1


def test_responses_input_image(server: Server, image_host: str) -> None:
    def body(*parts: dict[str, Any]) -> dict[str, Any]:
        return {"model": "vlm", "max_output_tokens": 4, "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "What colour is this?"}, *parts]}]}

    ref = post(server, "/v1/responses", body())
    assert ref.status_code == 200, ref.text
    for src in (f"data:image/png;base64,{B64_RED}", f"{image_host}/red.png"):
        r = post(server, "/v1/responses", body({"type": "input_image", "image_url": src, "detail": "auto"}))
        assert r.status_code == 200, r.text
        assert r.json()["status"] in ("completed", "incomplete") and r.json()["error"] is None  # incomplete: max_output_tokens
        assert r.json()["usage"]["input_tokens"] == ref.json()["usage"]["input_tokens"] + N_IMAGE_TOKENS
    r = post(server, "/v1/responses", body({"type": "input_image", "file_id": "file_1"}))
    assert r.status_code == 400 and "file_id" in r.json()["error"]["message"]


def test_images_to_a_model_without_projector_are_refused_per_protocol(server: Server) -> None:
    r = post(server, "/v1/chat/completions", chat("plain", image_url(f"data:image/png;base64,{B64_RED}")))
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "no multimodal projector" in r.json()["error"]["message"]
    r = post(server, "/v1/messages", {"model": "plain", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": B64_RED}}]}]})
    assert r.status_code == 400 and r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error" and "no multimodal projector" in r.json()["error"]["message"]
    r = post(server, "/v1/responses", {"model": "plain", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": f"data:image/png;base64,{B64_RED}"}]}]})
    assert r.status_code == 400 and "no multimodal projector" in r.json()["error"]["message"]


def test_bad_images_are_400_and_the_server_keeps_serving(server: Server, image_host: str) -> None:
    cases = [
        chat("vlm", image_url("data:image/png;base64," + base64.b64encode(b"not an image").decode())),
        chat("vlm", image_url("data:image/png;base64,@@not-base64@@")),
        chat("vlm", image_url(f"{image_host}/missing.png")),
        chat("vlm", image_url("ftp://example.invalid/x.png")),
        chat("vlm", {"type": "image_url"}),
    ]
    for body in cases:
        r = post(server, "/v1/chat/completions", body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["message"]
    r = post(server, "/v1/messages", {"model": "vlm", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "file", "file_id": "x"}}]}]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert prompt_tokens(server, "vlm", image_url(f"data:image/png;base64,{B64_RED}")) > N_IMAGE_TOKENS
