"""Images through llama.cpp's multimodal library on a tiny random llama + tiny LLaVA-style projector:
tokenization with media spans, the image reaching the model, prefix reuse that keeps or cuts whole
images, batching, URL and data-URI sources, and the errors for what cannot work."""

from __future__ import annotations

import base64
import http.server
import io
import threading
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pylocalai import Llama
from pylocalai.config.model_config import ModelConfig, TemplateConfig
from pylocalai.config.prompt import render_chat
from pylocalai.engine.media import MEDIA_MARKER, MediaRef, content_parts, split_messages
from pylocalai.errors import InvalidRequestError
from pylocalai.model import sampling_from
from tests import ggufgen

N_IMAGE_TOKENS = 4  # (28 // 14) ** 2 for write_tiny_mmproj's defaults


def png(rgb: tuple[int, int, int], size: int = 28) -> bytes:
    return ggufgen.write_png(None, np.full((size, size, 3), rgb, np.uint8))


RED, BLUE, GREEN = png((255, 0, 0)), png((0, 0, 255)), png((0, 200, 0))


def data_uri(img: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(img).decode()


@pytest.fixture(scope="module")
def vlm(backend: str, tiny_llama: Path, tiny_mmproj: Path) -> Iterator[Llama]:
    with Llama(tiny_llama, backend=backend, mmproj=tiny_mmproj, n_ctx=1024, n_batch=64, n_ubatch=64, n_parallel=2, n_threads=2) as m:
        yield m


def run(llm: Llama, prompt: str, images: list[bytes], n: int = 4) -> tuple[list[Any], Any]:
    """Greedy tokens with their top-3 logprobs, and the finish event."""
    req = llm._request(prompt, sampling_from({"max_tokens": n, "temperature": 0.0, "logprobs": 3}),
                       [MediaRef("image", img) for img in images])
    lps, fin = [], None
    with llm.worker.stream_sync(req) as events:
        for ev in events:
            if hasattr(ev, "logprobs"):
                lps.extend(ev.logprobs)
            else:
                fin = ev
    assert fin is not None and fin.error is None, fin
    return lps, fin


def test_projector_reports_what_it_takes(vlm: Llama) -> None:
    assert vlm.multimodal == {"vision": True, "audio": False}


def test_tokenize_media_gives_placeholder_spans(vlm: Llama) -> None:
    text_only = vlm.tokenize("look  now")
    tokens, spans = vlm.tokenize_media(f"look {MEDIA_MARKER} now {MEDIA_MARKER}!", [RED, BLUE])
    assert len(spans) == 2
    for span in spans:
        assert span.length == span.chunk.n_tokens == N_IMAGE_TOKENS
        ids = set(tokens[span.start : span.end])
        assert len(ids) == 1 and next(iter(ids)) < 0  # one negative placeholder per image
    assert tokens[spans[0].start] != tokens[spans[1].start]  # content decides the placeholder
    again, _ = vlm.tokenize_media(f"x {MEDIA_MARKER}", [RED])
    assert tokens[spans[0].start] in again
    assert all(t >= 0 for i, t in enumerate(tokens) if not any(s.start <= i < s.end for s in spans))
    assert tokens[0] == text_only[0]  # BOS as with plain text


def test_the_image_reaches_the_model(vlm: Llama) -> None:
    prompt = f"What is in {MEDIA_MARKER} this picture?"
    red, fin = run(vlm, prompt, [RED])
    blue, _ = run(vlm, prompt, [BLUE])
    red2, _ = run(vlm, prompt, [RED])
    assert fin.usage.prompt_tokens == len(vlm.tokenize(prompt.replace(MEDIA_MARKER, ""))) + N_IMAGE_TOKENS - 1 or \
        fin.usage.prompt_tokens > N_IMAGE_TOKENS
    # another image changes the distribution of the very first token; the same image gives the same
    assert abs(red[0].logprob - blue[0].logprob) > 1e-4 or red[0].top != blue[0].top
    assert [t.token for t in red] == [t.token for t in red2]
    np.testing.assert_allclose([t.logprob for t in red], [t.logprob for t in red2], atol=1e-3)


def test_prefix_reuse_keeps_the_same_image_and_cuts_before_another(backend: str, tiny_llama: Path, tiny_mmproj: Path) -> None:
    # (caught ik_llama.cpp's libmtmd giving every image the same id: placeholders come from the bytes)
    with Llama(tiny_llama, backend=backend, mmproj=tiny_mmproj, n_ctx=512, n_batch=64, n_ubatch=64, n_parallel=1, n_threads=2) as one:
        prompt = f"Describe {MEDIA_MARKER} in one word."
        _, spans = one.tokenize_media(prompt, [RED])
        first, fin1 = run(one, prompt, [RED])
        assert fin1.usage.cached_tokens == 0
        second, fin2 = run(one, prompt, [RED])
        assert fin2.usage.cached_tokens >= spans[0].end  # the image's embeddings were kept
        assert [t.token for t in first] == [t.token for t in second]
        np.testing.assert_allclose([t.logprob for t in first], [t.logprob for t in second], atol=1e-3)
        other, fin3 = run(one, prompt, [BLUE])
        assert fin3.usage.cached_tokens == spans[0].start  # kept up to the image, not into it
        fresh_blue = Llama(tiny_llama, backend=backend, mmproj=tiny_mmproj, n_ctx=512, n_batch=64, n_ubatch=64, n_parallel=1, n_threads=2)
        with fresh_blue:
            ref, _ = run(fresh_blue, prompt, [BLUE])
        assert [t.token for t in other] == [t.token for t in ref]
        np.testing.assert_allclose([t.logprob for t in other], [t.logprob for t in ref], atol=1e-3)


def test_batched_image_requests_match_solo(vlm: Llama) -> None:
    prompts = [(f"A {MEDIA_MARKER} B", [RED]), (f"Two: {MEDIA_MARKER} and {MEDIA_MARKER}.", [BLUE, GREEN])]
    solo = [run(vlm, p, imgs, n=6)[0] for p, imgs in prompts]
    vlm.worker.call(vlm.scheduler.drop_idle_caches)
    results: list[Any] = [None, None]

    def work(i: int) -> None:
        results[i] = run(vlm, *prompts[i], n=6)[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, ref in zip(results, solo, strict=True):
        assert [t.token for t in got] == [t.token for t in ref]
        np.testing.assert_allclose([t.logprob for t in got], [t.logprob for t in ref], atol=1e-3)


def test_chat_with_image_parts_from_data_uri_and_url(vlm: Llama) -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = BLUE if self.path == "/blue.png" else b"not found"
            self.send_response(200 if self.path == "/blue.png" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/blue.png"

        def ask(image_url: str) -> Any:
            msgs = [{"role": "user", "content": [{"type": "text", "text": "What colour is this?"},
                                                 {"type": "image_url", "image_url": {"url": image_url}}]}]
            return vlm.chat(msgs, max_tokens=5, temperature=0.0, logprobs=2)

        by_url, by_data = ask(url), ask(data_uri(BLUE))
        assert by_url.raw_text == by_data.raw_text
        text_only = vlm.chat([{"role": "user", "content": "What colour is this?"}], max_tokens=5, temperature=0.0)
        assert by_url.usage.prompt_tokens == text_only.usage.prompt_tokens + N_IMAGE_TOKENS
        with pytest.raises(InvalidRequestError, match="could not fetch media"):
            ask(f"http://127.0.0.1:{srv.server_address[1]}/missing.png")
    finally:
        srv.shutdown()
        srv.server_close()


def test_media_errors_are_request_errors(vlm: Llama, backend: str, tiny_llama: Path, tiny_mmproj: Path) -> None:
    with pytest.raises(InvalidRequestError, match="different number of media markers"):
        vlm.tokenize_media(f"one {MEDIA_MARKER}", [RED, BLUE])
    with pytest.raises(InvalidRequestError, match="could not be decoded"):
        vlm.tokenize_media(f"one {MEDIA_MARKER}", [b"this is not an image"])
    wav = io.BytesIO()
    with wave.open(wav, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.zeros(1600, np.int16).tobytes())
    audio_msg = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": base64.b64encode(wav.getvalue()).decode(), "format": "wav"}}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(InvalidRequestError, match="(?i)does not support audio|takes no audio"):
        vlm.chat(audio_msg, max_tokens=2)
    with pytest.raises(InvalidRequestError, match="text after its last media item"):
        run(vlm, f"ends with {MEDIA_MARKER}", [RED])
    with pytest.raises(InvalidRequestError, match="base64"):
        content_parts([{"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}}])[1][0].load()
    with pytest.raises(InvalidRequestError, match="not valid base64"):
        content_parts([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}])[1][0].load()
    with pytest.raises(InvalidRequestError, match="data URI or an http"):
        content_parts([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}])[1][0].load()
    with pytest.raises(InvalidRequestError, match="unsupported content part"):
        content_parts([{"type": "video_url", "video_url": {"url": "x"}}])
    with Llama(tiny_llama, backend=backend, n_ctx=256, n_parallel=1, n_threads=2) as plain:
        assert plain.multimodal == {"vision": False, "audio": False}
        with pytest.raises(InvalidRequestError, match="no multimodal projector"):
            plain.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(RED)}}]}],
                       max_tokens=2)
        assert plain.complete("still serving", max_tokens=2, temperature=0.0).usage.completion_tokens == 2
    with pytest.raises(InvalidRequestError, match="projector file not found"):
        Llama(tiny_llama, backend=backend, mmproj=tiny_mmproj.parent / "missing.gguf", n_ctx=256, n_parallel=1)
    with pytest.raises(Exception, match="failed to load multimodal projector"):
        Llama(tiny_llama, backend=backend, mmproj=tiny_llama, n_ctx=256, n_parallel=1)  # a text model is no projector


def test_go_templates_render_media_with_the_multimodal_template() -> None:
    cfg = ModelConfig(name="m", model_path=Path("m.gguf"),
                      template=TemplateConfig(chat_message="{{.RoleName}}: {{.Content}}", chat="{{.Input}}\nassistant:"))
    msgs = split_messages([
        {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "image_url", "image_url": {"url": data_uri(RED)}}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(BLUE)}},
                                     {"type": "text", "text": "second"}]},
    ])
    assert msgs[0]["content"] == "first" + MEDIA_MARKER and len(msgs[1]["media"]) == 1
    out = render_chat(cfg, msgs)
    assert out == f"user: {MEDIA_MARKER}first\nuser: {MEDIA_MARKER}second\nassistant:"
    custom = ModelConfig(name="m", model_path=Path("m.gguf"), template=TemplateConfig(
        chat_message="{{.Content}}", chat="{{.Input}}",
        multimodal="{{ range .Images }}[img-{{.ID}}]{{end}}{{.Text}}"))
    assert render_chat(custom, msgs) == "[img-0]first\n[img-1]second"
