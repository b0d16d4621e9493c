"""Open Responses API: /v1/responses create (foreground, stream, background), retrieve, resumable
stream, cancel and delete, with storage that survives restarts."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio
from quart import Blueprint, Response, current_app, request

from pylocalai.api import errors_openai
from pylocalai.api.response_store import ResponseStore
from pylocalai.api.responses_run import ResponseRun, logprob_entries
from pylocalai.api.serving import (
    PreparedChat,
    generation,
    prepare_chat,
    read_json,
    registry,
    resolve_model,
    sampling_for,
)
from pylocalai.api.wire import (
    SSE_DONE,
    get_bool,
    get_float,
    get_int,
    get_list,
    get_str,
    sse_event,
)
from pylocalai.engine.chat import AnswerStream
from pylocalai.engine.media import content_parts
from pylocalai.engine.registry import LoadedModel, ModelRegistry
from pylocalai.errors import (
    ContextLengthError,
    InvalidRequestError,
    NotFoundError,
    PylocalaiError,
)

log = logging.getLogger(__name__)
bp = Blueprint("responses", __name__)
_SSE = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
errors_openai.install(bp, responses=True)


def store() -> ResponseStore:
    s: ResponseStore = current_app.config["PYLOCALAI_RESPONSE_STORE"]
    return s


def live_runs() -> dict[str, ResponseRun]:
    runs: dict[str, ResponseRun] = current_app.config["PYLOCALAI_RESPONSE_RUNS"]
    return runs


# ---------------------------------------------------------------- input items -> messages


def normalize_input(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}]
    if not isinstance(value, list) or not value:
        raise InvalidRequestError("'input' must be a string or a non-empty array of items", param="input")
    items = []
    for i, it in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(it, dict):
            raise InvalidRequestError(f"{where} must be an object", param=where)
        kind = it.get("type") or ("message" if "role" in it else None)
        if kind == "message":
            if it.get("role") not in ("user", "assistant", "system", "developer"):
                raise InvalidRequestError(f"{where}.role must be user, assistant, system or developer", param=f"{where}.role")
            content = it.get("content")
            if isinstance(content, str):
                content = [{"type": "output_text" if it["role"] == "assistant" else "input_text", "text": content}]
            if not isinstance(content, list):
                raise InvalidRequestError(f"{where}.content must be a string or an array of parts", param=f"{where}.content")
            for j, p in enumerate(content):
                ptype = p.get("type") if isinstance(p, dict) else None
                if ptype == "input_image":
                    if not isinstance(p.get("image_url"), str) or not p["image_url"]:
                        raise InvalidRequestError("an input_image part needs image_url (a data URI or an http(s) URL); "
                                                  "file_id is not supported", param=f"{where}.content[{j}]")
                    continue
                if ptype not in ("input_text", "output_text", "text", "refusal") or not isinstance(p.get("text", p.get("refusal")), str):
                    raise InvalidRequestError(f"{where}.content[{j}] must be an input_text or output_text part", param=f"{where}.content[{j}]")
            items.append({"type": "message", "role": it["role"], "content": content})
        elif kind == "function_call":
            if not isinstance(it.get("name"), str) or not isinstance(it.get("call_id"), str):
                raise InvalidRequestError(f"{where} needs name and call_id", param=where)
            args = it.get("arguments", "{}")
            items.append({"type": "function_call", "call_id": it["call_id"], "name": it["name"],
                          "arguments": args if isinstance(args, str) else json.dumps(args)})
        elif kind == "function_call_output":
            if not isinstance(it.get("call_id"), str):
                raise InvalidRequestError(f"{where}.call_id is required", param=f"{where}.call_id")
            out = it.get("output", "")
            items.append({"type": "function_call_output", "call_id": it["call_id"],
                          "output": out if isinstance(out, str) else json.dumps(out)})
        elif kind == "reasoning":
            texts = [c.get("text", "") for c in (it.get("content") or []) + (it.get("summary") or []) if isinstance(c, dict)]
            items.append({"type": "reasoning", "text": "".join(texts)})
        elif kind == "item_reference":
            if not isinstance(it.get("id"), str) or not it["id"]:
                raise InvalidRequestError(f"{where}.id is required", param=f"{where}.id")
            items.append({"type": "item_reference", "id": it["id"], "param": f"{where}.id"})  # resolved by resolve_references
        else:
            raise InvalidRequestError(f"{where}: unsupported item type {kind!r}", param=f"{where}.type")
    return items


def resolve_references(items: list[dict[str, Any]], find: Callable[[str], dict[str, Any] | None]) -> list[dict[str, Any]]:
    """Input items of type item_reference replaced by the stored output items they name."""
    out: list[dict[str, Any]] = []
    for it in items:
        if it["type"] != "item_reference":
            out.append(it)
            continue
        found = find(it["id"])
        if found is None:
            raise NotFoundError(f"item {it['id']} not found", param=it["param"])
        out.extend(items_from_output([found]))
    return out


def items_from_output(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A stored response's output, as input items for the next turn."""
    items = []
    for o in output:
        if o.get("type") == "message":
            items.append({"type": "message", "role": "assistant", "content": [
                {"type": "output_text", "text": "".join(p.get("text", "") for p in o.get("content", []))}]})
        elif o.get("type") == "function_call":
            items.append({"type": "function_call", "call_id": o["call_id"], "name": o["name"], "arguments": o["arguments"]})
        elif o.get("type") == "reasoning":
            items.append({"type": "reasoning", "text": "".join(p.get("text", "") for p in o.get("content", []))})
    return items


