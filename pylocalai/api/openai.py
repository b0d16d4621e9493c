"""OpenAI-compatible chat completions (stream and non-stream), with tool calls and JSON output."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import trio
from quart import Blueprint, Response

from pylocalai.api import errors_openai
from pylocalai.api.serving import (
    PreparedChat,
    choice_nursery,
    collect,
    generation,
    held,
    merge_choices,
    prepare_chat,
    read_json,
    registry,
    resolve_model,
    sampling_for,
)
from pylocalai.api.wire import (
    INT32_MAX,
    SLOT,
    SSE_DONE,
    SSE_HEADERS,
    FrameTemplate,
    get_bool,
    get_float,
    get_int,
    get_list,
    get_logit_bias,
    get_stop,
    get_str,
    sse_data,
    template_value,
)
from pylocalai.engine.chat import AnswerDelta, AnswerStream, parse_answer
from pylocalai.engine.media import content_parts
from pylocalai.engine.registry import LoadedModel
from pylocalai.engine.types import (
    Finished,
    FinishReason,
    TextDelta,
    TokenLogprob,
    Usage,
)
from pylocalai.errors import InvalidRequestError, PylocalaiError

bp = Blueprint("openai", __name__)
errors_openai.install(bp)

ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


# ---------------------------------------------------------------- request parsing


def parse_messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise InvalidRequestError("'messages' must be an array of message objects", param="messages")
    if not value:
        raise InvalidRequestError("'messages' must not be empty", param="messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequestError(f"{where} must be an object", param=where)
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise InvalidRequestError(f"{where}.role must be one of {sorted(ROLES)}", param=f"{where}.role")
        text, media = content_parts(m.get("content"), f"{where}.content")
        msg: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": text}
        if media:
            msg["media"] = media
        if role == "assistant" and m.get("tool_calls") is not None:
            calls = m["tool_calls"]
            if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls):
                raise InvalidRequestError(f"{where}.tool_calls must be an array of function calls", param=f"{where}.tool_calls")
            msg["tool_calls"] = [
                {"id": str(c.get("id") or f"call_{j}"), "type": "function",
                 "function": {"name": str(c["function"].get("name", "")),
                              "arguments": c["function"].get("arguments") if isinstance(c["function"].get("arguments"), str)
                              else json.dumps(c["function"].get("arguments") or {})}}
                for j, c in enumerate(calls)
            ]
        if role == "tool":
            msg["tool_call_id"] = str(m.get("tool_call_id") or "")
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        if isinstance(m.get("reasoning_content"), str):
            msg["reasoning_content"] = m["reasoning_content"]
        out.append(msg)
    return out


def parse_tools(body: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, Any]:
    tools = get_list(body, "tools")
    if tools is None and isinstance(body.get("functions"), list):  # legacy functions
        tools = [{"type": "function", "function": f} for f in body["functions"]]
    if tools is not None:
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise InvalidRequestError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}",
                                          param=f"tools[{i}]")
    choice = body.get("tool_choice", body.get("function_call", "auto"))
    if isinstance(choice, str) and choice.startswith("{"):
        try:
            choice = json.loads(choice)
        except json.JSONDecodeError:
            raise InvalidRequestError("'tool_choice' is not valid JSON", param="tool_choice") from None
    if choice is None:
        choice = "auto"
    if not isinstance(choice, str | dict):
        raise InvalidRequestError("'tool_choice' must be a string or an object", param="tool_choice")
    return tools, choice


def parse_response_format(body: dict[str, Any]) -> dict[str, Any] | None:
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise InvalidRequestError("'response_format.type' must be text, json_object or json_schema", param="response_format")
    if rf["type"] == "text":
        return None
    if rf["type"] == "json_object":
        return {"type": "object"}
    js = rf.get("json_schema")
    schema = js.get("schema") if isinstance(js, dict) else None
    if not isinstance(schema, dict):
        raise InvalidRequestError("'response_format.json_schema.schema' must be a JSON schema object",
                                  param="response_format.json_schema")
    return schema


def engine_seed(seed: int | None) -> int | None:
    """A request's seed as the engine takes it (32 bits): a negative seed means a random one, as in
    LocalAI; a larger one keeps its low 32 bits, so it stays reproducible."""
    if seed is None or seed < 0:
        return None
    return seed & 0xFFFFFFFF


def request_sampling(body: dict[str, Any]) -> dict[str, Any]:
    """OpenAI sampling fields (plus the llama.cpp extras LocalAI accepts) -> SamplingParams fields."""
    max_tokens = get_int(body, "max_completion_tokens", lo=1) or get_int(body, "max_tokens", lo=1)
    if body.get("max_tokens") is not None and get_int(body, "max_tokens") is not None and body["max_tokens"] <= 0:
        raise InvalidRequestError("'max_tokens' must be at least 1", param="max_tokens")
    return {
        "max_tokens": max_tokens,
        "temperature": get_float(body, "temperature", lo=0.0, hi=2.0),
        "top_p": get_float(body, "top_p", lo=0.0, hi=1.0),
        "top_k": get_int(body, "top_k", lo=0, hi=INT32_MAX),
        "min_p": get_float(body, "min_p", lo=0.0, hi=1.0),
        "typical_p": get_float(body, "typical_p", lo=0.0, hi=1.0),
        "presence_penalty": get_float(body, "presence_penalty", lo=-2.0, hi=2.0),
        "frequency_penalty": get_float(body, "frequency_penalty", lo=-2.0, hi=2.0),
        "repeat_penalty": get_float(body, "repeat_penalty", lo=0.0),
        "repeat_last_n": get_int(body, "repeat_last_n", lo=-1, hi=INT32_MAX),
        "seed": engine_seed(get_int(body, "seed", lo=-(2**63), hi=2**64 - 1)),
        "logit_bias": get_logit_bias(body) or None,
        "ignore_eos": get_bool(body, "ignore_eos"),
    }


# ---------------------------------------------------------------- rendering


def logprobs_content(entry: LoadedModel, lps: tuple[TokenLogprob, ...]) -> list[dict[str, Any]]:
    llm = entry.llm
    out = []
    for lp in lps:
        piece = llm.token_to_piece(lp.token)
        out.append({
            "id": lp.token, "token": piece.decode("utf-8", "replace"), "logprob": lp.logprob, "bytes": list(piece),
            "top_logprobs": [{"id": t, "token": (p := llm.token_to_piece(t)).decode("utf-8", "replace"),
                              "logprob": v, "bytes": list(p)} for t, v in lp.top],
        })
    return out


def usage_json(u: Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def sum_usage(usages: list[Usage]) -> Usage:
    return Usage(usages[0].prompt_tokens if usages else 0, sum(u.completion_tokens for u in usages),
                 usages[0].cached_tokens if usages else 0)


def _finish_reason(fin: Finished, calls: list[dict[str, Any]]) -> str:
    return "tool_calls" if calls and fin.reason is FinishReason.STOP else fin.reason.value


# ---------------------------------------------------------------- chat completions


class ChatCall:
    """One parsed /v1/chat/completions request."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.cfg = resolve_model(body, "chat")
        self.messages = parse_messages(body.get("messages"))
        self.tools, self.tool_choice = parse_tools(body)
        # legacy `functions`: calls come back as message.function_call, finish_reason "function_call"
        self.legacy_functions = body.get("tools") is None and isinstance(body.get("functions"), list)
        self.json_schema = parse_response_format(body)
        self.stream = bool(get_bool(body, "stream", False))
        opts = body.get("stream_options")
        self.include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
        self.n = get_int(body, "n", 1, lo=0, hi=16) or 1  # n 0 is one choice, as in LocalAI
        self.parallel_tool_calls = bool(get_bool(body, "parallel_tool_calls", False))
        lp = body.get("logprobs")
        self.top_logprobs = get_int(body, "top_logprobs", lo=0, hi=20)
        self.logprobs = (self.top_logprobs or 0) if lp else None
        if lp is not None and not isinstance(lp, bool | int):
            raise InvalidRequestError("'logprobs' must be a boolean", param="logprobs")
        sampling = request_sampling(body)
        sampling["logprobs"] = self.logprobs
        self.sampling = sampling_for(self.cfg, sampling, get_stop(body))
        self.grammar = get_str(body, "grammar", "")
        self.reasoning_effort = get_str(body, "reasoning_effort", "")
        meta = body.get("metadata")
        self.metadata = {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else None
        kwargs = body.get("chat_template_kwargs")
        self.template_kwargs = dict(kwargs) if isinstance(kwargs, dict) else {}
        if self.metadata:
            for k, v in self.metadata.items():
                self.template_kwargs.setdefault(k, template_value(v))
        self.enable_thinking = self.reasoning_effort != "none" and self.template_kwargs.get("enable_thinking", True) is not False
        self.id = "chatcmpl-" + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = body.get("model") or self.cfg.name
        self._content_frames: dict[int, FrameTemplate] = {}

    async def prepare(self, entry: LoadedModel, index: int) -> PreparedChat:
        sampling = dict(self.sampling)
        if index and sampling.get("seed") is not None:
            sampling["seed"] = int(sampling["seed"]) + index  # n choices must differ
        return await prepare_chat(
            entry, self.messages, sampling, tools=self.tools, tool_choice=self.tool_choice,
            parallel_tool_calls=self.parallel_tool_calls, json_schema=self.json_schema,
            enable_thinking=self.enable_thinking, template_kwargs=self.template_kwargs, grammar=self.grammar,
            reasoning_effort=self.reasoning_effort, metadata=self.metadata,
        )

    def chunk_object(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "system_fingerprint": None, "choices": choices, **extra}

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return sse_data(self.chunk_object(choices, **extra))

    def content_frame(self, index: int) -> FrameTemplate:
        """The chunk of one content delta of choice `index`, as chunk() makes it, encoded once."""
        t = self._content_frames.get(index)
        if t is None:
            t = self._content_frames[index] = FrameTemplate(self.chunk_object(
                [{"index": index, "delta": {"content": SLOT}, "logprobs": None, "finish_reason": None}]))
        return t


async def _run_one(call: ChatCall, entry: LoadedModel, index: int) -> tuple[dict[str, Any], Finished, list[TokenLogprob]]:
    prep = await call.prepare(entry, index)
    text, fin, lps = await collect(entry, prep.request)
    message = await trio.to_thread.run_sync(lambda: parse_answer(entry.llm, prep.plan, text))
    return message, fin, lps


@bp.post("/v1/chat/completions")
@bp.post("/chat/completions")
async def chat_completions() -> Response | tuple[Any, int]:
    call = ChatCall(await read_json())
    async with registry().use(call.cfg) as entry:
        if call.stream:
            # Tokenize and check the context before the 200: a bad request is still a 400.
            preps = [await call.prepare(entry, i) for i in range(call.n)]
            for p in preps:
                entry.llm.scheduler.check(p.request)
            return Response(held(call.cfg, _stream_chat(call, entry, preps)), headers=SSE_HEADERS)  # type: ignore[arg-type]
        results: list[Any] = [None] * call.n

        async def one(i: int) -> None:
            results[i] = await _run_one(call, entry, i)

        async with choice_nursery() as nursery:
            for i in range(call.n):
                nursery.start_soon(one, i)
    choices = []
    for message, fin, lps in results:
        calls = message.get("tool_calls") or []
        msg: dict[str, Any] = {"role": "assistant", "content": message.get("content") if not calls else (message.get("content") or None)}
        if message.get("reasoning_content"):
            msg["reasoning_content"] = message["reasoning_content"]
        logprobs = {"content": logprobs_content(entry, tuple(lps))} if call.logprobs is not None else None
        if calls and call.legacy_functions:  # one choice per call, as LocalAI answers legacy function calling
            for c in calls:
                fc = {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                choices.append({"index": len(choices), "message": {**msg, "function_call": fc},
                                "finish_reason": "function_call", "logprobs": logprobs})
            continue
        if calls:
            msg["tool_calls"] = [{"id": c["id"], "type": "function", "function": c["function"]} for c in calls]
        choices.append({"index": len(choices), "message": msg, "finish_reason": _finish_reason(fin, calls),
                        "logprobs": logprobs})
    usage = sum_usage([r[1].usage for r in results])
    return {"id": call.id, "object": "chat.completion", "created": call.created, "model": call.model,
            "system_fingerprint": None, "choices": choices, "usage": usage_json(usage)}, 200


async def _stream_chat(call: ChatCall, entry: LoadedModel, preps: list[PreparedChat]) -> AsyncIterator[bytes]:
    usages: list[Usage] = []
    try:
        async with aclosing(merge_choices([_stream_choice(call, entry, i, prep, usages)
                                           for i, prep in enumerate(preps)])) as frames:
            async for frame in frames:
                yield frame
        if call.include_usage:
            yield call.chunk([], usage=usage_json(sum_usage(usages)))
    except PylocalaiError as exc:
        yield sse_data({"error": errors_openai.error_body(exc)["error"]})
    yield SSE_DONE


async def _stream_choice(call: ChatCall, entry: LoadedModel, index: int, prep: PreparedChat,
                         usages: list[Usage]) -> AsyncIterator[bytes]:
    answer = AnswerStream(entry.llm, prep.plan)
    content = call.content_frame(index)

    def frames(d: AnswerDelta, lp: dict[str, Any] | None = None) -> list[bytes]:
        out = []
        if d.reasoning:
            out.append(call.chunk([{"index": index, "delta": {"reasoning_content": d.reasoning}, "logprobs": None, "finish_reason": None}]))
        if d.content and lp is None:
            out.append(content(d.content))
        elif d.content or lp:
            out.append(call.chunk([{"index": index, "delta": {"content": d.content}, "logprobs": lp, "finish_reason": None}]))
        if d.calls and call.legacy_functions:  # function_call deltas; a further call gets the next choice index
            for c in d.calls:
                fc = {"name": c.name, "arguments": ""} if c.id else {"arguments": c.arguments}
                out.append(call.chunk([{"index": index + c.index, "delta": {"function_call": fc}, "logprobs": None,
                                        "finish_reason": None}]))
        elif d.calls:
            tc = [{"index": c.index, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}}
                  if c.id else {"index": c.index, "function": {"arguments": c.arguments}} for c in d.calls]
            out.append(call.chunk([{"index": index, "delta": {"tool_calls": tc}, "logprobs": None, "finish_reason": None}]))
        return out

    yield call.chunk([{"index": index, "delta": {"role": "assistant", "content": None}, "logprobs": None, "finish_reason": None}])
    async with generation(entry, prep.request) as events:
        async for ev in events:
            if isinstance(ev, TextDelta):
                lp = {"content": logprobs_content(entry, ev.logprobs)} if call.logprobs is not None else None
                d = answer.feed(ev.text) if answer.mode == "plain" else await trio.to_thread.run_sync(answer.feed, ev.text)
                for frame in frames(d, lp):
                    yield frame
                continue
            if ev.error is not None:
                raise ev.error
            usages.append(ev.usage)
            for frame in frames(await trio.to_thread.run_sync(answer.finish)):
                yield frame
            calls = (answer.message or {}).get("tool_calls") or []
            if calls and call.legacy_functions:
                for k in range(len(calls)):
                    yield call.chunk([{"index": index + k, "delta": {}, "logprobs": None, "finish_reason": "function_call"}])
                return
            yield call.chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": _finish_reason(ev, calls)}])
            return
