"""What every protocol module needs to serve a request: the registry, model resolution, request
defaults from the model config, prompt planning, and the engine's event stream. Protocol-neutral."""

from __future__ import annotations

import json
import logging
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager, suppress
from dataclasses import dataclass, replace
from typing import Any

import trio
from quart import current_app, request

from pylocalai.api.wire import require_object
from pylocalai.config.model_config import ModelConfig
from pylocalai.config.prompt import media_in_prompt_order, render_chat
from pylocalai.engine.chat import ChatPlan, plan_chat
from pylocalai.engine.media import message_media, without_media
from pylocalai.engine.registry import LoadedModel, ModelRegistry
from pylocalai.engine.types import (
    EngineRequest,
    Finished,
    GenerationEvent,
    MediaSpan,
    SamplingParams,
    TextDelta,
    TokenLogprob,
)
from pylocalai.errors import InvalidRequestError, PylocalaiError

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup  # trio's dependency there

log = logging.getLogger(__name__)

_PARAM_DEFAULTS = {"temperature", "top_p", "top_k", "min_p", "typical_p", "repeat_penalty", "repeat_last_n",
                   "frequency_penalty", "presence_penalty", "seed", "max_tokens", "ignore_eos"}


async def read_json() -> dict[str, Any]:
    """The request body as a JSON object; malformed JSON is the caller's error (400), never a 500."""
    raw = await request.get_data()
    try:
        body = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequestError("the request body nests JSON arrays or objects too deeply") from None
    return require_object(body)


def registry() -> ModelRegistry:
    reg: ModelRegistry = current_app.config["PYLOCALAI_REGISTRY"]
    return reg