def to_messages(items: list[dict[str, Any]], instructions: str | None) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    for it in items:
        last = msgs[-1] if msgs else None
        if it["type"] == "message":
            parts = [{"type": "text", "text": p["refusal"]} if p.get("type") == "refusal" else p for p in it["content"]]
            text, media = content_parts(parts, "input")
            role = "system" if it["role"] == "developer" else it["role"]
            if role == "assistant" and last is not None and last["role"] == "assistant" and not last.get("_closed"):
                last["content"] += text
            else:
                msgs.append({"role": role, "content": text, **({"media": media} if media else {})})
        elif it["type"] == "function_call":
            if last is None or last["role"] != "assistant":
                last = {"role": "assistant", "content": ""}
                msgs.append(last)
            last.setdefault("tool_calls", []).append({"id": it["call_id"], "type": "function",
                                                      "function": {"name": it["name"], "arguments": it["arguments"]}})
        elif it["type"] == "function_call_output":
            msgs.append({"role": "tool", "tool_call_id": it["call_id"], "content": it["output"]})
        elif it["type"] == "reasoning":
            if last is None or last["role"] != "assistant":
                last = {"role": "assistant", "content": ""}
                msgs.append(last)
            last["reasoning_content"] = last.get("reasoning_content", "") + it["text"]
    return msgs


# ---------------------------------------------------------------- request


