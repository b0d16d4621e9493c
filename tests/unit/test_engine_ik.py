"""ik_llama.cpp's own knobs, each seen taking effect on CPU or refused with a clear error.

Most knobs only change the compute graph (fused ops, merged or repacked weights, split attention),
so the engine is made with trace_ops=True, which counts the ops of every computed graph; a knob's
effect is then the ops that appear or disappear. The shared engine suite (test_engine_tiny.py,
tests/e2e/test_smollm2.py) already runs every other feature on this engine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pylocalai import EngineError, InvalidRequestError, Llama
from pylocalai.engine import ik_options
from tests import ggufgen

pytestmark = pytest.mark.engine

IK = "ik-llama-cpp"
IQ4_KS = 144  # ik_llama.cpp's ggml type id (gguf-py does not know it)
PROMPT = "The quick brown fox jumps over the lazy dog. " * 6


@pytest.fixture(scope="module")
def tiny_q8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Q8_0 layer weights: a type ik repacks at load (q8_0 -> q8_0_r8)."""
    return ggufgen.write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny-q8.gguf", dtype="q8_0")


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mixture of 4 experts, 2 per token."""
    return ggufgen.write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny-moe.gguf", dtype="q8_0",
                                    n_expert=4, n_expert_used=2)


def traced(path: Path, prompt: str = PROMPT, max_tokens: int = 4, **kw: Any) -> tuple[dict[str, int], set[str]]:
    """The op counts and the weights read for one prompt prefill plus a few decoded tokens."""
    kw.setdefault("n_parallel", 1)
    kw.setdefault("n_ctx", 512)
    with Llama(path, backend=IK, n_threads=2, trace_ops=True, **kw) as llm:
        llm.complete(prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return llm.op_counts(), llm.weights_used()


def ops_of(ik_engine: Any, path: Path, prompt: str = PROMPT, max_tokens: int = 4, **kw: Any) -> dict[str, int]:
    return traced(path, prompt, max_tokens, **kw)[0]


def greedy(path: Path, backend: str = IK, **kw: Any) -> tuple[int, ...]:
    kw.setdefault("n_parallel", 1)
    with Llama(path, backend=backend, n_ctx=512, n_threads=2, **kw) as llm:
        return llm.complete(PROMPT, max_tokens=12, temperature=0.0, ignore_eos=True).tokens


def matmuls(ops: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in ops.items() if k.startswith("MUL_MAT")}


def test_trace_ops_counts_the_graph(ik_engine: Any, tiny_q8: Path) -> None:
    ops = ops_of(ik_engine, tiny_q8)
    assert ops.get("MUL_MAT:q8_0", 0) > 0  # layer weights, with their type
    assert ops.get("GET_ROWS", 0) > 0  # the token embedding lookup
    with Llama(tiny_q8, backend=IK, n_ctx=512, n_threads=2, n_parallel=1) as llm:  # tracing off
        llm.complete("Hi", max_tokens=2)
        assert llm.op_counts() == {}


def test_repack_tensors_repacks_the_weights_at_load(ik_engine: Any, tiny_q8: Path) -> None:
    plain = matmuls(ops_of(ik_engine, tiny_q8))
    repacked = matmuls(ops_of(ik_engine, tiny_q8, repack_tensors=True))
    assert "MUL_MAT:q8_0_r8" not in plain
    assert repacked.get("MUL_MAT:q8_0_r8", 0) > 0
    assert repacked.get("MUL_MAT:q8_0", 0) < plain["MUL_MAT:q8_0"]
    # the same weights in another layout: the greedy answer does not change
    assert greedy(tiny_q8, repack_tensors=True) == greedy(tiny_q8)


def test_merge_qkv_makes_one_projection_of_three(ik_engine: Any, tiny_q8: Path) -> None:
    plain, plain_w = traced(tiny_q8)
    merged, merged_w = traced(tiny_q8, merge_qkv=True)
    n_layer = 2
    steps = 1 + 3  # prefill + decode steps after the first token
    assert plain["MUL_MAT:q8_0"] - merged["MUL_MAT:q8_0"] == 2 * n_layer * steps
    assert "blk.0.attn_q.weight" in plain_w and "blk.0.attn_qkv.weight" in merged_w


def test_fused_up_gate_fuses_the_dense_ffn(ik_engine: Any, tiny_q8: Path) -> None:
    fused = ops_of(ik_engine, tiny_q8, fused_up_gate=True)
    unfused = ops_of(ik_engine, tiny_q8, fused_up_gate=False)
    assert fused.get("FUSED_UP_GATE", 0) > 0
    assert "FUSED_UP_GATE" not in unfused
    assert unfused["MUL_MAT:q8_0"] > fused["MUL_MAT:q8_0"]  # separate up and gate products


def test_rope_cache_computes_rope_once_per_graph(ik_engine: Any, tmp_path: Path, tiny_q8: Path) -> None:
    qwen3 = ggufgen.write_tiny_llama(tmp_path / "tiny-qwen3.gguf", dtype="q8_0", arch="qwen3")
    cached = ops_of(ik_engine, qwen3, rope_cache=True)
    plain = ops_of(ik_engine, qwen3, rope_cache=False)
    assert cached.get("ROPE_CACHE", 0) > 0 and cached.get("ROPE_FAST", 0) > 0
    assert "ROPE_CACHE" not in plain and plain["ROPE"] > 0
    # ik builds the cached RoPE for Qwen3, Gemma 3 and DeepSeek only: elsewhere it is refused
    with pytest.raises(InvalidRequestError, match="rope_cache applies to"):
        Llama(tiny_q8, backend=IK, n_ctx=256, rope_cache=True)


def test_attn_max_batch_splits_the_attention(ik_engine: Any, tmp_path: Path) -> None:
    # ik splits plain multi-head attention only (K, V and Q with the same head count)
    mha = ggufgen.write_tiny_llama(tmp_path / "tiny-mha.gguf", dtype="q8_0", n_head=4, n_head_kv=4)
    long_prompt = PROMPT * 12  # a K*Q product of 4 heads x 512 x ~600 floats: about 4 MiB
    whole = ops_of(ik_engine, mha, prompt=long_prompt, max_tokens=1, n_ctx=1024, flash_attn="off")
    split = ops_of(ik_engine, mha, prompt=long_prompt, max_tokens=1, n_ctx=1024, flash_attn="off", attn_max_batch=1)
    assert split["SOFT_MAX"] > whole["SOFT_MAX"]
    # flash attention (ik's default) forms no K*Q product to split: a clear error, not silently nothing
    with pytest.raises(InvalidRequestError, match="attn_max_batch splits attention computed without flash"):
        Llama(mha, backend=IK, n_ctx=256, attn_max_batch=1)


@pytest.fixture(scope="module")
def tiny_q8_wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Heads of 32 values (a quantized KV cache stores 32-value blocks)."""
    return ggufgen.write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny-q8-wide.gguf", dtype="q8_0",
                                    n_embd=128, n_head=4, n_head_kv=2)


