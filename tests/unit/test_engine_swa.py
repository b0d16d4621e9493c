"""Sliding-window attention (a tiny random-weight Gemma 3, window of 16 positions in five of six
layers): llama.cpp keeps only the last few hundred positions in those layers' cache, so a cached
prefix that a new prompt leaves further back is no longer whole there. Reusing it anyway gives
wrong output; the scheduler restores a checkpoint instead, or computes the prompt again.

Every answer is checked against a model with no cache. Weights and cache are f32 and each
sequence has its own cache stream, so a correctly reused prefix gives the fresh logprobs to
rounding (within 1e-3), while a prefix whose window is gone is off by far more (0.5 here)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pylocalai import Llama
from pylocalai.engine.backend import has_gpu, load_engine

pytestmark = pytest.mark.engine

GREEDY: dict[str, Any] = {"temperature": 0.0, "ignore_eos": True}
PARAMS: dict[str, Any] = {"n_ctx": 1024, "n_batch": 32, "n_ubatch": 32, "n_parallel": 1, "n_threads": 2,
                          "cache_type_k": "f32", "cache_type_v": "f32"}
RNG = np.random.default_rng(7)
LONG = [1, *(int(t) for t in RNG.integers(300, 20000, 600))]  # 601 tokens: past what the window cache holds
TAIL = [int(t) for t in RNG.integers(300, 20000, 10)]


def fresh(path: Path, prompt: list[int], n: int = 4) -> Any:
    with Llama(path, **PARAMS, cache_prompt=False) as m:
        return m.complete(prompt, max_tokens=n, logprobs=5, **GREEDY)


def same_answer(a: Any, b: Any) -> None:
    """a is b's greedy answer. On the CPU: the same tokens, logprobs equal to float noise. On a GPU the
    kernels change with the number of rows computed at once (logprobs 1.1e-3 apart measured on an H100,
    CUDA 13.0), so logprobs agree to 1e-2 and the tokens up to a first one where b's top two are that
    close (this random-weight model has near-ties), past which nothing more can be compared."""
    gpu = has_gpu(load_engine("llama-cpp"))
    tol = 1e-2 if gpu else 1e-3
    if not gpu:
        assert a.tokens == b.tokens
    assert len(a.tokens) == len(b.tokens)
    for k, (x, y) in enumerate(zip(a.logprobs, b.logprobs, strict=True)):
        assert x.logprob == pytest.approx(y.logprob, abs=tol), f"token {k}"
        if x.token != y.token:
            (_, best), (_, second) = y.top[:2]
            assert best - second <= 2 * tol, f"token {k} differs where the reference has no tie"
            return


@pytest.fixture()
def gemma(engine: Any, tiny_gemma3: Path) -> Iterator[Llama]:
    with Llama(tiny_gemma3, **PARAMS) as m:
        yield m


def test_it_has_a_sliding_window(gemma: Llama) -> None:
    assert gemma.info["architecture"] == "gemma3"
    assert gemma.scheduler.n_swa == 16


def test_the_window_cache_drops_old_positions(gemma: Llama) -> None:
    gemma.complete(LONG, max_tokens=8, **GREEDY)
    # what makes this test meaningful: the first cached positions are gone from the window layers
    assert gemma._session.seq_pos_min(0) > 300


def test_prefix_left_far_back_comes_from_a_checkpoint(gemma: Llama, tiny_gemma3: Path) -> None:
    gemma.complete(LONG, max_tokens=8, **GREEDY)
    prompt = [*LONG[:300], *TAIL]
    out = gemma.complete(prompt, max_tokens=4, logprobs=5, **GREEDY)
    # checkpoints lie at the ends of the 32-token prompt chunks: the last one within the shared 300 tokens
    assert out.usage.cached_tokens == 288
    assert gemma.scheduler.stats.checkpoints_restored == 1
    same_answer(out, fresh(tiny_gemma3, prompt))


def test_checkpoints_lie_on_a_grid_whatever_prefix_a_prompt_began_from(gemma: Llama, tiny_gemma3: Path) -> None:
    gemma.complete(LONG, max_tokens=8, **GREEDY)
    gemma.complete([*LONG[:300], *TAIL], max_tokens=4, **GREEDY)
    gemma.complete(LONG, max_tokens=8, **GREEDY)  # reuses 300 tokens, then prefills from position 300
    prompt = [*LONG[:350], *TAIL]  # too far back for the live window
    out = gemma.complete(prompt, max_tokens=4, logprobs=5, **GREEDY)
    assert out.usage.cached_tokens == 320  # a multiple of 32, not 300 + k * 32 (332)
    same_answer(out, fresh(tiny_gemma3, prompt))


def test_prefix_left_near_the_end_is_reused_from_the_live_cache(gemma: Llama, tiny_gemma3: Path) -> None:
    gemma.complete(LONG, max_tokens=8, **GREEDY)
    prompt = [*LONG[:590], *TAIL]
    out = gemma.complete(prompt, max_tokens=4, logprobs=5, **GREEDY)
    assert out.usage.cached_tokens == 590
    assert gemma.scheduler.stats.checkpoints_restored == 0
    same_answer(out, fresh(tiny_gemma3, prompt))


def test_same_prompt_after_a_long_answer(gemma: Llama, tiny_gemma3: Path) -> None:
    first = gemma.complete(LONG, max_tokens=300, **GREEDY)
    again = gemma.complete(LONG, max_tokens=300, **GREEDY)
    assert again.tokens == first.tokens == fresh(tiny_gemma3, LONG, 300).tokens
    assert 0 < again.usage.cached_tokens < len(LONG)  # the window moved on: back to a checkpoint


def test_without_checkpoints_the_prompt_is_computed_again(engine: Any, tiny_gemma3: Path) -> None:
    with Llama(tiny_gemma3, **PARAMS, n_ctx_checkpoints=0) as m:
        m.complete(LONG, max_tokens=8, **GREEDY)
        prompt = [*LONG[:300], *TAIL]
        out = m.complete(prompt, max_tokens=4, logprobs=5, **GREEDY)
        assert out.usage.cached_tokens == 0
        assert m.scheduler.stats.prefix_dropped == 1
        assert m.scheduler.stats.checkpoints_saved == 0
    same_answer(out, fresh(tiny_gemma3, prompt))


def test_swa_full_keeps_every_position(engine: Any, tiny_gemma3: Path) -> None:
    with Llama(tiny_gemma3, **PARAMS, swa_full=True) as m:
        m.complete(LONG, max_tokens=8, **GREEDY)
        prompt = [*LONG[:300], *TAIL]
        out = m.complete(prompt, max_tokens=4, logprobs=5, **GREEDY)
        assert out.usage.cached_tokens == 300  # nothing dropped: the live cache serves
    same_answer(out, fresh(tiny_gemma3, prompt))


def test_each_engine_answers_as_fresh_after_reuse(backend: str, tiny_gemma3: Path) -> None:
    """ik_llama.cpp keeps every position in its window layers (and saves no checkpoints): the live
    cache serves there; llama.cpp restores a checkpoint. Both must answer as a fresh model."""
    params = {**PARAMS, "backend": backend}
    if backend == "ik-llama-cpp":  # ik counts an f32 V cache as quantized, which needs flash attention
        params.update(cache_type_k="f16", cache_type_v="f16")
    prompt = [*LONG[:300], *TAIL]
    with Llama(tiny_gemma3, **params) as m:
        m.complete(LONG, max_tokens=8, **GREEDY)
        out = m.complete(prompt, max_tokens=4, logprobs=5, **GREEDY)
    with Llama(tiny_gemma3, **params, cache_prompt=False) as m:
        cold = m.complete(prompt, max_tokens=4, logprobs=5, **GREEDY)
    assert out.usage.cached_tokens == (300 if backend == "ik-llama-cpp" else 288)
    same_answer(out, cold)


def test_a_slot_is_picked_by_the_prefix_it_can_serve(engine: Any, tiny_gemma3: Path) -> None:
    """A slot whose window no longer holds the prefix a prompt shares with it serves none of it
    (checkpoints off): the prompt takes an empty slot, and the long prompt stays cached whole."""
    with Llama(tiny_gemma3, **{**PARAMS, "n_parallel": 2, "n_ctx": 2048}, n_ctx_checkpoints=0) as m:
        m.complete(LONG, max_tokens=8, **GREEDY)
        short = m.complete([*LONG[:280], *TAIL], max_tokens=4, **GREEDY)
        assert short.usage.cached_tokens == 0 and m.scheduler.stats.prefix_dropped == 0
        prompt = [*LONG, *TAIL]
        out = m.complete(prompt, max_tokens=4, logprobs=5, **GREEDY)
        assert out.usage.cached_tokens == len(LONG)  # the first slot still holds all of it
        same_answer(out, fresh(tiny_gemma3, prompt))
