"""Micro-benchmarks of the Python hot paths (pytest-benchmark); each also checks what it timed.

Run alone with `python3 -m pytest tests/unit/test_micro_bench.py --benchmark-only`; in the normal
test run they execute as ordinary tests (a few rounds each). No timing is asserted here: speed
targets live in bench/, measured side by side with a reference.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pylocalai.api.wire import SLOT, FrameTemplate, sse_data
from pylocalai.config.model_config import load_catalog
from pylocalai.config.prompt import render_chat
from pylocalai.engine.scheduler import Scheduler
from pylocalai.engine.textstream import TextAssembler
from pylocalai.engine.types import EngineRequest, SamplingParams, TextDelta
from tests.conftest import import_or_missing

import_or_missing("pytest_benchmark")


class NullSession:
    """An engine session that costs nothing: every sampled token is `7`, rendered as b'ab'.
    What remains in a timed step is the scheduler's own per-step work."""

    n_ctx_seq = 1 << 30
    n_batch = 512
    n_seq_max = 8

    def __init__(self) -> None:
        self.decoded = 0

    def set_sampler(self, seq: int, params: dict[str, Any], history: Any) -> None:
        pass

    def drop_sampler(self, seq: int) -> None:
        pass

    def seq_rm(self, seq: int, p0: int, p1: int) -> bool:
        return True

    def seq_add(self, seq: int, p0: int, p1: int, delta: int) -> None:
        pass

    def step(self, tokens: Any, pos: Any, seq_ids: Any, want: Any, notify_fd: int = -1) -> tuple[int, list[Any]]:
        if notify_fd >= 0:  # as the native step does once the GIL is released
            os.eventfd_write(notify_fd, 1)
        self.decoded += len(tokens)
        rows = [(int(s), 7, False, b"ab", -0.1, ()) for s, w in zip(seq_ids.tolist(), want.tolist()) if w]
        return 0, rows


def test_scheduler_step_with_8_active_sequences(benchmark: Any) -> None:
    sess = NullSession()
    sched = Scheduler(sess, n_slots=8)  # type: ignore[arg-type]
    for i in range(8):
        sched.submit(EngineRequest(f"r{i}", tuple(range(1, 40 + i)), SamplingParams(max_tokens=10**9, ignore_eos=True,
                                                                                   stop=("</s>", "\nUser:"))))
    sched.step()  # admit and prefill all eight prompts in one batch
    assert sched.active_slots == 8

    out = benchmark(sched.step)

    # every step decodes one token for each of the 8 sequences and hands each its text
    assert sorted(rid for rid, _ in out) == [f"r{i}" for i in range(8)]
    for _, events in out:
        assert [type(e) for e in events] == [TextDelta] and events[0].text == "ab" and events[0].tokens == (7,)
    assert sched.stats.max_seqs_per_step == 8


CHUNK = {"id": "chatcmpl-0123456789abcdef", "object": "chat.completion.chunk", "created": 1764000000,
         "model": "smollm2", "system_fingerprint": None,
         "choices": [{"index": 0, "delta": {"content": " dragon"}, "logprobs": None, "finish_reason": None}]}


def test_sse_encoding_of_a_chat_chunk(benchmark: Any) -> None:
    frame = benchmark(sse_data, CHUNK)
    assert frame.startswith(b"data: {") and frame.endswith(b"}\n\n")
    assert json.loads(frame[len(b"data: "):]) == CHUNK


def test_sse_encoding_of_a_content_delta_from_its_template(benchmark: Any) -> None:
    # the server's per-token path: the chunk's fixed part encoded once, the delta's text filled in
    template = FrameTemplate({**CHUNK, "choices": [{**CHUNK["choices"][0], "delta": {"content": SLOT}}]})
    frame = benchmark(template, " dragon")
    assert frame == sse_data(CHUNK)


def test_go_template_rendering_of_a_chat(benchmark: Any, tmp_path: Path) -> None:
    # the ChatML chat_message template of LocalAI's gallery (gotemplate corpus: chatml_msg_*)
    chat_message = ('<|im_start|>{{ .RoleName }}\n{{ if .FunctionCall -}}\nFunction call:\n{{ else if eq .RoleName "tool" -}}\n'
                    'Function response:\n{{ end -}}\n{{ if .Content -}}\n{{.Content }}\n{{ end -}}\n{{ if .FunctionCall -}}\n'
                    '{{toJson .FunctionCall}}\n{{ end -}}<|im_end|>\n')
    (tmp_path / "m.yaml").write_text(json.dumps({"name": "m", "parameters": {"model": "m.gguf"}, "template": {
        "chat_message": chat_message, "chat": "{{.Input -}}\n<|im_start|>assistant\n"}}))
    cfg = load_catalog(tmp_path).configs["m"]
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Hello, how are you?"},
                {"role": "assistant", "content": "Fine, thanks."},
                {"role": "user", "content": "Tell me a story."}]

    out = benchmark(render_chat, cfg, messages)

    # LocalAI joins the rendered messages with "\n" (Go's output in the corpus case chatml_chat)
    assert out == ("<|im_start|>system\nYou are a helpful assistant.\n<|im_end|>\n\n"
                   "<|im_start|>user\nHello, how are you?\n<|im_end|>\n\n"
                   "<|im_start|>assistant\nFine, thanks.\n<|im_end|>\n\n"
                   "<|im_start|>user\nTell me a story.\n<|im_end|>\n"
                   "<|im_start|>assistant\n")


def test_incremental_detokenization(benchmark: Any) -> None:
    text = "Once upon a time, a dragon — named Ælfrida 🐉 — baked bread. " * 8
    data = text.encode()
    # token pieces of 1-4 bytes that split multi-byte characters, as byte-level BPE pieces do
    cuts = np.cumsum(np.random.default_rng(0).integers(1, 5, size=len(data)))
    pieces = [data[a:b] for a, b in zip([0, *cuts.tolist()], cuts.tolist()) if a < len(data)]
    pieces[-1] = data[sum(len(p) for p in pieces[:-1]):]

    def detokenize() -> str:
        asm = TextAssembler(stops=("\nUser:", "</s>"))
        return "".join(asm.feed(p) for p in pieces) + asm.flush()

    out = benchmark(detokenize)
    assert out == text
    assert "\ufffd" not in out
