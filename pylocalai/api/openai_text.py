"""OpenAI-compatible text endpoints besides chat: completions, edits, models, embeddings, tokenize."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import trio
from quart import Blueprint, Response

from pylocalai.api import errors_openai
from pylocalai.api.openai import request_sampling, sum_usage, usage_json
from pylocalai.api.serving import collect, generation, held, make_request, read_json, registry, resolve_model, sampling_for, tokenize
from pylocalai.api.wire import SSE_DONE, SSE_HEADERS, get_bool, get_int, get_list, get_stop, get_str, sse_data
from pylocalai.config.prompt import render_completion, render_edit
from pylocalai.engine.registry import LoadedModel
from pylocalai.engine.types import EngineRequest, TextDelta, TokenLogprob, Usage
from pylocalai.errors import InvalidRequestError, PylocalaiError

bp = Blueprint("openai_text", __name__)
errors_openai.install(bp)


def _prompts(body: dict[str, Any], key: str = "prompt") -> list[str]:
    v = body.get(key)
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and v and all(isinstance(p, str) for p in v):
        return list(v)
    raise InvalidRequestError(f"'{key}' must be a string or a non-empty array of strings", param=key)


def _completion_logprobs(entry: LoadedModel, lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
    llm = entry.llm
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = offset
    for lp in lps:
        piece = llm.token_to_piece(lp.token).decode("utf-8", "replace")
        tokens.append(piece)
        token_lps.append(lp.logprob)
        tops.append({llm.token_to_piece(t).decode("utf-8", "replace"): v for t, v in lp.top})
        offsets.append(pos)
        pos += len(piece)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


@bp.post("/v1/completions")
@bp.post("/completions")
@bp.post("/v1/engines/<model>/completions")
async def completions(model: str | None = None) -> Response | tuple[Any, int]:
    body = await read_json()
    if model and not body.get("model"):
        body["model"] = model
    cfg = resolve_model(body)
    prompts = _prompts(body)
    stream = bool(get_bool(body, "stream", False))
    n = get_int(body, "n", 1, lo=1, hi=16)
    echo = bool(get_bool(body, "echo", False))
    n_logprobs = get_int(body, "logprobs", lo=0, hi=20)
    sampling = request_sampling(body)
    sampling["logprobs"] = n_logprobs
    sampling = sampling_for(cfg, sampling, get_stop(body))
    grammar = get_str(body, "grammar", "")
    rid = "cmpl-" + uuid.uuid4().hex
    created = int(time.time())
    name = body.get("model") or cfg.name
    if stream and len(prompts) != 1:
        raise InvalidRequestError("streaming completions require exactly one prompt string", param="prompt")
    async with registry().use(cfg) as entry:
        if isinstance(body.get("response_format"), dict) and body["response_format"].get("type") == "json_object":
            grammar = grammar or await trio.to_thread.run_sync(entry.llm.schema_grammar, {"type": "object"})
        if grammar:
            sampling["grammar"] = grammar
        rendered = [render_completion(cfg, p) for p in prompts]
        reqs = []
        for i, text in enumerate(rendered):
            toks = await tokenize(entry, text)
            for j in range(n):
                s = dict(sampling)
                if j and s.get("seed") is not None:
                    s["seed"] = int(s["seed"]) + j
                reqs.append((i, text, make_request(toks, s)))
        for _, _, r in reqs:
            entry.llm.scheduler.check(r)
        if stream:
            return Response(held(cfg, _stream(entry, reqs[0][2], rid, created, name, echo, reqs[0][1], body)), headers=SSE_HEADERS)  # type: ignore[arg-type]
        results: list[Any] = [None] * len(reqs)

        async def one(k: int) -> None:
            results[k] = await collect(entry, reqs[k][2])

        async with trio.open_nursery() as nursery:
            for k in range(len(reqs)):
                nursery.start_soon(one, k)
        choices = []
        for k, ((_, prompt_text, _), (text, fin, lps)) in enumerate(zip(reqs, results, strict=True)):
            out = prompt_text + text if echo else text
            choices.append({"index": k, "text": out, "finish_reason": fin.reason.value,
                            "logprobs": _completion_logprobs(entry, lps, len(prompt_text) if echo else 0) if n_logprobs is not None else None})
    usages = [r[1].usage for r in results]
    usage = Usage(sum(u.prompt_tokens for u in usages[::n]), sum(u.completion_tokens for u in usages))
    return {"id": rid, "object": "text_completion", "created": created, "model": name, "choices": choices,
            "usage": usage_json(usage)}, 200


async def _stream(entry: LoadedModel, req: EngineRequest, rid: str, created: int, model: str, echo: bool,
                  prompt_text: str, body: dict[str, Any]) -> AsyncIterator[bytes]:
    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return sse_data({"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices, **extra})

    opts = body.get("stream_options")
    include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
    try:
        if echo:
            yield chunk([{"index": 0, "text": prompt_text, "logprobs": None, "finish_reason": None}])
        async with generation(entry, req) as events:
            async for ev in events:
                if isinstance(ev, TextDelta):
                    if ev.text:
                        yield chunk([{"index": 0, "text": ev.text, "logprobs": None, "finish_reason": None}])
                    continue
                if ev.error is not None:
                    raise ev.error
                yield chunk([{"index": 0, "text": "", "logprobs": None, "finish_reason": ev.reason.value}])
                if include_usage:
                    yield chunk([], usage=usage_json(ev.usage))
    except PylocalaiError as exc:
        yield sse_data(errors_openai.error_body(exc))
    yield SSE_DONE


@bp.post("/v1/edits")
@bp.post("/edits")
async def edits() -> tuple[Any, int]:
    body = await read_json()
    cfg = resolve_model(body)
    instruction = get_str(body, "instruction", required=True)
    inputs = _prompts(body, "input") if body.get("input") is not None else [""]
    sampling = sampling_for(cfg, request_sampling(body), get_stop(body))
    async with registry().use(cfg) as entry:
        results = []
        for text in inputs:
            toks = await tokenize(entry, render_edit(cfg, instruction, text))
            results.append(await collect(entry, make_request(toks, sampling)))
    return {"id": "edit-" + uuid.uuid4().hex, "object": "edit", "created": int(time.time()), "model": body.get("model") or cfg.name,
            "choices": [{"index": i, "text": t, "finish_reason": f.reason.value} for i, (t, f, _) in enumerate(results)],
            "usage": usage_json(sum_usage([f.usage for _, f, _ in results]))}, 200


@bp.get("/v1/models")
@bp.get("/models")
async def list_models() -> tuple[Any, int]:
    return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "pylocalai"}
                                       for n in registry().names()]}, 200


@bp.post("/v1/embeddings")
@bp.post("/embeddings")
async def embeddings() -> tuple[Any, int]:
    body = await read_json()
    cfg = resolve_model(body)
    inputs = _prompts(body, "input")
    async with registry().use(cfg) as entry:
        vectors = await entry.llm.aembed(inputs)
        n_tokens = sum([len(await tokenize(entry, t)) for t in inputs])
    return {"object": "list", "model": body.get("model") or cfg.name,
            "data": [{"object": "embedding", "index": i, "embedding": [float(x) for x in v]} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}, 200


@bp.post("/v1/tokenize")
@bp.post("/tokenize")
async def tokenize_route() -> tuple[Any, int]:
    body = await read_json()
    cfg = resolve_model(body)
    content = get_str(body, "content", required=True)
    async with registry().use(cfg) as entry:
        toks = await trio.to_thread.run_sync(lambda: entry.llm.tokenize(content, add_special=False))
    return {"tokens": toks}, 200


@bp.post("/v1/detokenize")
@bp.post("/detokenize")
async def detokenize_route() -> tuple[Any, int]:
    body = await read_json()
    cfg = resolve_model(body)
    toks = get_list(body, "tokens")
    if toks is None or not all(isinstance(t, int) and not isinstance(t, bool) for t in toks):
        raise InvalidRequestError("'tokens' must be an array of token ids", param="tokens")
    async with registry().use(cfg) as entry:
        text = await trio.to_thread.run_sync(lambda: entry.llm.detokenize(toks))
    return {"content": text}, 200