def test_a_quantized_cache_on_heads_it_cannot_block_is_refused(backend: str, tiny_q8: Path) -> None:
    # 16-value heads: the engines would abort the process on their own assertion
    with pytest.raises(InvalidRequestError, match="cache_type_k q8_0 stores 32-value blocks"):
        Llama(tiny_q8, backend=backend, n_ctx=256, cache_type_k="q8_0")


def test_k_cache_hadamard_transforms_the_k_cache(ik_engine: Any, tiny_q8_wide: Path) -> None:
    on = ops_of(ik_engine, tiny_q8_wide, cache_type_k="q8_0", k_cache_hadamard=True)
    off = ops_of(ik_engine, tiny_q8_wide, cache_type_k="q8_0")
    assert on.get("HADAMARD", 0) > 0
    assert "HADAMARD" not in off


def test_v_cache_hadamard_needs_flash_attention(ik_engine: Any, tiny_q8: Path, tiny_q8_wide: Path) -> None:
    with pytest.raises(InvalidRequestError, match="v_cache_hadamard needs flash attention"):
        Llama(tiny_q8, backend=IK, n_ctx=256, flash_attn="off", v_cache_hadamard=True)
    on = ops_of(ik_engine, tiny_q8_wide, flash_attn="on", cache_type_v="q8_0", v_cache_hadamard=True)
    assert on.get("HADAMARD", 0) > 0


def test_graph_reuse_keeps_the_answer(ik_engine: Any, tiny_q8: Path) -> None:
    # reuse only skips rebuilding the same decode graph; its effect is speed, the answer is the same
    assert greedy(tiny_q8, graph_reuse=False) == greedy(tiny_q8, graph_reuse=True)