def bearer_token() -> str | None:
    auth = request.headers.get("Authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None


def resolve_model(body: dict[str, Any], usecase: str | None = None) -> ModelConfig:
    """The model a request names; usecase (chat, completion, edit, embeddings) picks LocalAI's
    default when it names none and several are configured."""
    name = body.get("model")
    if name is not None and not isinstance(name, str):
        raise InvalidRequestError("'model' must be a string", param="model")
    reg = registry()
    if not name:  # LocalAI's next places: ?model=, then a bearer token that names a model
        bearer = bearer_token()
        name = request.args.get("model") or (bearer if bearer and reg.catalog.get(bearer) is not None else None)
        if name:
            body["model"] = name  # answers echo the name asked for (an alias's own)
    return reg.resolve(name or None, None, usecase)


def sampling_for(cfg: ModelConfig, request_fields: dict[str, Any], stop: Sequence[str] = ()) -> dict[str, Any]:
    """Config `parameters:` defaults, overridden by the request's own fields; stop strings are the
    config's stopwords plus the request's."""
    out: dict[str, Any] = {k: v for k, v in cfg.parameters.items() if k in _PARAM_DEFAULTS}
    if out.get("seed") is not None and int(out["seed"]) < 0:
        out.pop("seed")
    if out.get("max_tokens") in (0, None):
        out.pop("max_tokens", None)
    if out.get("repeat_penalty") in (0, 0.0):
        out.pop("repeat_penalty")
    out.update({k: v for k, v in request_fields.items() if v is not None})
    out["stop"] = tuple(dict.fromkeys([*cfg.stopwords, *stop]))
    return out


def make_request(tokens: Sequence[int], sampling: dict[str, Any], media: tuple[MediaSpan, ...] = ()) -> EngineRequest:
    try:
        params = SamplingParams(**sampling)
    except TypeError as exc:
        raise InvalidRequestError(f"invalid sampling parameters: {exc}") from None
    return EngineRequest(uuid.uuid4().hex, tuple(tokens), params, media)


@dataclass
class PreparedChat:
    plan: ChatPlan
    request: EngineRequest


async def prepare_chat(entry: LoadedModel, messages: list[dict[str, Any]], sampling: dict[str, Any], *,
                       tools: list[dict[str, Any]] | None, tool_choice: Any, parallel_tool_calls: bool,
                       json_schema: dict[str, Any] | None, enable_thinking: bool = True,
                       template_kwargs: dict[str, Any] | None = None, grammar: str = "",
                       reasoning_effort: str = "", metadata: dict[str, str] | None = None,
                       continue_final: bool = False) -> PreparedChat:
    """Render (Go templates or jinja), pick the grammar, tokenize: off the event loop.

    continue_final: a last assistant message is a prefill the answer continues (Anthropic's
    semantics, and llama-server's): the turns before it are rendered up to the assistant's
    generation prompt, then its text follows. Not with tools or a grammar, whose grammar starts
    at the generation prompt."""
    cfg, llm = entry.config, entry.llm
    prefill = ""
    last = messages[-1] if messages else {}
    if (continue_final and last.get("role") == "assistant" and isinstance(last.get("content"), str) and last["content"]
            and not last.get("tool_calls") and not last.get("media") and not tools and json_schema is None and not grammar):
        prefill, messages = last["content"], messages[:-1]

    def work() -> PreparedChat:
        prompt = None
        media = message_media(messages)
        if media and not any(llm.multimodal.values()):
            raise InvalidRequestError(f"model {cfg.name!r} cannot take images or audio (it has no multimodal "
                                      "projector: set mmproj in its config)", param=media[0].param)
        if not cfg.uses_jinja:
            fns = [t.get("function", t) for t in tools or []] if tool_choice != "none" else []
            prompt = render_chat(cfg, messages, functions=fns, use_functions=bool(fns),
                                 reasoning_effort=reasoning_effort, metadata=metadata)
            media = [m for msg in messages for m in media_in_prompt_order(msg)]
        plan = plan_chat(llm, without_media(messages), tools=tools, tool_choice=tool_choice,
                         parallel_tool_calls=parallel_tool_calls, json_schema=json_schema,
                         enable_thinking=enable_thinking, template_kwargs=template_kwargs,
                         user_grammar=grammar, prompt=prompt)
        if prefill:
            plan = replace(plan, prompt=plan.prompt + prefill)
        tokens, spans = llm.tokenize_media(plan.prompt, [m.load() for m in media])
        return PreparedChat(plan, make_request(tokens, plan.sampling_with(sampling), spans))

    return await trio.to_thread.run_sync(work)


async def tokenize(entry: LoadedModel, text: str) -> list[int]:
    return await trio.to_thread.run_sync(entry.llm.tokenize, text)


async def collect(entry: LoadedModel, req: EngineRequest) -> tuple[str, Finished, list[TokenLogprob]]:
    """Run req to its end: the whole text, the finish event (an engine error is raised) and logprobs."""
    text: list[str] = []
    lps: list[TokenLogprob] = []
    async with entry.llm.worker.stream_trio(req, whole=True) as events:  # one hand-over, no wake-up per token
        async for ev in events:
            if isinstance(ev, TextDelta):
                text.append(ev.text)
                lps.extend(ev.logprobs)
                continue
            if ev.error is not None:
                raise ev.error
            return "".join(text), ev, lps
    raise PylocalaiError("generation ended without a finish event")


def held(cfg: ModelConfig, frames: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A streamed body that keeps its model in use (never unloaded) until it is fully sent; the
    handler that returned it has already left its own `use` block by then."""
    reg = registry()

    async def body() -> AsyncIterator[bytes]:
        async with reg.use(cfg), aclosing(frames) as inner:  # a client that leaves closes both
            async for frame in inner:
                yield frame

    return body()


@asynccontextmanager
async def choice_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery for the n choices of one request. When a choice fails with the caller's or the
    engine's error (a PylocalaiError), that error leaves as itself rather than inside an
    ExceptionGroup, so the endpoint answers it in its protocol's shape; anything else stays grouped."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        ours, rest = group.split(PylocalaiError)
        # the siblings' cancellation may ride along; a cancel from outside is delivered again at the
        # next checkpoint, so only other failures keep the group
        others = rest.split(trio.Cancelled)[1] if rest is not None else None
        if ours is None or others is not None:
            raise
        first: BaseException = ours
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None


def merge_choices(streams: list[AsyncIterator[bytes]]) -> AsyncIterator[bytes]:
    """The SSE frames of a request's n choice streams, each as soon as it is made. One stream (the
    common case) is returned as it is: no task, channel or generator hop per token."""
    return streams[0] if len(streams) == 1 else _merged(streams)


async def _merged(streams: list[AsyncIterator[bytes]]) -> AsyncIterator[bytes]:
    # No task here may fail: a failed task cancels the nursery, and while this generator sits at a
    # `yield` that cancellation lands in whoever iterates it (the server's send), which ends the
    # stream without its error frame. So a choice's error travels through the channel; the
    # consumer then stops the other choices and raises it once the nursery has closed.
    class _Failed:
        def __init__(self, exc: Exception) -> None:
            self.exc = exc

    async def produce(stream: AsyncIterator[bytes], out: trio.MemorySendChannel[bytes | _Failed]) -> None:
        async with out, aclosing(stream) as frames:  # type: ignore[type-var]
            try:
                async for frame in frames:
                    await out.send(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the consumer stopped reading: another choice failed, or the client left
            except Exception as exc:  # noqa: BLE001 - raised again by the consumer, outside the nursery
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await out.send(_Failed(exc))

    failed: Exception | None = None
    send, recv = trio.open_memory_channel[bytes | _Failed](64)
    async with trio.open_nursery() as nursery:
        async with send:
            for stream in streams:
                nursery.start_soon(produce, stream, send.clone())
        async with recv:
            async for item in recv:
                if isinstance(item, _Failed):
                    failed = item.exc
                    nursery.cancel_scope.cancel()
                    break
                yield item
    if failed is not None:
        raise failed


@asynccontextmanager
async def generation(entry: LoadedModel, req: EngineRequest) -> AsyncIterator[trio.MemoryReceiveChannel[GenerationEvent]]:
    """The engine's events for req; leaving the block early (error, client gone) cancels it."""
    async with entry.llm.worker.stream_trio(req) as events:
        yield events
