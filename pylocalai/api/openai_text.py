"""OpenAI-compatible text endpoints besides chat: completions, edits, models, embeddings, tokenize."""

from __future__ import annotations

import base64
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import numpy as np
import trio
from quart import Blueprint, Response, request

from pylocalai.api import errors_openai
from pylocalai.api.openai import request_sampling, usage_json
from pylocalai.api.serving import (
    choice_nursery,
    collect,
    generation,
    held,
    make_request,
    merge_choices,
    read_json,
    registry,
    resolve_model,
    sampling_for,
    tokenize,
)
from pylocalai.api.wire import (
    SSE_DONE,
    SSE_HEADERS,
    get_bool,
    get_int,
    get_list,
    get_stop,
    get_str,
    sse_data,
)
from pylocalai.config.prompt import render_completion, render_edit
from pylocalai.engine.registry import LoadedModel
from pylocalai.engine.types import EngineRequest, TextDelta, TokenLogprob, Usage
from pylocalai.errors import InvalidRequestError, ModelNotFoundError, PylocalaiError

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
    cfg = resolve_model(body, "completion")
    prompts = _prompts(body)
    stream = bool(get_bool(body, "stream", False))
    n = get_int(body, "n", 1, lo=0, hi=16) or 1  # n 0 is one choice, as in LocalAI
    echo = bool(get_bool(body, "echo", False))
    n_logprobs = get_int(body, "logprobs", lo=0, hi=20)
    sampling = request_sampling(body)
    sampling["logprobs"] = n_logprobs
    sampling = sampling_for(cfg, sampling, get_stop(body))
    grammar = get_str(body, "grammar", "")
    rid = "cmpl-" + uuid.uuid4().hex
    created = int(time.time())
    name = body.get("model") or cfg.name
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
            chunks = _stream(entry, reqs, n, n_logprobs, rid, created, name, echo, body)
            return Response(held(cfg, chunks), headers=SSE_HEADERS)  # type: ignore[arg-type]
        results: list[Any] = [None] * len(reqs)

        async def one(k: int) -> None:
            results[k] = await collect(entry, reqs[k][2])

        async with choice_nursery() as nursery:
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