def test_fused_moe_up_gate_fuses_the_experts(ik_engine: Any, tiny_moe: Path) -> None:
    fused = ops_of(ik_engine, tiny_moe, fused_moe_up_gate=True)
    unfused = ops_of(ik_engine, tiny_moe, fused_moe_up_gate=False)
    assert fused.get("MOE_FUSED_UP_GATE", 0) > 0
    assert "MOE_FUSED_UP_GATE" not in unfused
    assert unfused.get("MUL_MAT_ID:q8_0", 0) > fused.get("MUL_MAT_ID:q8_0", 0)


def test_fused_mmad_fuses_the_weighted_sum_of_the_experts(ik_engine: Any, tiny_moe: Path) -> None:
    on = ops_of(ik_engine, tiny_moe, fused_mmad=True)
    off = ops_of(ik_engine, tiny_moe, fused_mmad=False)
    assert on.get("MUL_MULTI_ADD", 0) > 0 and off.get("MUL_MULTI_ADD", 0) == 0
    assert off.get("MUL", 0) > on.get("MUL", 0)  # unfused: the experts' outputs times their weights, then added


def test_merge_up_gate_exps_merges_the_expert_weights(ik_engine: Any, tmp_path: Path, tiny_moe: Path) -> None:
    qwen3moe = ggufgen.write_tiny_llama(tmp_path / "tiny-qwen3moe.gguf", dtype="q8_0", arch="qwen3moe",
                                        n_expert=4, n_expert_used=2)
    _, plain = traced(qwen3moe)
    _, merged = traced(qwen3moe, merge_up_gate_exps=True)
    assert {"blk.0.ffn_up_exps.weight", "blk.0.ffn_gate_exps.weight"} <= plain
    assert "blk.0.ffn_gate_up_exps.weight" in merged and "blk.0.ffn_up_exps.weight" not in merged
    assert greedy(qwen3moe, merge_up_gate_exps=True) == greedy(qwen3moe)  # same weights, one matrix
    # ik's unfused MoE path cannot take a merged matrix; llama's loader never merges
    with pytest.raises(InvalidRequestError, match="needs fused_moe_up_gate"):
        Llama(qwen3moe, backend=IK, n_ctx=256, merge_up_gate_exps=True, fused_moe_up_gate=False)
    with pytest.raises(InvalidRequestError, match="this model is llama"):
        Llama(tiny_moe, backend=IK, n_ctx=256, merge_up_gate_exps=True)


def test_moe_knobs_without_an_effect_are_refused(ik_engine: Any, tiny_q8: Path, tiny_moe: Path) -> None:
    with pytest.raises(InvalidRequestError, match="merge_up_gate_exps applies to mixture-of-experts models"):
        Llama(tiny_q8, backend=IK, n_ctx=256, merge_up_gate_exps=True)
    with pytest.raises(InvalidRequestError, match="grouped_expert_routing applies to bailingmoe2"):
        Llama(tiny_moe, backend=IK, n_ctx=256, grouped_expert_routing=True)
    # smart expert reduction: this ik_llama.cpp version's graph builder no longer calls it
    with pytest.raises(InvalidRequestError, match="min_experts .* has no effect"):
        Llama(tiny_moe, backend=IK, n_ctx=256, min_experts=1, thresh_experts=0.5)


def test_mla_on_a_model_without_latent_attention_is_refused(ik_engine: Any, tiny_q8: Path) -> None:
    with pytest.raises(InvalidRequestError, match="mla applies to models with multi-head latent attention"):
        Llama(tiny_q8, backend=IK, n_ctx=256, mla=2)
    with pytest.raises(InvalidRequestError, match="mla_attn must be 0, 1, 2 or 3"):
        Llama(tiny_q8, backend=IK, n_ctx=256, mla_attn=7)


def iq4_ks_model(path: Path, nan_row: int | None) -> Path:
    """A tiny llama whose blk.0.attn_q.weight is ik's IQ4_KS (the type family validate_quants checks:
    each row starts with its f32 scale), optionally with one row scale set to NaN."""
    rows, row_bytes = 256, 4 + 136  # 256 values a row: one f32 row scale + one 136-byte block
    raw = np.random.default_rng(0).integers(0, 256, size=(rows, row_bytes), dtype=np.uint8)
    raw[:, :4] = np.full((rows, 1), 0.01, dtype=np.float32).view(np.uint8)
    if nan_row is not None:
        raw[nan_row, :4] = np.array([np.nan], dtype=np.float32).view(np.uint8)
    return ggufgen.write_tiny_llama(path, n_embd=256, n_ff=256, dtype="q8_0",
                                    raw_tensors={"blk.0.attn_q.weight": (IQ4_KS, raw)})


