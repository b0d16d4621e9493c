"""A recurrent architecture (tiny random-weight RWKV6): its state cannot be cut back to a prefix,
so prefix reuse and cancellation must never leave a sequence with a state that disagrees with
its tokens. Every output is checked against a fresh model with no cache."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pylocalai import Llama

pytestmark = pytest.mark.engine

GREEDY: dict[str, Any] = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def rwkv(engine: Any, tiny_rwkv: Path) -> Iterator[Llama]:
    with Llama(tiny_rwkv, n_ctx=1024, n_batch=32, n_ubatch=32, n_parallel=2, n_threads=2) as m:
        yield m


def fresh(path: Path, prompt: list[int], n: int) -> tuple[int, ...]:
    with Llama(path, n_ctx=1024, n_batch=32, n_ubatch=32, n_parallel=1, n_threads=2, cache_prompt=False) as m:
        return m.complete(prompt, max_tokens=n, **GREEDY).tokens


def test_it_is_recurrent(rwkv: Llama) -> None:
    assert rwkv.info["architecture"] == "rwkv6"
    assert rwkv.info["recurrent"] is True


def test_partial_prefix_is_recomputed_not_reused(rwkv: Llama, tiny_rwkv: Path) -> None:
    base = [1, 300, 301, 302, 303, 304, 305, 306, 307, 308]
    rwkv.complete(base, max_tokens=4, **GREEDY)
    other = [*base[:6], 999, 998]  # shares 6 tokens, then differs: the state must be rebuilt
    out = rwkv.complete(other, max_tokens=8, **GREEDY)
    assert out.usage.cached_tokens == 0
    assert out.tokens == fresh(tiny_rwkv, other, 8)


def test_partial_prefix_past_a_checkpoint_resumes_from_it(rwkv: Llama, tiny_rwkv: Path) -> None:
    base = [1, *range(1000, 1039)]  # 40 tokens: two prompt chunks of 32 and 8, a checkpoint after each
    rwkv.complete(base, max_tokens=4, **GREEDY)
    restored = rwkv.scheduler.stats.checkpoints_restored
    other = [*base[:35], 999, 998]  # leaves the cache after 35 tokens: the state after 32 is saved
    out = rwkv.complete(other, max_tokens=8, **GREEDY)
    assert out.usage.cached_tokens == 32
    assert rwkv.scheduler.stats.checkpoints_restored == restored + 1
    assert out.tokens == fresh(tiny_rwkv, other, 8)


def test_whole_cached_sequence_is_continued(rwkv: Llama, tiny_rwkv: Path) -> None:
    prompt = [1, 500, 501, 502, 503]
    first = rwkv.complete(prompt, max_tokens=5, **GREEDY)
    # the slot holds prompt + the first 4 generated tokens (the last one was never decoded)
    follow = [*prompt, *first.tokens, 77, 78]
    out = rwkv.complete(follow, max_tokens=6, **GREEDY)
    assert out.usage.cached_tokens == len(prompt) + 4
    assert out.tokens == fresh(tiny_rwkv, follow, 6)


def test_identical_prompt_after_generation(rwkv: Llama, tiny_rwkv: Path) -> None:
    prompt = [1, 600, 601, 602]
    a = rwkv.complete(prompt, max_tokens=6, **GREEDY)
    b = rwkv.complete(prompt, max_tokens=6, **GREEDY)
    assert a.tokens == b.tokens == fresh(tiny_rwkv, prompt, 6)


def test_cancelled_generation_leaves_a_consistent_state(rwkv: Llama, tiny_rwkv: Path) -> None:
    prompt = [1, 700, 701, 702, 703]
    gen = rwkv.generate(prompt, max_tokens=500, **GREEDY)
    seen = []
    for chunk in gen:
        seen.extend(chunk.tokens)
        if len(seen) >= 3:
            break
    gen.close()
    again = rwkv.complete(prompt, max_tokens=8, **GREEDY)
    assert again.tokens == fresh(tiny_rwkv, prompt, 8)
    assert again.tokens[:3] == tuple(seen[:3])


def test_two_sequences_batched_equal_solo(rwkv: Llama, tiny_rwkv: Path) -> None:
    prompts = [[1, 800, 801], [1, 900, 901, 902, 903]]
    out: dict[int, tuple[int, ...]] = {}

    def work(i: int) -> None:
        out[i] = rwkv.complete(prompts[i], max_tokens=12, **GREEDY).tokens

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, p in enumerate(prompts):
        assert out[i] == fresh(tiny_rwkv, p, 12)
