"""The host-RAM prompt cache (cache_ram): a slot that moves on to an unrelated prompt first saves its
whole memory, and a later prompt that shares more with a saved state gets it back. Every answer is
checked against a model with no cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pylocalai import Llama

pytestmark = pytest.mark.engine

GREEDY: dict[str, Any] = {"temperature": 0.0, "ignore_eos": True}
RNG = np.random.default_rng(11)


def tokens(n: int) -> list[int]:
    return [1, *(int(t) for t in RNG.integers(300, 20000, n - 1))]


A, B, TAIL = tokens(200), tokens(120), [int(t) for t in RNG.integers(300, 20000, 6)]


def params(backend: str = "llama-cpp", **kw: Any) -> dict[str, Any]:
    return {"n_ctx": 2048, "n_batch": 64, "n_ubatch": 64, "n_parallel": 1, "n_threads": 2, "backend": backend, **kw}


def fresh(path: Path, prompt: list[int], n: int = 6, **kw: Any) -> tuple[int, ...]:
    with Llama(path, **params(**kw), cache_prompt=False) as m:
        return m.complete(prompt, max_tokens=n, **GREEDY).tokens


def test_a_replaced_slot_comes_back_from_ram(backend: str, tiny_llama: Path) -> None:
    with Llama(tiny_llama, **params(backend, cache_ram=64)) as m:
        m.complete(A, max_tokens=8, **GREEDY)
        m.complete(B, max_tokens=8, **GREEDY)  # the one slot moves on: A's state goes to RAM
        assert m.scheduler.stats.ram_saved == 1 and m.scheduler.stats.ram_bytes > 0
        out = m.complete([*A, *TAIL], max_tokens=6, **GREEDY)
        assert out.usage.cached_tokens == len(A)  # from RAM: the slot itself shared only BOS
        assert m.scheduler.stats.ram_restored == 1
        assert m.scheduler.stats.ram_saved == 2  # B's state, which the slot held until then
    assert out.tokens == fresh(tiny_llama, [*A, *TAIL], backend=backend)


def test_a_prompt_keeping_most_of_the_slot_saves_nothing(backend: str, tiny_llama: Path) -> None:
    """Another question after the same long prefix keeps the larger part of the slot: like
    llama-server, the slot's memory is saved only when a prompt keeps less than half of it, not for a
    tail that is cheap to compute again (a save copies the whole memory, in the request's path)."""
    question1, question2 = tokens(41)[1:], tokens(41)[1:]  # 40 tokens each, discarded with the answer
    with Llama(tiny_llama, **params(backend, cache_ram=64)) as m:
        m.complete([*A, *question1], max_tokens=8, **GREEDY)
        out = m.complete([*A, *question2], max_tokens=6, **GREEDY)  # keeps 200 of 248: no save
        assert out.usage.cached_tokens == len(A)
        assert m.scheduler.stats.ram_saved == 0
        m.complete([*B, *question1], max_tokens=6, **GREEDY)  # keeps only BOS: the slot is saved
        assert m.scheduler.stats.ram_saved == 1
    assert out.tokens == fresh(tiny_llama, [*A, *question2], backend=backend)


def test_without_cache_ram_the_prompt_is_computed_again(engine: Any, tiny_llama: Path) -> None:
    with Llama(tiny_llama, **params(cache_ram=0)) as m:
        m.complete(A, max_tokens=8, **GREEDY)
        m.complete(B, max_tokens=8, **GREEDY)
        out = m.complete([*A, *TAIL], max_tokens=6, **GREEDY)
        assert out.usage.cached_tokens == 1  # BOS, shared with B
        assert m.scheduler.stats.ram_saved == 0
    assert out.tokens == fresh(tiny_llama, [*A, *TAIL])


def test_the_limit_drops_the_oldest_states(engine: Any, tiny_llama: Path) -> None:
    # 2 layers x (K + V) x 2 heads x 16 dims x f16 = 256 bytes a token: 1,500 tokens are ~0.4 MiB
    prompts = [tokens(1500) for _ in range(4)]
    with Llama(tiny_llama, **params(cache_ram=1)) as m:
        for p in prompts:
            m.complete(p, max_tokens=2, **GREEDY)
        # saved: prompts 0, 1, 2 (the slot holds 3); three do not fit in 1 MiB, so 0 went first
        assert m.scheduler.stats.ram_saved == 3 and m.scheduler.stats.ram_bytes <= 1 << 20
        assert m.complete([*prompts[0], *TAIL], max_tokens=2, **GREEDY).usage.cached_tokens == 1
        assert m.complete([*prompts[2], *TAIL], max_tokens=2, **GREEDY).usage.cached_tokens == 1500
        assert m.scheduler.stats.ram_restored == 1


def test_a_saved_state_without_its_old_window_resumes_from_its_checkpoint(engine: Any, tiny_gemma3: Path) -> None:
    """Gemma 3's window layers dropped the first positions before the state was saved: a prompt
    sharing 300 of its tokens resumes from the checkpoint saved with it (at 288, the last chunk end
    within them), never from the incomplete window."""
    long = tokens(601)
    gemma = {"cache_type_k": "f32", "cache_type_v": "f32", "n_batch": 32, "n_ubatch": 32}
    prompt = [*long[:300], *TAIL]
    with Llama(tiny_gemma3, **params(cache_ram=64, **gemma)) as m:
        m.complete(long, max_tokens=8, **GREEDY)
        m.complete(B, max_tokens=8, **GREEDY)
        out = m.complete(prompt, max_tokens=6, logprobs=3, **GREEDY)
        assert m.scheduler.stats.ram_restored == 1 and m.scheduler.stats.checkpoints_restored == 1
        assert out.usage.cached_tokens == 288
    with Llama(tiny_gemma3, **params(**gemma), cache_prompt=False) as m:
        cold = m.complete(prompt, max_tokens=6, logprobs=3, **GREEDY)
    assert out.tokens == cold.tokens
    assert [lp.logprob for lp in out.logprobs] == pytest.approx([lp.logprob for lp in cold.logprobs], abs=1e-3)


def test_recurrent_state_comes_back_whole_or_from_a_checkpoint(engine: Any, tiny_rwkv: Path) -> None:
    base = [1, *range(1000, 1039)]  # 40 tokens: checkpoints after 32 and 40
    other = [1, *range(2000, 2039)]
    kw = {"n_batch": 32, "n_ubatch": 32}
    with Llama(tiny_rwkv, **params(cache_ram=64, **kw)) as m:
        m.complete(base, max_tokens=4, **GREEDY)
        m.complete(other, max_tokens=4, **GREEDY)
        out = m.complete([*base, 7, 8], max_tokens=6, **GREEDY)
        # the saved state is after base and 3 answer tokens; the prompt leaves it after base: its checkpoint
        assert out.usage.cached_tokens == 40
        assert m.scheduler.stats.ram_restored == 1
    assert out.tokens == fresh(tiny_rwkv, [*base, 7, 8], **kw)


def test_a_saved_window_state_is_not_taken_for_a_prefix_it_cannot_serve(engine: Any, tiny_gemma3: Path) -> None:
    """A whole-sequence save keeps only the window's last positions, even with swa_full (where the
    live cache holds them all and no checkpoints are kept): such a state cannot serve a prefix that
    ends further back, so it must stay saved rather than be swapped in and dropped."""
    long = tokens(601)
    gemma = {"cache_type_k": "f32", "cache_type_v": "f32", "n_batch": 32, "n_ubatch": 32, "swa_full": True}
    with Llama(tiny_gemma3, **params(cache_ram=64, **gemma)) as m:
        first = m.complete(long, max_tokens=8, **GREEDY)
        m.complete(B, max_tokens=8, **GREEDY)
        out = m.complete([*long[:300], *TAIL], max_tokens=2, **GREEDY)
        assert out.usage.cached_tokens == 1 and m.scheduler.stats.ram_restored == 0
        # a prompt that goes on from all of the saved tokens (the last answer token was never decoded)
        held = [*long, *first.tokens[:7]]
        again = m.complete([*held, *TAIL], max_tokens=2, **GREEDY)
        assert again.usage.cached_tokens == len(held)
        assert m.scheduler.stats.ram_restored == 1


def test_caches_dropped_for_room_go_to_ram_first(engine: Any, tiny_llama: Path) -> None:
    """One cache shared by two slots, room for one prompt: the second prompt needs the first slot's
    cells, which are saved to RAM before they are freed, and come back for a revisit."""
    with Llama(tiny_llama, **{**params(cache_ram=64), "n_ctx": 256, "n_parallel": 2}, kv_unified=True) as m:
        m.complete(A, max_tokens=8, **GREEDY)  # slot 0 holds 208 of the 256 cells
        m.complete(B, max_tokens=8, **GREEDY)  # slot 1 needs 128: slot 0's cache is dropped
        assert m.scheduler.stats.kv_full_retries >= 1 and m.scheduler.stats.ram_saved >= 1
        assert m.scheduler.slot_tokens(0) == ()
        out = m.complete([*A, *TAIL], max_tokens=6, **GREEDY)
        assert out.usage.cached_tokens == len(A) and m.scheduler.stats.ram_restored == 1
    assert out.tokens == fresh(tiny_llama, [*A, *TAIL])
