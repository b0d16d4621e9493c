"""Anthropic Messages API: /v1/messages (stream and non-stream) and /v1/messages/count_tokens."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import trio
from quart import Blueprint, Response
from werkzeug.exceptions import HTTPException

from pylocalai.api.serving import (
    PreparedChat,
    collect,
    generation,
    held,
    prepare_chat,
    read_json,
    registry,
    resolve_model,
    sampling_for,
)
from pylocalai.api.wire import (
    INT32_MAX,
    SLOT,
    FrameTemplate,
    get_bool,
    get_float,
    get_int,
    get_list,
    get_str,
    sse_event,
    template_value,
)
from pylocalai.engine.chat import AnswerStream, parse_answer
from pylocalai.engine.media import MEDIA_MARKER, MediaRef
from pylocalai.engine.registry import LoadedModel
from pylocalai.engine.types import Finished, FinishReason, TextDelta
from pylocalai.errors import ErrorKind, InvalidRequestError, PylocalaiError

log = logging.getLogger(__name__)
bp = Blueprint("anthropic", __name__)

_ERROR = {
    ErrorKind.INVALID_REQUEST: (400, "invalid_request_error"),
    ErrorKind.CONTEXT_LENGTH: (400, "invalid_request_error"),
    ErrorKind.AUTHENTICATION: (401, "authentication_error"),
    ErrorKind.PERMISSION: (403, "permission_error"),
    ErrorKind.MODEL_NOT_FOUND: (404, "not_found_error"),
    ErrorKind.NOT_FOUND: (404, "not_found_error"),
    ErrorKind.OVERLOADED: (529, "overloaded_error"),
    ErrorKind.INTERNAL: (500, "api_error"),
}


def error_body(exc: PylocalaiError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": _ERROR[exc.kind][1], "message": exc.message}}


@bp.errorhandler(PylocalaiError)
async def _error(exc: PylocalaiError) -> tuple[dict[str, Any], int]:
    if exc.kind is ErrorKind.INTERNAL:
        log.error("request failed: %s", exc, exc_info=exc)
    return error_body(exc), _ERROR[exc.kind][0]


@bp.errorhandler(HTTPException)
async def _http_error(exc: HTTPException) -> tuple[dict[str, Any], int]:
    status = exc.code or 500
    return {"type": "error", "error": {"type": "invalid_request_error" if status < 500 else "api_error",
                                       "message": exc.description or exc.name}}, status


# ---------------------------------------------------------------- request parsing


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, b in enumerate(content):
            if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
                raise InvalidRequestError(f"{where}[{i}] must be a text block", param=f"{where}[{i}]")
            parts.append(b["text"])
        return "".join(parts)
    raise InvalidRequestError(f"{where} must be a string or an array of text blocks", param=where)


def _image_block(block: dict[str, Any], where: str) -> MediaRef:
    """An image block's source: {"type": "base64", "media_type", "data"} or {"type": "url", "url"}."""
    src = block.get("source")
    kind = src.get("type") if isinstance(src, dict) else None
    if kind == "base64" and isinstance(src.get("data"), str):
        media_type = src.get("media_type") if isinstance(src.get("media_type"), str) else "image/png"
        return MediaRef("image", f"data:{media_type};base64,{src['data']}", f"{where}.source.data")  # decoded off the event loop
    if kind == "url" and isinstance(src.get("url"), str):
        return MediaRef("image", src["url"], where)
    raise InvalidRequestError("an image block needs source {type: base64, media_type, data} or {type: url, url}",
                              param=f"{where}.source")


