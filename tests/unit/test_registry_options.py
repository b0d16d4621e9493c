"""Model registry (lazy load once, LRU, idle unload) and the effect of each `options:` entry,
on tiny random-weight models."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import trio

from pylocalai.config.model_config import load_catalog
from pylocalai.engine.registry import EngineDefaults, ModelRegistry
from pylocalai.errors import EngineError, InvalidRequestError

pytestmark = pytest.mark.engine


def make_registry(tmp_path: Path, model: Path, configs: dict[str, dict[str, Any]], **kw: Any) -> ModelRegistry:
    link = tmp_path / "tiny.gguf"
    if not link.exists():
        link.symlink_to(model)
    for name, extra in configs.items():
        (tmp_path / f"{name}.yaml").write_text(json.dumps({"name": name, "parameters": {"model": "tiny.gguf"}, **extra}))
    catalog = load_catalog(tmp_path)
    assert catalog.errors == []
    return ModelRegistry(catalog, EngineDefaults(threads=2, context_size=256, parallel=2), **kw)


def load(reg: ModelRegistry, name: str) -> Any:
    async def main() -> Any:
        async with reg.use(reg.resolve(name)) as entry:
            return entry.llm

    return trio.run(main)


def test_concurrent_first_requests_share_one_load(engine: Any, tiny_llama: Path, tmp_path: Path) -> None:
    reg = make_registry(tmp_path, tiny_llama, {"a": {}})
    calls = []
    real = reg._load_sync

    def counting(cfg: Any) -> Any:
        calls.append(cfg.name)
        return real(cfg)

    reg._load_sync = counting  # type: ignore[method-assign]
    got: list[Any] = []

    async def user() -> None:
        async with reg.use(reg.resolve("a")) as entry:
            got.append(entry.llm)

    async def main() -> None:
        async with trio.open_nursery() as n:
            for _ in range(4):
                n.start_soon(user)
        await reg.close()

    trio.run(main)
    assert calls == ["a"] and len({id(x) for x in got}) == 1


def test_lru_unloads_the_least_recently_used_and_idle_unload(engine: Any, tiny_llama: Path, tmp_path: Path) -> None:
    reg = make_registry(tmp_path, tiny_llama, {"a": {}, "b": {}, "c": {}}, max_loaded=2, idle_unload_s=0.05)

    async def main() -> None:
        for name in ("a", "b", "a", "c"):
            async with reg.use(reg.resolve(name)):
                pass
        assert sorted(reg.loaded()) == ["a", "c"]  # b was least recently used
        await trio.sleep(0.1)
        await reg.unload_idle()
        assert reg.loaded() == []

    trio.run(main)


def test_parallel_and_cont_batching(engine: Any, tiny_llama: Path, tmp_path: Path) -> None:
    reg = make_registry(tmp_path, tiny_llama, {"p3": {"options": ["parallel:3"]}, "serial": {"options": ["parallel:3", "cont_batching:false"]}},
                        max_loaded=3)
    assert load(reg, "p3").scheduler.n_slots == 3
    assert load(reg, "serial").scheduler.n_slots == 1
    trio.run(reg.close)


def test_context_size_is_per_request_and_kv_unified_shares_it(engine: Any, tiny_llama: Path, tmp_path: Path) -> None:
    reg = make_registry(tmp_path, tiny_llama, {"split": {"context_size": 512, "options": ["parallel:2"]},
                                               "unified": {"context_size": 512, "options": ["parallel:2", "kv_unified:true"]}},
                        max_loaded=2)
    split, unified = load(reg, "split"), load(reg, "unified")
    assert split.n_ctx_seq == 512 and split.n_ctx == 1024
    assert unified.n_ctx_seq == 512 and unified.n_ctx == 512
    trio.run(reg.close)


def test_context_shift_lets_generation_pass_the_context(engine: Any, tiny_llama: Path, tmp_path: Path) -> None:
    reg = make_registry(tmp_path, tiny_llama, {"shift": {"context_size": 256, "options": ["context_shift:true"]},
                                               "plain": {"context_size": 256}}, max_loaded=2)
    shift, plain = load(reg, "shift"), load(reg, "plain")
    long = shift.complete("x", max_tokens=400, temperature=0.0, ignore_eos=True)
    assert long.usage.completion_tokens == 400 and shift.scheduler.stats.context_shifts >= 1
    capped = plain.complete("x", max_tokens=400, temperature=0.0, ignore_eos=True)
    assert capped.finish_reason == "length" and capped.usage.completion_tokens < 256
    trio.run(reg.close)


def test_warmup_runs_a_decode_at_load(engine: Any, tiny_llama: Path, tmp_path: Path) -> None:
    reg = make_registry(tmp_path, tiny_llama, {"warm": {}, "cold": {"options": ["warmup:false"]}}, max_loaded=2)
    warm, cold = load(reg, "warm"), load(reg, "cold")
    assert warm.scheduler.stats.steps >= 1 and cold.scheduler.stats.steps == 0
    assert warm.scheduler.stats.requests == 0 and warm.scheduler.stats.tokens_generated == 0  # not a request
    assert warm.scheduler.slot_tokens(0) == ()  # the warm-up leaves no cache behind
    trio.run(reg.close)


def test_slot_prompt_similarity_decides_prefix_reuse(engine: Any, tiny_llama: Path, tmp_path: Path) -> None:
    reg = make_registry(tmp_path, tiny_llama, {"loose": {"options": ["sps:0.1", "warmup:false"]},
                                               "strict": {"options": ["sps:1.0", "warmup:false"]}}, max_loaded=2)
    for name, expect_reuse in (("loose", True), ("strict", False)):
        llm = load(reg, name)
        base = list(range(100, 140))
        llm.complete(base, max_tokens=1, temperature=0.0)
        out = llm.complete([*base[:30], 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], max_tokens=1, temperature=0.0)
        assert (out.usage.cached_tokens > 0) is expect_reuse, name
    trio.run(reg.close)


def test_ctx_checkpoints_option_reaches_the_scheduler(engine: Any, tiny_gemma3: Path, tmp_path: Path) -> None:
    opts = {"context_size": 1024, "batch": 32, "parameters": {"model": "tiny.gguf"}}
    reg = make_registry(tmp_path, tiny_gemma3, {"ckpt": {**opts, "options": ["warmup:false", "parallel:1"]},
                                                "none": {**opts, "options": ["warmup:false", "parallel:1",
                                                                             "ctx_checkpoints:0"]}}, max_loaded=2)
    prompt = list(range(300, 400))  # four prompt chunks of 32 tokens or fewer
    for name, saved in (("ckpt", 4), ("none", 0)):
        llm = load(reg, name)
        llm.complete(prompt, max_tokens=1, temperature=0.0)
        assert llm.scheduler.stats.checkpoints_saved == saved, name
    trio.run(reg.close)


def test_cache_ram_option_reaches_the_scheduler(engine: Any, tiny_llama: Path, tmp_path: Path) -> None:
    opts = {"context_size": 512, "parameters": {"model": "tiny.gguf"}}
    reg = make_registry(tmp_path, tiny_llama, {"ram": {**opts, "options": ["warmup:false", "parallel:1"]},
                                               "none": {**opts, "options": ["warmup:false", "parallel:1",
                                                                            "cache_ram:0"]}}, max_loaded=2)
    for name, saved in (("ram", 1), ("none", 0)):
        llm = load(reg, name)
        llm.complete(list(range(300, 400)), max_tokens=1, temperature=0.0)
        llm.complete(list(range(500, 600)), max_tokens=1, temperature=0.0)  # the slot moves on
        assert llm.scheduler.stats.ram_saved == saved, name
    trio.run(reg.close)


def test_check_tensors_rejects_a_model_with_nan_weights(engine: Any, tiny_llama: Path, tmp_path: Path) -> None:
    from tests.ggufgen import write_tiny_llama

    bad = write_tiny_llama(tmp_path / "nan.gguf", seed=5)
    data = bytearray(bad.read_bytes())
    one = struct.pack("<f", 1.0) * 64  # an all-ones norm vector of width n_embd=64
    at = data.find(one)
    assert at > 0
    data[at : at + 4] = struct.pack("<f", float("nan"))
    bad.write_bytes(bytes(data))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "nan.gguf").symlink_to(bad)
    for name, opts in (("checked", ["check_tensors:true"]), ("unchecked", [])):
        (tmp_path / "models" / f"{name}.yaml").write_text(json.dumps({"name": name, "parameters": {"model": "nan.gguf"}, "options": opts}))
    reg = ModelRegistry(load_catalog(tmp_path / "models"), EngineDefaults(threads=2, context_size=256), max_loaded=2)
    with pytest.raises((EngineError, InvalidRequestError)):
        load(reg, "checked")
    assert load(reg, "unchecked") is not None
    trio.run(reg.close)


def test_rpc_servers_reach_the_engine(engine: Any, tiny_llama: Path, tmp_path: Path) -> None:
    reg = make_registry(tmp_path, tiny_llama, {"rpc": {"options": ["rpc_servers:127.0.0.1:1"]}})
    with pytest.raises(EngineError, match="cannot reach RPC server 127.0.0.1:1"):
        load(reg, "rpc")


def test_use_jinja_overrides_go_templates(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(json.dumps({"name": "m", "parameters": {"model": "m.gguf"},
                                                 "template": {"chat": "{{.Input}}"}, "options": ["use_jinja:true"]}))
    (tmp_path / "g.yaml").write_text(json.dumps({"name": "g", "parameters": {"model": "m.gguf"}, "template": {"chat": "{{.Input}}"}}))
    cat = load_catalog(tmp_path)
    assert cat.configs["m"].uses_jinja and not cat.configs["g"].uses_jinja