async def _stream(entry: LoadedModel, reqs: list[tuple[int, str, EngineRequest]], n: int, n_logprobs: int | None,
                  rid: str, created: int, model: str, echo: bool, body: dict[str, Any]) -> AsyncIterator[bytes]:
    """Every choice of every prompt (index k = prompt * n + choice, as without streaming), with
    logprobs in each chunk when asked for; usage counts each prompt once."""
    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return sse_data({"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices, **extra})

    opts = body.get("stream_options")
    include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
    usages: dict[int, Usage] = {}

    async def choice(k: int, prompt_text: str, req: EngineRequest) -> AsyncIterator[bytes]:
        offset = len(prompt_text) if echo else 0  # text_offset counts from the start of the choice's text
        if echo:
            yield chunk([{"index": k, "text": prompt_text, "logprobs": None, "finish_reason": None}])
        async with generation(entry, req) as events:
            async for ev in events:
                if isinstance(ev, TextDelta):
                    lp = None
                    if n_logprobs is not None and ev.logprobs:
                        lp = _completion_logprobs(entry, list(ev.logprobs), offset)
                        offset += sum(len(t) for t in lp["tokens"])
                    if ev.text or lp:
                        yield chunk([{"index": k, "text": ev.text, "logprobs": lp, "finish_reason": None}])
                    continue
                if ev.error is not None:
                    raise ev.error
                usages[k] = ev.usage
                yield chunk([{"index": k, "text": "", "logprobs": None, "finish_reason": ev.reason.value}])

    try:
        async with aclosing(merge_choices([choice(k, text, req) for k, (_, text, req) in enumerate(reqs)])) as frames:
            async for frame in frames:
                yield frame
        if include_usage:
            done = [usages[k] for k in sorted(usages)]
            yield chunk([], usage=usage_json(Usage(sum(u.prompt_tokens for u in done[::n]),
                                                   sum(u.completion_tokens for u in done))))
    except PylocalaiError as exc:
        yield sse_data(errors_openai.error_body(exc))
    yield SSE_DONE


@bp.post("/v1/edits")
@bp.post("/edits")
async def edits() -> tuple[Any, int]:
    body = await read_json()
    cfg = resolve_model(body, "edit")
    instruction = get_str(body, "instruction", required=True)
    inputs = _prompts(body, "input") if body.get("input") is not None else [""]
    sampling = sampling_for(cfg, request_sampling(body), get_stop(body))
    async with registry().use(cfg) as entry:
        results = []
        for text in inputs:
            toks = await tokenize(entry, render_edit(cfg, instruction, text))
            results.append(await collect(entry, make_request(toks, sampling)))
    return {"id": "edit-" + uuid.uuid4().hex, "object": "edit", "created": int(time.time()), "model": body.get("model") or cfg.name,
            # finish_reason is null on edits (LocalAI's wire shape)
            "choices": [{"index": i, "text": t, "finish_reason": None} for i, (t, _, _) in enumerate(results)],
            # each input is a prompt of its own: their prompt tokens add up
            "usage": usage_json(Usage(sum(f.usage.prompt_tokens for _, f, _ in results),
                                      sum(f.usage.completion_tokens for _, f, _ in results)))}, 200


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "pylocalai"}


def _listed_models() -> list[str]:
    """Every model name, or those that `?filter=REGEX` matches (LocalAI's filter on config names)."""
    names = registry().names()
    pattern = request.args.get("filter")
    if not pattern:
        return names
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise InvalidRequestError(f"'filter' is not a valid regular expression: {exc}", param="filter") from None
    return [n for n in names if rx.search(n)]


@bp.get("/v1/models")
@bp.get("/models")
async def list_models() -> tuple[Any, int]:
    return {"object": "list", "data": [_model_object(n) for n in _listed_models()]}, 200


@bp.get("/v1/models/capabilities")
@bp.get("/models/capabilities")
async def model_capabilities() -> tuple[Any, int]:
    """LocalAI's superset of /v1/models: what each model can be asked to do, and which inputs it takes."""
    catalog = registry().catalog
    data = []
    for name in _listed_models():
        cfg = catalog.get(name)
        if cfg is not None and cfg.alias:
            cfg = catalog.get(cfg.alias)  # an alias takes what its target takes
        multimodal = cfg is not None and cfg.mmproj is not None
        data.append({**_model_object(name),
                     "capabilities": ["chat", "completion", "edit", "embeddings", "tokenize"],
                     "input_modalities": ["text", "image", "audio"] if multimodal else ["text"],
                     "output_modalities": ["text"]})
    return {"object": "list", "data": data}, 200


@bp.get("/v1/models/<path:model>")
@bp.get("/models/<path:model>")
async def retrieve_model(model: str) -> tuple[Any, int]:
    if registry().catalog.get(model) is None:
        raise ModelNotFoundError(f"model {model!r} not found. To see available models, call GET /v1/models",
                                 param="model")
    return _model_object(model), 200


def _embedding_inputs(body: dict[str, Any]) -> list[str | list[int]]:
    """OpenAI's input forms: a string, strings, one token array, or token arrays."""
    v = body.get("input")
    if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        return [list(v)]
    if isinstance(v, list) and v and all(isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool)
                                                                          for t in x) for x in v):
        return [list(x) for x in v]
    if isinstance(v, list) and v and not all(isinstance(x, str) for x in v):
        raise InvalidRequestError("'input' must be a string, an array of strings, an array of token ids or an array "
                                  "of token-id arrays", param="input")
    return list(_prompts(body, "input"))


def _encoded(vector: Any, encoding: str) -> Any:
    if encoding == "base64":  # little-endian float32, as OpenAI sends it
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return [float(x) for x in vector]


@bp.post("/v1/embeddings")
@bp.post("/embeddings")
async def embeddings() -> tuple[Any, int]:
    body = await read_json()
    cfg = resolve_model(body, "embeddings")
    inputs = _embedding_inputs(body)
    encoding = get_str(body, "encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise InvalidRequestError("'encoding_format' must be float or base64", param="encoding_format")
    dimensions = get_int(body, "dimensions", lo=1)
    async with registry().use(cfg) as entry:
        if dimensions is not None and dimensions != entry.llm.info["n_embd"]:
            raise InvalidRequestError(f"this model's embeddings have {entry.llm.info['n_embd']} dimensions; it cannot "
                                      f"give {dimensions}", param="dimensions")
        vectors = await entry.llm.aembed(inputs)
        n_tokens = sum([len(t) if isinstance(t, list) else len(await tokenize(entry, t)) for t in inputs])
    return {"object": "list", "model": body.get("model") or cfg.name,
            "data": [{"object": "embedding", "index": i, "embedding": _encoded(v, encoding)} for i, v in enumerate(vectors)],
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
