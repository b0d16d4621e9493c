"""The engine benchmark's references run and parse: each fork's llama-batched-bench, built from the
same tree, on the tiny model. This keeps bench/engine_bench.py's batched-decode column working; it
asserts no speed (speed targets live in bench/, measured side by side)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ENGINES, _engine_module, _engine_tool, bench_module


def _engine_bench() -> ModuleType:
    return bench_module("engine_bench")


# One compute thread: llama.cpp's tools print through a background logging thread that exits with
# them unflushed, and with two compute threads spinning on a 2-core machine it may never have run
# in the few milliseconds a tiny-model run takes (measured: output lost in 2-4 of 12 runs with -t 2,
# none with -t 1). Real benchmark runs last seconds.
THREADS = 1


def test_batched_bench_reference_parses(backend: str, tiny_llama: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    key = ENGINES[backend]
    _engine_tool(_engine_module(key), "llama-batched-bench", key)  # skips with the reason when not built
    eb = _engine_bench()
    monkeypatch.chdir(tmp_path)
    speeds = eb.batched_bench(key, tiny_llama, THREADS, 4, [1, 2, 3], 256)
    # the tool leaves nothing in the caller's directory (ik's build writes ./llama.log)
    assert list(tmp_path.iterdir()) == []
    # one S_TG figure per sequence count asked for, each a real rate
    assert sorted(speeds) == [1, 2, 3]
    assert all(math.isfinite(v) and v > 0 for v in speeds.values()), speeds


def test_batched_bench_reports_missing_rows(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tool output without the table (e.g. a fork that changed its format) is an error naming the
    missing sequence counts, not a silently empty column."""
    eb = _engine_bench()

    class Done:
        stdout = "llama_batched_bench: n_kv_max = 256\n"
        stderr = ""

    monkeypatch.setattr(eb, "tool_path", lambda engine, name: Path(name))
    monkeypatch.setattr(eb.subprocess, "run", lambda *a, **k: Done())
    with pytest.raises(RuntimeError, match=r"no row for \[1, 4\]"):
        eb.batched_bench("llama_cpp", tiny_llama, 2, 4, [1, 4], 256)


def test_engine_bench_smoke_run(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """The whole engine benchmark, shrunk to one repeat on the tiny model: pylocalai's own side (prefill,
    single-stream and batched decode through the Python API) and both references run, on every built
    engine, and the result file holds a finite figure and ratio for each."""
    for key in ENGINES.values():
        for tool in ("llama-bench", "llama-batched-bench"):
            _engine_tool(_engine_module(key), tool, key)  # skips with the reason when not built
    eb = _engine_bench()
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "engine.json"
    assert eb.main(["--model", str(tiny_llama), "--threads", str(THREADS), "--repeats", "2", "--n-prompt", "16",
                    "--n-gen", "4", "--concurrency", "1", "2", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    (res,) = doc["results"]
    assert sorted(res["engines"]) == sorted(ENGINES.values())
    for r in res["engines"].values():
        for side in ("llama_bench", "pylocalai"):
            for key in ("pp", "tg", "tg_beside_another_thread", "tg_whole")[: 4 if side == "pylocalai" else 2]:
                s = r[side][key]
                assert s["n"] == 2 and 0 < s["min"] <= s["median"] <= s["max"] < math.inf, (side, key, s)
                assert len(s["values"]) == 2 and min(s["values"]) == s["min"]
        assert sorted(r["pylocalai"]["aggregate"]) == ["1", "2"] == sorted(r["llama_batched_bench"]["aggregate"])
        assert all(v["n"] == 2 and v["min"] > 0 for v in r["pylocalai"]["aggregate"].values())
        for name in ("pp", "tg", "pp_paired", "tg_paired", "tg_whole_paired", "tg_beside_another_thread", "aggregate_2_vs_single", "aggregate_2_vs_batched_bench", "batched_bench_2_vs_1"):
            assert math.isfinite(r["ratios"][name]) and r["ratios"][name] > 0, name
    assert set(res["ik_vs_llama_cpp"]) == {"pp", "tg"}
    # the engines alternate: A then B in the first repeat, B then A in the second
    order = [line.split("[")[1].split("]")[0] for line in capsys.readouterr().err.splitlines() if "] repeat " in line]
    assert order == ["llama_cpp", "ik_llama_cpp", "ik_llama_cpp", "llama_cpp"]


def test_host_bound_model_is_written_once_and_is_the_size_it_promises(backend: str, tmp_path: Path) -> None:
    """`--model host-bound` (the GPU-like regime on a CPU): a 4-layer, 256-wide llama with a
    32,000-token vocabulary, written once and then reused as it is."""
    from pylocalai import Llama

    eb = _engine_bench()
    path = eb.host_bound_model(tmp_path)
    assert path.parent == tmp_path and path.suffix == ".gguf"
    stamp = path.stat().st_mtime_ns
    assert eb.host_bound_model(tmp_path) == path and path.stat().st_mtime_ns == stamp  # not written again
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    with Llama(path, backend=backend, n_ctx=256, n_threads=1) as llm:
        assert (llm.info["n_layer"], llm.info["n_vocab"]) == (4, 32000)
        assert llm.info["n_params"] > 32000 * 256 * 2  # both vocabulary matrices, and the layers
        assert len(llm.complete([1, 2, 3], max_tokens=4, temperature=0.0, ignore_eos=True).tokens) == 4