def parse_messages(value: Any, system: Any) -> list[dict[str, Any]]:
    """Anthropic messages -> the OpenAI-shaped messages the chat layer renders. Tool results become
    real tool messages (the template renders them as such), tool_use blocks assistant tool calls."""
    if not isinstance(value, list) or not value:
        raise InvalidRequestError("'messages' must be a non-empty array", param="messages")
    out: list[dict[str, Any]] = []
    if system is not None:
        out.append({"role": "system", "content": _text_of(system, "system")})
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise InvalidRequestError(f"{where}.role must be 'user' or 'assistant'", param=f"{where}.role")
        role, content = m["role"], m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise InvalidRequestError(f"{where}.content must be a string or an array of blocks", param=f"{where}.content")
        if not content and role == "user":
            raise InvalidRequestError(f"{where}.content must not be empty", param=f"{where}.content")
        text, calls, thinking = [], [], []
        media: list[MediaRef] = []
        for j, b in enumerate(content):
            bw = f"{where}.content[{j}]"
            kind = b.get("type") if isinstance(b, dict) else None
            if kind == "text" and isinstance(b.get("text"), str):
                text.append(b["text"])
            elif kind == "image":
                text.append(MEDIA_MARKER)
                media.append(_image_block(b, bw))
            elif kind == "tool_use" and role == "assistant" and isinstance(b.get("name"), str):
                calls.append({"id": str(b.get("id") or f"toolu_{j}"), "type": "function",
                              "function": {"name": b["name"], "arguments": json.dumps(b.get("input") or {})}})
            elif kind == "tool_result" and role == "user":
                res = b.get("content", "")
                res_media: list[MediaRef] = []
                if isinstance(res, list):
                    blocks = []
                    for k, x in enumerate(res):
                        if isinstance(x, dict) and x.get("type") == "image":
                            res_media.append(_image_block(x, f"{bw}.content[{k}]"))
                            blocks.append({"type": "text", "text": MEDIA_MARKER})
                        else:
                            blocks.append(x)
                    res = blocks
                res_text = _text_of(res, f"{bw}.content")
                tool_msg: dict[str, Any] = {"role": "tool", "tool_call_id": str(b.get("tool_use_id") or ""),
                                            "content": ("Error: " + res_text) if b.get("is_error") else res_text}
                if res_media:
                    tool_msg["media"] = res_media
                out.append(tool_msg)
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                thinking.append(str(b.get("thinking") or ""))
            else:
                raise InvalidRequestError(f"{bw}: unsupported or malformed content block {kind!r}", param=bw)
        if text or calls or thinking or role == "assistant":
            msg: dict[str, Any] = {"role": role, "content": "".join(text)}
            if media:
                msg["media"] = media
            if calls:
                msg["tool_calls"] = calls
            if thinking:
                msg["reasoning_content"] = "".join(thinking)
            out.append(msg)
    return out


def parse_tools(body: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, Any]:
    tools = get_list(body, "tools")
    converted = None
    if tools is not None:
        converted = []
        for i, t in enumerate(tools):
            if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
                raise InvalidRequestError(f"tools[{i}] needs a name", param=f"tools[{i}]")
            schema = t.get("input_schema") or {"type": "object", "properties": {}}
            if not isinstance(schema, dict):
                raise InvalidRequestError(f"tools[{i}].input_schema must be a JSON schema", param=f"tools[{i}].input_schema")
            converted.append({"type": "function", "function": {"name": t["name"], "description": t.get("description") or "",
                                                               "parameters": schema}})
    tc = body.get("tool_choice", "auto")
    kind = tc.get("type") if isinstance(tc, dict) else tc
    if kind in ("auto", None):
        return converted, "auto"
    if kind == "any":
        return converted, "required"
    if kind == "none":
        return converted, "none"
    if kind == "tool" and isinstance(tc, dict) and isinstance(tc.get("name"), str):
        return converted, {"type": "function", "function": {"name": tc["name"]}}
    raise InvalidRequestError("'tool_choice' must be auto, any, none or {'type': 'tool', 'name': ...}", param="tool_choice")