def test_validate_quants_rejects_nan_weights(ik_engine: Any, tmp_path: Path) -> None:
    good = iq4_ks_model(tmp_path / "good.gguf", nan_row=None)
    bad = iq4_ks_model(tmp_path / "bad.gguf", nan_row=5)
    with Llama(good, backend=IK, n_ctx=256, n_threads=2, n_parallel=1, validate_quants=True) as llm:
        assert llm.complete("Hi", max_tokens=2, ignore_eos=True).usage.completion_tokens == 2
    with Llama(bad, backend=IK, n_ctx=256, n_threads=2, n_parallel=1):
        pass  # without the check the NaN goes unnoticed at load
    with pytest.raises(EngineError, match="failed to load model from .*: Bad tensors in model"):
        Llama(bad, backend=IK, n_ctx=256, n_threads=2, n_parallel=1, validate_quants=True)


def test_gpu_only_knobs_are_refused_on_a_cpu_build(ik_engine: Any, tiny_q8: Path) -> None:
    if set(ik_engine.backends()) - {"CPU", "RPC"}:
        pytest.skip("this ik_llama.cpp build has a GPU backend")
    for knob in ({"n_cpu_moe": 2}, {"only_active_experts": True}):
        with pytest.raises(InvalidRequestError, match="only matters when layers are offloaded to a GPU"):
            Llama(tiny_q8, backend=IK, n_ctx=256, **knob)


def test_use_thp_needs_reserved_huge_pages(ik_engine: Any, tiny_q8: Path) -> None:
    if ik_options.free_huge_page_bytes() >= tiny_q8.stat().st_size:
        with Llama(tiny_q8, backend=IK, n_ctx=256, n_threads=2, n_parallel=1, use_thp=True) as llm:
            assert llm.complete("Hi", max_tokens=2).usage.completion_tokens == 2
        return
    with pytest.raises(InvalidRequestError, match="reserved huge pages"):
        Llama(tiny_q8, backend=IK, n_ctx=256, use_thp=True)


def test_ik_knobs_are_refused_by_the_llama_cpp_engine(engine: Any, tiny_q8: Path) -> None:
    with pytest.raises(InvalidRequestError, match="repack_tensors is an ik_llama.cpp option"):
        Llama(tiny_q8, n_ctx=256, repack_tensors=True)
    with pytest.raises(InvalidRequestError, match="unknown engine option"):
        Llama(tiny_q8, backend=IK, n_ctx=256, repack_tensor=True)


def test_yaml_options_reach_the_engine(ik_engine: Any, tiny_q8: Path, tmp_path: Path) -> None:
    import trio

    from pylocalai.config.model_config import load_catalog
    from pylocalai.engine.registry import EngineDefaults, ModelRegistry

    (tmp_path / "m.gguf").symlink_to(tiny_q8)
    (tmp_path / "m.yaml").write_text("name: m\nbackend: ik-llama\nparameters: {model: m.gguf}\n"
                                     "options: [rtr, 'fug:false', 'amb:64']\nflash_attention: off\n")
    catalog = load_catalog(tmp_path)
    assert catalog.errors == []
    registry = ModelRegistry(catalog, EngineDefaults(threads=2, context_size=256, parallel=1))

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        async with registry.use(registry.resolve("m")) as entry:
            llm = entry.llm
            assert llm.complete("Hi", max_tokens=2, ignore_eos=True).usage.completion_tokens == 2
            out = dict(llm._model_params), dict(llm._ctx_params)
        await registry.close()
        return out

    model, ctx = trio.run(main)
    assert model["repack_tensors"] is True and model["use_mmap"] is False  # repacking reads into memory
    assert ctx["fused_up_gate"] is False and ctx["attn_max_batch"] == 64


