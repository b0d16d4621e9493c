"""Engine lookup: YAML `backend:` names -> compiled engine modules, and native errors -> PylocalaiError."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from pylocalai.errors import EngineError, EngineUnavailableError, InvalidRequestError

# backend name (as LocalAI's YAML spells it) -> engine module under pylocalai._engines
BACKENDS: dict[str, str] = {
    "llama-cpp": "llama_cpp",
    "llama": "llama_cpp",
    "llama_cpp": "llama_cpp",
    "ik-llama-cpp": "ik_llama_cpp",
    "ik-llama": "ik_llama_cpp",
    "ik_llama": "ik_llama_cpp",
    "ik_llama_cpp": "ik_llama_cpp",
}

DEFAULT_BACKEND = "llama-cpp"


def engine_key(backend: str | None) -> str:
    name = (backend or DEFAULT_BACKEND).strip().lower()
    try:
        return BACKENDS[name]
    except KeyError:
        known = ", ".join(sorted(BACKENDS))
        raise InvalidRequestError(f"unknown backend {backend!r}; known: {known}", param="backend") from None


def load_engine(backend: str | None = None) -> ModuleType:
    """The compiled module for a backend; a clear error when this install did not build it."""
    key = engine_key(backend)
    try:
        return importlib.import_module(f"pylocalai._engines.{key}")
    except ModuleNotFoundError as exc:
        raise EngineUnavailableError(
            f"the {key} engine is not built into this install ({exc}); "
            f"rebuild with PYLOCALAI_ENGINES including {key}"
        ) from exc
    except ImportError as exc:  # built, but refuses this machine (e.g. ik_llama.cpp without AVX2)
        raise EngineUnavailableError(f"the {key} engine cannot run here: {exc}") from exc


HOST_BACKENDS = frozenset({"CPU", "RPC", "BLAS"})  # ggml backends that are not a GPU (RPC: see rpc_servers)


def has_gpu(engine: ModuleType) -> bool:
    """Whether an engine module was built with a GPU backend (CUDA, HIP, Vulkan, ...)."""
    return bool(set(engine.backends()) - HOST_BACKENDS)


def available_engines() -> list[str]:
    out = []
    for key in sorted(set(BACKENDS.values())):
        try:
            importlib.import_module(f"pylocalai._engines.{key}")
        except ImportError:
            continue
        out.append(key)
    return out


@contextmanager
def map_engine_errors(param: str | None = None) -> Iterator[None]:
    """C++ std::invalid_argument (ValueError) is the caller's fault; anything else native is ours."""
    try:
        yield
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param=param) from exc
    except RuntimeError as exc:
        raise EngineError(str(exc)) from exc