class MessagesCall:
    def __init__(self, body: dict[str, Any], *, count_only: bool = False) -> None:
        self.body = body
        self.cfg = resolve_model(body, "chat")
        if not count_only:
            max_tokens = body.get("max_tokens")
            if max_tokens is None:
                raise InvalidRequestError("'max_tokens' is required", param="max_tokens")
            self.max_tokens = get_int(body, "max_tokens", lo=0)
        # max_tokens 0 only warms the prompt cache (as Anthropic documents it): the prompt is evaluated
        # (one token is sampled and dropped) and the answer has no content
        self.warm_only = not count_only and self.max_tokens == 0
        self.messages = parse_messages(body.get("messages"), body.get("system"))
        self.tools, self.tool_choice = parse_tools(body)
        stops = body.get("stop_sequences")
        if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)):
            raise InvalidRequestError("'stop_sequences' must be an array of strings", param="stop_sequences")
        self.stop_sequences = tuple(s for s in stops or [] if s)
        thinking = body.get("thinking")
        if thinking is not None and (not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled", "adaptive")):
            raise InvalidRequestError("'thinking.type' must be enabled or disabled", param="thinking")
        self.thinking = isinstance(thinking, dict) and thinking.get("type") != "disabled"
        meta = body.get("metadata")
        if meta is not None and not isinstance(meta, dict):
            raise InvalidRequestError("'metadata' must be an object", param="metadata")
        # metadata keys reach the chat template, as on chat completions
        self.template_kwargs = {str(k): template_value(v) for k, v in (meta or {}).items() if k != "user_id"}
        if thinking is not None:
            self.template_kwargs.setdefault("enable_thinking", self.thinking)
        self.stream = bool(get_bool(body, "stream", False))
        fields = {} if count_only else {
            "max_tokens": max(1, self.max_tokens),
            "temperature": get_float(body, "temperature", lo=0.0, hi=1.0),  # Anthropic's range
            "top_p": get_float(body, "top_p", lo=0.0, hi=1.0),
            "top_k": get_int(body, "top_k", lo=0, hi=INT32_MAX),
            "ignore_eos": get_bool(body, "ignore_eos"),  # llama.cpp extension, as on the other endpoints
        }
        self.grammar = get_str(body, "grammar", "")  # LocalAI extension (GBNF), as on chat completions
        self.sampling = sampling_for(self.cfg, fields, self.stop_sequences)
        self.id = "msg_" + uuid.uuid4().hex
        self.model = body.get("model") or self.cfg.name

    async def prepare(self, entry: LoadedModel) -> PreparedChat:
        tc = self.body.get("tool_choice")
        parallel = not (isinstance(tc, dict) and tc.get("disable_parallel_tool_use"))
        return await prepare_chat(entry, self.messages, self.sampling, tools=self.tools, tool_choice=self.tool_choice,
                                  parallel_tool_calls=parallel, json_schema=None,
                                  enable_thinking=self.template_kwargs.get("enable_thinking", True) is not False,
                                  template_kwargs=self.template_kwargs, grammar=self.grammar, continue_final=True)

    def warmed(self, n_prompt: int, n_cached: int) -> dict[str, Any]:
        """The answer to max_tokens 0: no content, stopped by the token limit."""
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                "stop_reason": "max_tokens", "stop_sequence": None,
                "usage": {"input_tokens": n_prompt, "output_tokens": 0, "cache_read_input_tokens": n_cached}}

    def stop_reason(self, fin: Finished, has_calls: bool) -> tuple[str, str | None]:
        if has_calls and fin.reason is FinishReason.STOP:
            return "tool_use", None
        if fin.reason is FinishReason.LENGTH:
            return "max_tokens", None
        if fin.stop_sequence is not None and fin.stop_sequence in self.stop_sequences:
            return "stop_sequence", fin.stop_sequence
        return "end_turn", None


def _tool_input(arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return {"raw": arguments}
    return value if isinstance(value, dict) else {"raw": arguments}


def _tool_id(call_id: str) -> str:
    return call_id if call_id.startswith("toolu_") else "toolu_" + call_id.removeprefix("call_")


# ---------------------------------------------------------------- routes


@bp.post("/v1/messages")
@bp.post("/messages")
async def create_message() -> Response | tuple[Any, int]:
    call = MessagesCall(await read_json())
    async with registry().use(call.cfg) as entry:
        prep = await call.prepare(entry)
        entry.llm.scheduler.check(prep.request)  # a too-long prompt is a 400 even when streaming
        if call.stream:
            return Response(held(call.cfg, _stream(call, entry, prep)), headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})  # type: ignore[arg-type]
        text, fin, _ = await collect(entry, prep.request)
        if call.warm_only:
            return call.warmed(fin.usage.prompt_tokens, fin.usage.cached_tokens), 200
        msg = await trio.to_thread.run_sync(lambda: parse_answer(entry.llm, prep.plan, text))
    calls = msg.get("tool_calls") or []
    content: list[dict[str, Any]] = []
    if call.thinking and msg.get("reasoning_content"):
        content.append({"type": "thinking", "thinking": msg["reasoning_content"], "signature": ""})
    if msg.get("content") or not calls:
        content.append({"type": "text", "text": msg.get("content") or ""})
    for c in calls:
        content.append({"type": "tool_use", "id": _tool_id(c["id"]), "name": c["function"]["name"],
                        "input": _tool_input(c["function"]["arguments"])})
    stop_reason, stop_sequence = call.stop_reason(fin, bool(calls))
    return {"id": call.id, "type": "message", "role": "assistant", "model": call.model, "content": content,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": {"input_tokens": fin.usage.prompt_tokens, "output_tokens": fin.usage.completion_tokens,
                      "cache_read_input_tokens": fin.usage.cached_tokens}}, 200


