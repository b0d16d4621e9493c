"""Shared fixtures: tiny random-weight GGUFs made at test time, the real SmolLM2 model, the built engine.

Tests that need a built engine or the real model skip with the reason when those are missing. CI
sets PYLOCALAI_REQUIRE_ALL=1, which turns every such skip into a failure, so CI runs them all.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import ggufgen

REQUIRE_ALL = os.environ.get("PYLOCALAI_REQUIRE_ALL", "") not in ("", "0")


def _missing(reason: str) -> None:
    if REQUIRE_ALL:
        pytest.fail(f"PYLOCALAI_REQUIRE_ALL is set but {reason}")
    pytest.skip(reason, allow_module_level=True)


def bench_module(name: str) -> Any:
    """A script of bench/ (engine_bench, server_bench) imported as a module, for its tests."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "bench" / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, mod)
    spec.loader.exec_module(mod)
    return mod


def import_or_missing(name: str) -> Any:
    """A test dependency (an SDK, pytest-benchmark, matplotlib): skipped without it, but a failure
    under PYLOCALAI_REQUIRE_ALL, as CI runs every test."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        _missing(f"the {name} package is not installed ({exc}); `scripts/bootstrap.sh --test` installs it")


# the engines every engine-level test runs against: backend name -> extension module
ENGINES = {"llama-cpp": "llama_cpp", "ik-llama-cpp": "ik_llama_cpp"}


def _engine_module(key: str) -> Any:
    try:
        return importlib.import_module(f"pylocalai._engines.{key}")
    except ImportError as exc:
        _missing(f"the {key} engine extension is not built ({exc}); run `pip install .` "
                 f"with {key} in PYLOCALAI_ENGINES (the default builds both)")
        raise


@pytest.fixture(scope="session")
def engine() -> Any:
    return _engine_module("llama_cpp")


@pytest.fixture(scope="session")
def ik_engine() -> Any:
    return _engine_module("ik_llama_cpp")


@pytest.fixture(scope="session", params=list(ENGINES))
def backend(request: pytest.FixtureRequest) -> str:
    """Each engine in turn (tests using it run once per engine); skips or fails when one is not built."""
    _engine_module(ENGINES[request.param])
    return str(request.param)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ggufgen.write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def tiny_mmproj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA-style projector for tiny_llama: 4 image tokens per image."""
    return ggufgen.write_tiny_mmproj(tmp_path_factory.mktemp("gguf") / "tiny-mmproj.gguf")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama with Qwen2's BPE vocab, whose ChatML markers are single special tokens."""
    vocab = ggufgen.ROOT / "third_party" / "llama.cpp" / "models" / "ggml-vocab-qwen2.gguf"
    return ggufgen.write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny-qwen.gguf", vocab_path=vocab)


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ggufgen.write_tiny_gemma3(tmp_path_factory.mktemp("gguf") / "tiny-gemma3.gguf")


@pytest.fixture(scope="session")
def tiny_rwkv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ggufgen.write_tiny_rwkv6(tmp_path_factory.mktemp("gguf") / "tiny-rwkv6.gguf")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from pylocalai.errors import ModelNotFoundError
    from pylocalai.models import default_model_path

    env = os.environ.get("PYLOCALAI_TEST_MODEL")
    if env:
        return Path(env)
    try:
        return default_model_path()
    except ModelNotFoundError as exc:
        _missing(f"the real test model is missing: {exc}")
        raise


def _engine_tool(engine: Any, name: str, key: str = "llama_cpp") -> Path:
    """One of the fork's own programs (llama-simple, llama-server, llama-bench), built from the same
    tree as its engine."""
    path = Path(engine.__file__).parent / "bin" / key / name
    if not path.is_file():
        _missing(f"{path} is missing; build with PYLOCALAI_BUILD_TOOLS=ON (the default)")
    return path


@pytest.fixture(scope="session")
def llama_simple(backend: str) -> Path:
    """The engine's own llama-simple (the greedy reference), per engine."""
    key = ENGINES[backend]
    return _engine_tool(_engine_module(key), "llama-simple", key)


@pytest.fixture(scope="session")
def llama_server(engine: Any) -> Path:
    """llama.cpp's own llama-server (the server benchmark's reference)."""
    return _engine_tool(engine, "llama-server")


@pytest.fixture(scope="session")
def smollm2(backend: str, smollm2_path: Path) -> Iterator[Any]:
    """SmolLM2 on each engine in turn."""
    from pylocalai import Llama

    llm = Llama(smollm2_path, backend=backend, n_ctx=2048, n_parallel=4, n_threads=2)
    yield llm
    llm.close()