class ResponsesCall:
    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.cfg = resolve_model(body, "chat")
        self.store_it = bool(get_bool(body, "store", True))
        self.background = bool(get_bool(body, "background", False))
        if self.background and not self.store_it:
            raise InvalidRequestError("background responses must be stored (store: true)", param="background")
        self.stream = bool(get_bool(body, "stream", False))
        self.instructions = get_str(body, "instructions")
        items = resolve_references(normalize_input(body.get("input")), store().item)
        self.previous_id = get_str(body, "previous_response_id")
        if self.previous_id:
            prev = store().get(self.previous_id)
            if prev is None:
                raise NotFoundError(f"previous response not found: {self.previous_id}", param="previous_response_id")
            prev_resp, prev_items, _ = prev
            items = prev_items + items_from_output(prev_resp.get("output") or []) + items
        self.items = items
        self.tools = self._tools(get_list(body, "tools"))
        self.tool_choice, self.offered = self._tool_choice(body.get("tool_choice"), self.tools)
        self.parallel_tool_calls = bool(get_bool(body, "parallel_tool_calls", True))
        self.max_tool_calls = get_int(body, "max_tool_calls", lo=1)
        self.text_format, self.json_schema = self._text_format(body)
        reasoning = body.get("reasoning")
        if reasoning is not None and not isinstance(reasoning, dict):
            raise InvalidRequestError("'reasoning' must be an object", param="reasoning")
        self.reasoning = reasoning
        effort = (reasoning or {}).get("effort")
        if effort not in (None, "none", "minimal", "low", "medium", "high"):
            raise InvalidRequestError("'reasoning.effort' must be none, minimal, low, medium or high", param="reasoning.effort")
        self.enable_thinking = effort not in ("none",)
        self.template_kwargs = {"reasoning_effort": effort} if effort else {}
        self.truncation = get_str(body, "truncation", "disabled")
        if self.truncation not in ("auto", "disabled"):
            raise InvalidRequestError("'truncation' must be auto or disabled", param="truncation")
        meta = body.get("metadata")
        if meta is not None and (not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())):
            raise InvalidRequestError("'metadata' must map strings to strings", param="metadata")
        self.metadata = meta or {}
        self.top_logprobs = get_int(body, "top_logprobs", lo=0, hi=20)
        fields = {
            "max_tokens": get_int(body, "max_output_tokens", lo=1),
            "temperature": get_float(body, "temperature", lo=0.0, hi=2.0),
            "top_p": get_float(body, "top_p", lo=0.0, hi=1.0),
            "presence_penalty": get_float(body, "presence_penalty", lo=-2.0, hi=2.0),
            "frequency_penalty": get_float(body, "frequency_penalty", lo=-2.0, hi=2.0),
            "logprobs": self.top_logprobs,
            "ignore_eos": get_bool(body, "ignore_eos"),  # llama.cpp extension, as on the other endpoints
        }
        self.sampling = sampling_for(self.cfg, fields)
        self.id = "resp_" + uuid.uuid4().hex

    @staticmethod
    def _tools(tools: list[Any] | None) -> list[dict[str, Any]] | None:
        if tools is None:
            return None
        out = []
        for i, t in enumerate(tools):
            if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("name"), str):
                raise InvalidRequestError(f"tools[{i}] must be a function tool with a name", param=f"tools[{i}]")
            out.append({"type": "function", "function": {"name": t["name"], "description": t.get("description") or "",
                                                          "parameters": t.get("parameters") or {"type": "object", "properties": {}}}})
        return out

    @staticmethod
    def _tool_choice(tc: Any, tools: list[dict[str, Any]] | None) -> tuple[Any, list[dict[str, Any]] | None]:
        """(the tool choice for the chat template, the tools the model is offered). `allowed_tools`
        offers only the listed tools, in its mode (auto or required); the response still lists all."""
        if tc is None or tc in ("auto", "none", "required"):
            return tc or "auto", tools
        if isinstance(tc, dict) and tc.get("type") == "function":
            name = tc.get("name") or (tc.get("function") or {}).get("name")
            if isinstance(name, str):
                return {"type": "function", "function": {"name": name}}, tools
        if isinstance(tc, dict) and tc.get("type") == "allowed_tools":
            mode, listed = tc.get("mode", "auto"), tc.get("tools")
            if mode not in ("auto", "required") or not isinstance(listed, list) or not listed:
                raise InvalidRequestError("'tool_choice' allowed_tools needs mode auto or required and a list of tools",
                                          param="tool_choice")
            names = {t.get("name") or (t.get("function") or {}).get("name") for t in listed if isinstance(t, dict)}
            offered = [t for t in tools or [] if t["function"]["name"] in names]
            unknown = names - {t["function"]["name"] for t in offered}
            if unknown or len(names) != len(listed):
                raise InvalidRequestError(f"'tool_choice' allowed_tools names tools that are not in 'tools': "
                                          f"{sorted(str(n) for n in unknown)}", param="tool_choice")
            return mode, offered
        raise InvalidRequestError("'tool_choice' must be auto, none, required, {'type': 'function', 'name': ...} or "
                                  "{'type': 'allowed_tools', ...}", param="tool_choice")

    @staticmethod
    def _text_format(body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        text = body.get("text")
        fmt = (text or {}).get("format") if isinstance(text, dict) else None
        fmt = fmt or body.get("text_format") or {"type": "text"}
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise InvalidRequestError("'text.format.type' must be text, json_object or json_schema", param="text.format")
        if fmt["type"] == "json_object":
            return fmt, {"type": "object"}
        if fmt["type"] == "json_schema":
            if not isinstance(fmt.get("schema"), dict):
                raise InvalidRequestError("'text.format.schema' must be a JSON schema", param="text.format.schema")
            return fmt, fmt["schema"]
        return fmt, None

    def shell(self, status: str) -> dict[str, Any]:
        s = self.sampling
        return {
            "id": self.id, "object": "response", "created_at": int(time.time()), "completed_at": None,
            "status": status, "incomplete_details": None, "model": self.body.get("model") or self.cfg.name,
            "previous_response_id": self.previous_id, "instructions": self.instructions, "output": [], "error": None,
            "tools": [{"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
                       "parameters": t["function"]["parameters"], "strict": False} for t in self.tools or []],
            "tool_choice": self.body.get("tool_choice") or "auto", "truncation": self.truncation,
            "parallel_tool_calls": self.parallel_tool_calls, "text": {"format": self.text_format},
            "top_p": s.get("top_p", 1.0), "presence_penalty": s.get("presence_penalty", 0.0),
            "frequency_penalty": s.get("frequency_penalty", 0.0), "top_logprobs": self.top_logprobs or 0,
            "temperature": s.get("temperature", 1.0), "reasoning": self.reasoning, "usage": None,
            "max_output_tokens": s.get("max_tokens"), "max_tool_calls": self.max_tool_calls, "store": self.store_it,
            "background": self.background, "service_tier": "default", "metadata": self.metadata,
            "safety_identifier": None, "prompt_cache_key": None, "user": None,
        }

    async def prepare(self, entry: LoadedModel) -> PreparedChat:
        """Render and tokenize; with truncation 'auto' the oldest turns go until the prompt fits."""
        messages = to_messages(self.items, self.instructions)
        while True:
            prep = await prepare_chat(entry, messages, self.sampling, tools=self.offered, tool_choice=self.tool_choice,
                                      parallel_tool_calls=self.parallel_tool_calls, json_schema=self.json_schema,
                                      enable_thinking=self.enable_thinking, template_kwargs=self.template_kwargs)
            try:
                entry.llm.scheduler.check(prep.request)
                return prep
            except ContextLengthError:
                droppable = [i for i, m in enumerate(messages) if m["role"] != "system"]
                if self.truncation != "auto" or len(droppable) <= 1:
                    raise
                del messages[droppable[0]]


# ---------------------------------------------------------------- running


async def execute(run: ResponseRun, call: ResponsesCall, prep: PreparedChat | None, reg: ModelRegistry,
                  runs: dict[str, ResponseRun]) -> None:
    """Run to a terminal status; failures become a failed response, never an exception. Takes the
    registry explicitly: a background run outlives the request (and its app context)."""
    try:
        async with reg.use(call.cfg) as entry:
            if prep is None:
                prep = await call.prepare(entry)
            if run.done:  # cancelled while queued
                return
            await run.set_status("in_progress")
            await run.emit("response.in_progress", response=run.snapshot())
            llm = entry.llm
            with trio.CancelScope() as scope:
                run.cancel_scope = scope
                async with generation(entry, prep.request) as events:
                    await run.run(AnswerStream(llm, prep.plan), events, lambda lps: logprob_entries(llm, lps),
                                  lambda text: len(llm.tokenize(text, add_special=False)))
    except PylocalaiError as exc:
        if not run.done:
            await run.fail(exc.message, "invalid_prompt" if isinstance(exc, InvalidRequestError) else "server_error")
    except Exception as exc:  # the run must end; the server keeps serving
        log.exception("response %s failed", run.id)
        if not run.done:
            await run.fail(f"internal error: {exc}")
    finally:
        with trio.CancelScope(shield=True):  # the client left (foreground stream): record the cancel
            if not run.done:
                await run.cancel()
        runs.pop(run.id, None)


def _sse(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    async def gen() -> AsyncIterator[bytes]:
        async for ev in events:
            yield sse_event(ev["type"], ev)
        yield SSE_DONE

    return gen()


@bp.post("/v1/responses")
@bp.post("/responses")
async def create_response() -> Response | tuple[Any, int]:
    call = ResponsesCall(await read_json())
    async with registry().use(call.cfg) as entry:
        prep = await call.prepare(entry)  # bad input and a prompt that cannot fit are 400s, before anything runs
    run = ResponseRun(call.shell("queued" if call.background else "in_progress"), call.items,
                      store() if call.store_it else None, max_tool_calls=call.max_tool_calls)
    live_runs()[run.id] = run
    await run.emit("response.created", response=run.snapshot())
    args = (run, call, prep, registry(), live_runs())
    if call.background:
        run.persist()
        current_app.config["PYLOCALAI_NURSERY"].start_soon(execute, *args)
        if call.stream:
            return Response(_sse(run.follow(-1)), headers=_SSE)  # type: ignore[arg-type]
        return run.snapshot(), 200
    if call.stream:
        async def foreground() -> AsyncIterator[bytes]:
            async with trio.open_nursery() as nursery:  # the client leaving cancels the run
                nursery.start_soon(execute, *args)
                async for frame in _sse(run.follow(-1)):
                    yield frame

        return Response(foreground(), headers=_SSE)  # type: ignore[arg-type]
    await execute(*args)
    return run.snapshot(), 200


def _find(rid: str) -> tuple[ResponseRun | None, dict[str, Any] | None, list[dict[str, Any]]]:
    run = live_runs().get(rid)
    if run is not None:
        return run, run.snapshot(), run.events
    stored = store().get(rid)
    if stored is None:
        raise NotFoundError(f"response {rid} not found", param="response_id")
    return None, stored[0], stored[2]


@bp.get("/v1/responses/<rid>")
@bp.get("/responses/<rid>")
async def get_response(rid: str) -> Response | tuple[Any, int]:
    run, resp, events = _find(rid)
    if request.args.get("stream", "false").lower() != "true":
        return resp, 200
    raw = request.args.get("starting_after")
    try:
        after = int(raw) if raw is not None else -1
    except ValueError:
        raise InvalidRequestError("'starting_after' must be an integer", param="starting_after") from None
    if run is not None:
        source = run.follow(after)
    else:
        async def replay() -> AsyncIterator[dict[str, Any]]:
            for ev in events:
                if ev["sequence_number"] > after:
                    yield ev

        source = replay()
    return Response(_sse(source), headers=_SSE)  # type: ignore[arg-type]


@bp.post("/v1/responses/<rid>/cancel")
@bp.post("/responses/<rid>/cancel")
async def cancel_response(rid: str) -> tuple[Any, int]:
    run, resp, _ = _find(rid)
    if run is None or run.done:
        assert resp is not None
        raise InvalidRequestError(f"response {rid} is already {resp['status']}; only a running response can be cancelled",
                                  param="response_id")
    await run.cancel()
    if run.cancel_scope is not None:
        run.cancel_scope.cancel()
    return run.snapshot(), 200


@bp.delete("/v1/responses/<rid>")
@bp.delete("/responses/<rid>")
async def delete_response(rid: str) -> tuple[Any, int]:
    run = live_runs().get(rid)
    if run is not None and not run.done:
        await run.cancel()
        if run.cancel_scope is not None:
            run.cancel_scope.cancel()
    if not store().delete(rid) and run is None:
        raise NotFoundError(f"response {rid} not found", param="response_id")
    return {"id": rid, "object": "response", "deleted": True}, 200