@bp.post("/v1/messages/count_tokens")
@bp.post("/messages/count_tokens")
async def count_tokens() -> tuple[Any, int]:
    call = MessagesCall(await read_json(), count_only=True)
    async with registry().use(call.cfg) as entry:
        prep = await call.prepare(entry)
    return {"input_tokens": len(prep.request.prompt_tokens)}, 200


async def _stream(call: MessagesCall, entry: LoadedModel, prep: PreparedChat) -> AsyncIterator[bytes]:
    """message_start, then blocks (thinking, text, tool_use) each start/delta*/stop, message_delta, message_stop."""
    n_prompt = len(prep.request.prompt_tokens)
    yield sse_event("message_start", {"type": "message_start", "message": {
        "id": call.id, "type": "message", "role": "assistant", "model": call.model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": n_prompt, "output_tokens": 0}}})
    answer = AnswerStream(entry.llm, prep.plan)
    index = -1
    open_kind: str | None = None
    open_call = -1

    def start(kind: str, block: dict[str, Any]) -> list[bytes]:
        nonlocal index, open_kind
        frames = stop()
        index += 1
        open_kind = kind
        frames.append(sse_event("content_block_start", {"type": "content_block_start", "index": index, "content_block": block}))
        return frames

    def stop() -> list[bytes]:
        nonlocal open_kind
        if open_kind is None:
            return []
        frames = []
        if open_kind == "thinking":
            frames.append(sse_event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                            "delta": {"type": "signature_delta", "signature": ""}}))
        frames.append(sse_event("content_block_stop", {"type": "content_block_stop", "index": index}))
        open_kind = None
        return frames

    text_delta: dict[int, FrameTemplate] = {}

    def frames_for(d: Any) -> list[bytes]:
        nonlocal open_call
        out: list[bytes] = []
        if d.reasoning and call.thinking:
            if open_kind != "thinking":
                out += start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            out.append(sse_event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                         "delta": {"type": "thinking_delta", "thinking": d.reasoning}}))
        if d.content:
            if open_kind != "text":
                out += start("text", {"type": "text", "text": ""})
            if index not in text_delta:  # the per-token frame, encoded once per block
                text_delta[index] = FrameTemplate({"type": "content_block_delta", "index": index,
                                                   "delta": {"type": "text_delta", "text": SLOT}}, "content_block_delta")
            out.append(text_delta[index](d.content))
        for c in d.calls or []:
            if c.id is not None:
                out += start("tool_use", {"type": "tool_use", "id": _tool_id(c.id), "name": c.name, "input": {}})
                open_call = c.index
            if c.arguments and c.index == open_call:
                out.append(sse_event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                             "delta": {"type": "input_json_delta", "partial_json": c.arguments}}))
        return out

    try:
        if call.warm_only:
            await collect(entry, prep.request)
            yield sse_event("message_delta", {"type": "message_delta",
                                              "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                                              "usage": {"input_tokens": n_prompt, "output_tokens": 0}})
            yield sse_event("message_stop", {"type": "message_stop"})
            return
        async with generation(entry, prep.request) as events:
            async for ev in events:
                if isinstance(ev, TextDelta):
                    d = answer.feed(ev.text) if answer.mode == "plain" else await trio.to_thread.run_sync(answer.feed, ev.text)
                    for frame in frames_for(d):
                        yield frame
                    continue
                if ev.error is not None:
                    raise ev.error
                for frame in frames_for(await trio.to_thread.run_sync(answer.finish)):
                    yield frame
                calls = (answer.message or {}).get("tool_calls") or []
                if index < 0:  # always at least one block
                    for frame in start("text", {"type": "text", "text": ""}):
                        yield frame
                for frame in stop():
                    yield frame
                stop_reason, stop_sequence = call.stop_reason(ev, bool(calls))
                yield sse_event("message_delta", {"type": "message_delta",
                                                  "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                                  "usage": {"input_tokens": n_prompt, "output_tokens": ev.usage.completion_tokens}})
                yield sse_event("message_stop", {"type": "message_stop"})
                return
    except PylocalaiError as exc:
        yield sse_event("error", error_body(exc))