def test_the_chat_parser_writes_no_log_file(ik_engine: Any, tiny_qwen: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # ik's common library logs to ./llama.log by default; a server must not litter its working directory
    monkeypatch.chdir(tmp_path)
    with Llama(tiny_qwen, backend="ik-llama-cpp", n_ctx=512, n_parallel=1, n_threads=2) as llm:
        tools = [{"type": "function", "function": {"name": "get_time", "parameters": {
            "type": "object", "properties": {"tz": {"type": "string"}}}}}]
        rendered = llm.apply_chat_template([{"role": "user", "content": "time?"}], tools=tools)
        for partial in ('<tool_call>\n{"name": "get_ti', '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UT'):
            msg = llm.parse_rendered(partial, rendered, is_partial=True)
            assert isinstance(msg, dict)
    assert list(tmp_path.iterdir()) == []


def test_a_cpu_without_avx2_gets_a_clear_error_not_a_crash(ik_engine: Any, tiny_q8: Path) -> None:
    # PYLOCALAI_HIDE_CPU_FEATURE makes the engine's CPU check see a CPU that lacks the named extension
    code = ("from pylocalai import EngineUnavailableError, Llama\n"
            "from pylocalai.engine.backend import available_engines\n"
            "print('engines', available_engines())\n"
            f"try:\n    Llama({str(tiny_q8)!r}, backend='ik-llama-cpp', n_ctx=256)\n"
            "except EngineUnavailableError as exc:\n    print('error', exc)\n"
            f"with Llama({str(tiny_q8)!r}, n_ctx=256, n_parallel=1) as llm:\n"
            "    print('llama.cpp', llm.complete('Hi', max_tokens=2, ignore_eos=True).usage.completion_tokens)\n")
    env = {**os.environ, "PYLOCALAI_HIDE_CPU_FEATURE": "AVX2"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert "engines ['llama_cpp']" in lines  # ik is listed as unavailable, the other engine still is
    assert any(line.startswith("error the ik_llama_cpp engine cannot run here: ik_llama.cpp needs a CPU with AVX2")
               and line.endswith("this CPU lacks AVX2. Use the llama-cpp backend instead.") for line in lines), run.stdout
    assert "llama.cpp 2" in lines  # the process lives on and serves with the llama.cpp engine


def test_a_quantized_v_cache_needs_flash_attention(ik_engine: Any, tiny_q8_wide: Path) -> None:
    # ik stores V transposed without flash attention, which a quantized V cannot be
    with pytest.raises(InvalidRequestError, match="a quantized V cache needs flash attention"):
        Llama(tiny_q8_wide, backend=IK, n_ctx=256, n_parallel=2, cache_type_v="q8_0", flash_attn="off")
    # flash attention is ik's default, with any number of sequences (patch 0005)
    with Llama(tiny_q8_wide, backend=IK, n_ctx=256, n_parallel=2, n_threads=2, cache_type_v="q8_0") as llm:
        assert llm.complete("Hi", max_tokens=3, ignore_eos=True).usage.completion_tokens == 3


@pytest.fixture(scope="module")
def tiny_head64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Heads of 64 values, which ik's own flash-attention kernels (iqk) take; the 16-value heads of the
    other tiny models go to ggml's generic kernel instead."""
    return ggufgen.write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny-head64.gguf", dtype="q8_0",
                                    n_embd=128, n_head=2, n_head_kv=1)


def test_flash_attention_with_sequences_sharing_the_cache(ik_engine: Any, tiny_head64: Path) -> None:
    """ik's flash-attention kernel took the keys a block of query rows visits from the block's last
    row alone, and from the first key of each key block. With several sequences in ik's one cache a
    row's keys can lie past that row's, or start inside a block: they were dropped, and a row left
    with none ended the process on GGML_ASSERT(S > 0) (a server's second request did it, landing in
    another slot). Patch 0005 checks every row. Prompts processed side by side, and each after other
    slots were filled, now give the answers of a model holding only that sequence."""
    rng = np.random.default_rng(5)
    prompts = [[1, *(int(t) for t in rng.integers(300, 20000, n))] for n in (150, 40, 97, 260)]
    kw: dict[str, Any] = {"n_ctx": 2048, "n_batch": 512, "n_ubatch": 512, "n_threads": 2, "flash_attn": "on"}
    greedy: dict[str, Any] = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True}
    with Llama(tiny_head64, backend=IK, n_parallel=1, **kw) as one:
        alone = [one.complete(p, **greedy).tokens for p in prompts]
    with Llama(tiny_head64, backend=IK, n_parallel=4, **kw) as llm:
        # one after another: each lands in a slot beside the cached ones (the server's crash)
        assert [llm.complete(p, **greedy).tokens for p in prompts] == alone
        assert llm.worker.call(llm.scheduler.drop_idle_caches)  # then all four prompts prefill in one batch
        results: dict[int, tuple[int, ...]] = {}
        barrier = threading.Barrier(len(prompts))

        def work(i: int) -> None:
            barrier.wait()
            results[i] = llm.complete([*prompts[i], 7], **greedy).tokens

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert llm.scheduler.stats.max_seqs_per_step >= 2
    with Llama(tiny_head64, backend=IK, n_parallel=1, **kw) as one:
        assert [results[i] for i in range(len(prompts))] == [one.complete([*p, 7], **greedy).tokens for p in prompts]
