"""pylocalai: a LocalAI-compatible text-generation server and Python API over native llama.cpp engines."""

from __future__ import annotations

from pylocalai.engine.types import FinishReason, SamplingParams, TokenLogprob, Usage
from pylocalai.errors import (
    ContextLengthError,
    EngineError,
    EngineUnavailableError,
    InvalidRequestError,
    ModelNotFoundError,
    PylocalaiError,
)
from pylocalai.model import ChatResult, Chunk, Completion, Llama
from pylocalai.models import default_model_path

__all__ = [
    "ChatResult",
    "Chunk",
    "Completion",
    "ContextLengthError",
    "EngineError",
    "EngineUnavailableError",
    "FinishReason",
    "InvalidRequestError",
    "Llama",
    "ModelNotFoundError",
    "PylocalaiError",
    "SamplingParams",
    "TokenLogprob",
    "Usage",
    "default_model_path",
]
__version__ = "0.1.0"
