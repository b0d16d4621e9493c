"""JSON field readers and SSE framing shared by every protocol module.

Readers raise InvalidRequestError naming the offending field, so each protocol maps them to its own
400 body. No protocol logic lives here, only shapes.
"""

from __future__ import annotations

import json
import math
from typing import Any

from pylocalai.errors import InvalidRequestError

_MISSING: Any = object()


def require_object(body: object, what: str = "request body") -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequestError(f"the {what} must be a JSON object")
    return body


def get_str(obj: dict[str, Any], key: str, default: Any = None, *, required: bool = False, param: str | None = None) -> Any:
    v = obj.get(key, _MISSING)
    if v is _MISSING or v is None:
        if required:
            raise InvalidRequestError(f"'{param or key}' is required", param=param or key)
        return default
    if not isinstance(v, str):
        raise InvalidRequestError(f"'{param or key}' must be a string", param=param or key)
    return v


def get_bool(obj: dict[str, Any], key: str, default: bool | None = None, *, param: str | None = None) -> Any:
    v = obj.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise InvalidRequestError(f"'{param or key}' must be a boolean", param=param or key)
    return v


def get_int(obj: dict[str, Any], key: str, default: Any = None, *, lo: int | None = None, hi: int | None = None,
            param: str | None = None) -> Any:
    v = obj.get(key)
    name = param or key
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or (isinstance(v, float) and not v.is_integer()):
        raise InvalidRequestError(f"'{name}' must be an integer", param=name)
    v = int(v)
    if lo is not None and v < lo:
        raise InvalidRequestError(f"'{name}' must be at least {lo}", param=name)
    if hi is not None and v > hi:
        raise InvalidRequestError(f"'{name}' must be at most {hi}", param=name)
    return v


def get_float(obj: dict[str, Any], key: str, default: Any = None, *, lo: float | None = None, hi: float | None = None,
              param: str | None = None) -> Any:
    v = obj.get(key)
    name = param or key
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise InvalidRequestError(f"'{name}' must be a number", param=name)
    if lo is not None and v < lo:
        raise InvalidRequestError(f"'{name}' must be at least {lo}", param=name)
    if hi is not None and v > hi:
        raise InvalidRequestError(f"'{name}' must be at most {hi}", param=name)
    return float(v)


def get_list(obj: dict[str, Any], key: str, default: Any = None, *, param: str | None = None) -> Any:
    v = obj.get(key)
    if v is None:
        return default
    if not isinstance(v, list):
        raise InvalidRequestError(f"'{param or key}' must be an array", param=param or key)
    return v


def get_stop(obj: dict[str, Any], key: str = "stop") -> tuple[str, ...]:
    v = obj.get(key)
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,) if v else ()
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return tuple(s for s in v if s)
    raise InvalidRequestError(f"'{key}' must be a string or an array of strings", param=key)


def get_logit_bias(obj: dict[str, Any], key: str = "logit_bias") -> tuple[tuple[int, float], ...]:
    v = obj.get(key)
    if v is None:
        return ()
    if not isinstance(v, dict):
        raise InvalidRequestError(f"'{key}' must be an object mapping token ids to biases", param=key)
    out = []
    for tok, bias in v.items():
        try:
            t = int(tok)
        except (TypeError, ValueError):
            raise InvalidRequestError(f"'{key}' keys must be token ids", param=key) from None
        if isinstance(bias, bool) or not isinstance(bias, int | float):
            raise InvalidRequestError(f"'{key}' values must be numbers", param=key)
        out.append((t, float(bias)))
    return tuple(out)


INT32_MAX = 2**31 - 1  # the largest count a 32-bit engine field takes (top_k, repeat_last_n)


def template_value(v: Any) -> Any:
    """A metadata value as a chat template sees it: the strings "true"/"false" (metadata maps hold
    strings) become booleans, so `{"enable_thinking": "false"}` turns thinking off."""
    return {"true": True, "false": False}.get(v, v) if isinstance(v, str) else v


# one encoder for every frame: json.dumps with options builds a new encoder per call
dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def sse_data(obj: Any) -> bytes:
    """One `data:` frame (OpenAI chat/completions style)."""
    return b"data: " + dumps(obj).encode() + b"\n\n"


def sse_event(event: str, obj: Any) -> bytes:
    """An `event:` + `data:` frame (Anthropic, Responses)."""
    return b"event: " + event.encode() + b"\ndata: " + dumps(obj).encode() + b"\n\n"


SLOT = "\x00pylocalai-slot\x00"  # stands for the one string a FrameTemplate fills in
_SLOT_JSON = dumps(SLOT)


class FrameTemplate:
    """An SSE frame whose JSON is fixed but for one string (a streamed text delta: one frame per
    token, the server's hottest path). The fixed bytes are encoded once; each frame then costs one
    string encode, and the bytes are exactly what sse_data / sse_event would give for the same object."""

    __slots__ = ("_head", "_tail")

    def __init__(self, obj: Any, event: str | None = None) -> None:
        text = dumps(obj)
        at = text.index(_SLOT_JSON)
        if text.count(_SLOT_JSON) != 1:
            raise ValueError("a frame template holds SLOT exactly once")
        prefix = b"data: " if event is None else b"event: " + event.encode() + b"\ndata: "
        self._head = prefix + text[:at].encode()
        self._tail = text[at + len(_SLOT_JSON):].encode() + b"\n\n"

    def __call__(self, value: str) -> bytes:
        return self._head + dumps(value).encode() + self._tail


SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
