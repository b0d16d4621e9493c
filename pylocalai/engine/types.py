"""The internal contract between the API layers, the scheduler and the engine. Protocol-neutral."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from pylocalai.errors import InvalidRequestError, PylocalaiError


_GRAMMAR_KINDS = {"user": 1, "output_format": 2, "tool_calls": 3}


class FinishReason(enum.Enum):
    STOP = "stop"  # end-of-generation token or a stop string
    LENGTH = "length"  # max_tokens reached, or the context is full
    TOOL_CALLS = "tool_calls"  # set by the chat layer after parsing the output
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling. Defaults follow llama.cpp's server."""

    max_tokens: int | None = None  # None: until end of generation or a full context
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_last_n: int = 64
    seed: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop: tuple[str, ...] = ()
    grammar: str = ""
    # "user": applies from the first generated token; "output_format" / "tool_calls" (made by the chat
    # template layer) start with the template's generation prompt, which the grammar consumes first
    grammar_kind: str = "user"
    generation_prompt: str = ""
    grammar_lazy: bool = False
    grammar_triggers: tuple[tuple[int, str, int], ...] = ()
    preserved_tokens: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; N >= 0: the sampled token's plus N alternatives

    def __post_init__(self) -> None:
        if self.grammar_kind not in _GRAMMAR_KINDS:
            raise InvalidRequestError(f"grammar_kind must be one of {sorted(_GRAMMAR_KINDS)}", param="grammar_kind")

    def engine_dict(self) -> dict[str, object]:
        """The engine's sampling parameters (stop strings and limits are the scheduler's to apply)."""
        return {
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "min_p": self.min_p,
            "typical_p": self.typical_p,
            "repeat_penalty": self.repeat_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repeat_last_n": self.repeat_last_n,
            "seed": self.seed,
            "logit_bias": list(self.logit_bias),
            "grammar": self.grammar,
            "grammar_type": _GRAMMAR_KINDS[self.grammar_kind],
            "generation_prompt": self.generation_prompt,
            "grammar_lazy": self.grammar_lazy,
            "grammar_triggers": list(self.grammar_triggers),
            "preserved_tokens": list(self.preserved_tokens),
            "ignore_eos": self.ignore_eos,
            # the engine always computes the sampled token's logprob when n_probs > 0
            "n_probs": 0 if self.logprobs is None else max(1, self.logprobs),
            "stop": list(self.stop),  # watched only, to end a multi-step run where one appears
        }


@dataclass(frozen=True, slots=True)
class MediaSpan:
    """A media item inside a prompt: prompt_tokens[start:start + length] stand for its embeddings.

    Those entries are placeholders (the same negative id, derived from the item's content, at every
    position), so a slot's prefix cache matches the same image again and never a different one.
    length is the positions the item takes (its token count, except for M-RoPE models).
    """

    start: int
    length: int
    chunk: Any  # the engine's MediaChunk

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """A tokenized generation request, as the scheduler takes it."""

    request_id: str
    prompt_tokens: tuple[int, ...]
    sampling: SamplingParams
    media: tuple[MediaSpan, ...] = ()  # in prompt order


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class TextDelta:
    """New text (complete UTF-8 characters only) and the tokens sampled since the last delta."""

    text: str
    tokens: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Finished:
    reason: FinishReason
    usage: Usage
    stop_sequence: str | None = None  # the stop string that ended generation
    error: PylocalaiError | None = field(default=None, compare=False)


GenerationEvent = TextDelta | Finished
