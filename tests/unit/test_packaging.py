"""The built extension: symbol isolation, built-in backends, the engine registry and the CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from pylocalai.engine.backend import available_engines, engine_key, load_engine
from pylocalai.errors import EngineUnavailableError, InvalidRequestError
from tests.conftest import _missing

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.engine
def test_extension_exports_only_its_init_function(backend: str) -> None:
    nm = shutil.which("nm")
    if nm is None:
        _missing("binutils' nm is not installed (it lists the extensions' exported symbols)")
    module = load_engine(backend)
    key = engine_key(backend)
    out = subprocess.run([nm, "-D", "--defined-only", module.__file__], capture_output=True, text=True, check=True).stdout
    exported = [line.split()[-1] for line in out.splitlines() if line.split()[1:2] in (["T"], ["D"], ["B"], ["W"], ["V"], ["i"], ["u"])]
    # ggml/llama symbols stay hidden, so a second engine module can never bind to this one's
    assert f"PyInit_{key}" in exported
    assert not [s for s in exported if s.startswith(("llama_", "ggml_", "gguf_", "common_", "iqk_"))]


@pytest.mark.engine
def test_both_engines_run_in_one_process(engine: Any, ik_engine: Any, tiny_llama: Path) -> None:
    from pylocalai import Llama

    assert {"llama_cpp", "ik_llama_cpp"} <= set(available_engines())
    with Llama(tiny_llama, n_ctx=256, n_parallel=1, n_threads=2) as up, \
            Llama(tiny_llama, backend="ik-llama-cpp", n_ctx=256, n_parallel=1, n_threads=2) as ik:
        # each engine has its own ggml: same model, same tokenizer, both generating side by side
        assert up.tokenize("Hello world") == ik.tokenize("Hello world")
        a = up.complete("Hello", max_tokens=6, temperature=0.0, ignore_eos=True)
        b = ik.complete("Hello", max_tokens=6, temperature=0.0, ignore_eos=True)
        assert a.usage.completion_tokens == b.usage.completion_tokens == 6
    assert "AVX2" in ik_engine.system_info() or "NEON" in ik_engine.system_info()


def _openmp_settings(key: str, **env: str) -> dict[str, str]:
    """libgomp's settings as a process sees them after importing the engine `key` (its own report:
    what it read from the environment when it loaded), with only `env` of the OpenMP variables set."""
    code = (f"import ctypes, sys, pylocalai._engines.{key}\n"
            "if 'libgomp' not in open('/proc/self/maps').read(): sys.exit(3)\n"
            "ctypes.CDLL('libgomp.so.1').omp_display_env(1)\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env}, timeout=120,
                          check=False)
    if proc.returncode == 3:
        pytest.skip(f"the {key} engine is built without OpenMP (GGML_OPENMP=OFF)")
    assert proc.returncode == 0, proc.stderr
    settings = {}
    for line in proc.stderr.splitlines():
        name, sep, value = line.strip().partition(" = ")
        if sep:
            settings[name] = value.strip("'")
    return settings


@pytest.mark.engine
def test_openmp_threads_keep_spinning_when_threads_outnumber_cpus(backend: str) -> None:
    # Without these, libgomp's barriers sleep at once when a second thread has computed (an
    # embedding, a second model) and decode runs about three times slower (pylocalai/_engines).
    settings = _openmp_settings(engine_key(backend))
    assert settings["OMP_WAIT_POLICY"] == "ACTIVE"
    assert settings["GOMP_SPINCOUNT"] == "300000"  # libgomp's usual spin: idle threads still go to sleep


@pytest.mark.engine
def test_an_openmp_wait_policy_the_user_set_wins(engine: Any) -> None:
    settings = _openmp_settings("llama_cpp", OMP_WAIT_POLICY="passive")
    assert settings["OMP_WAIT_POLICY"] == "PASSIVE"
    assert settings["GOMP_SPINCOUNT"] == "0"  # passive's own: no default of ours on top
    assert _openmp_settings("llama_cpp", GOMP_SPINCOUNT="5000")["GOMP_SPINCOUNT"] == "5000"


def _threads_now() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.engine
def test_a_thread_that_computed_an_embedding_keeps_no_openmp_workers(engine: Any, tiny_llama: Path) -> None:
    # libgomp keeps a team of workers for every thread that computed; one beyond the engine thread's
    # made the process hold more OpenMP threads than CPUs, which shortens every barrier's spin
    if "libgomp" not in Path("/proc/self/maps").read_text():
        pytest.skip("the engine is built without OpenMP (GGML_OPENMP=OFF)")
    from pylocalai import Llama

    with Llama(tiny_llama, n_ctx=256, n_parallel=1, n_threads=2) as llm:
        llm.complete("Hello", max_tokens=2, temperature=0.0)  # the engine thread's team exists now
        before = _threads_now()
        seen: dict[str, Any] = {}
        computed, finish = threading.Event(), threading.Event()

        def other() -> None:
            try:
                seen["vector"] = llm.embed("an embedding computed on this thread")
                seen["threads"] = _threads_now()
            finally:
                computed.set()
                finish.wait(60)

        t = threading.Thread(target=other)
        t.start()
        try:
            assert computed.wait(60)
            assert seen["vector"].shape == (1, llm.info["n_embd"])
            assert seen["threads"] == before + 1  # the thread itself, none of its 2-thread team's workers
        finally:
            finish.set()
            t.join()
        assert llm.complete("Hello", max_tokens=2, temperature=0.0).usage.completion_tokens == 2


@pytest.mark.engine
def test_rpc_backend_and_cpu_features_are_built_in(engine: Any) -> None:
    assert "AVX" in engine.system_info() or "NEON" in engine.system_info()
    assert "f16" in engine.cache_type_names() and "q8_0" in engine.cache_type_names()
    assert {"CPU", "RPC"} <= set(engine.backends())
    # an unreachable RPC server is a clean error, not a process abort inside ggml
    from pylocalai import EngineError, Llama

    with pytest.raises(EngineError, match="cannot reach RPC server 127.0.0.1:1"):
        Llama(__file__, rpc_servers=["127.0.0.1:1"])
    with pytest.raises(InvalidRequestError, match="host:port"):
        Llama(__file__, rpc_servers=["nohost"])


def test_backend_names() -> None:
    assert engine_key("llama-cpp") == engine_key("llama") == "llama_cpp"
    assert engine_key("ik-llama-cpp") == engine_key("ik-llama") == engine_key("IK_LLAMA") == "ik_llama_cpp"
    with pytest.raises(InvalidRequestError, match="unknown backend"):
        engine_key("nope")


@pytest.mark.engine
def test_load_engine(engine: Any) -> None:
    assert load_engine("llama-cpp") is engine
    assert "llama_cpp" in available_engines()


def test_missing_engine_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    real = importlib.import_module

    def fake(name: str, *a: Any) -> Any:
        if name.startswith("pylocalai._engines."):
            raise ModuleNotFoundError("not built")
        return real(name, *a)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(EngineUnavailableError, match="PYLOCALAI_ENGINES"):
        load_engine("llama-cpp")


@pytest.mark.engine
def test_cli_run_streams_a_completion(engine: Any, tiny_llama: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "pylocalai.cli", "run", str(tiny_llama), "Hello", "-n", "5", "--temperature", "0", "-v"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "5 generated tokens" in proc.stderr
    assert proc.stdout.strip()


def test_cli_reports_a_missing_model() -> None:
    proc = subprocess.run([sys.executable, "-m", "pylocalai.cli", "run", "/nonexistent.gguf", "x"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2
    assert "model file not found" in proc.stderr
