"""The direct Python API: `Llama(model_path).generate(...)`, `chat(...)`, `embed(...)`.

One engine thread per Llama runs the continuous-batching scheduler, so generations started from
several threads (or Trio tasks, through the `a*` variants) share each decoded batch. Leaving a
stream early cancels its request and frees its slot.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from pylocalai._engines import release_openmp_team
from pylocalai.engine import ik_options
from pylocalai.engine.backend import engine_key, has_gpu, load_engine, map_engine_errors
from pylocalai.engine.chat import ChatPlan, parse_answer, plan_chat
from pylocalai.engine.cpus import default_threads
from pylocalai.engine.media import (
    MediaRef,
    message_media,
    split_messages,
    without_media,
)
from pylocalai.engine.scheduler import Scheduler
from pylocalai.engine.types import (
    EngineRequest,
    Finished,
    FinishReason,
    GenerationEvent,
    MediaSpan,
    SamplingParams,
    TextDelta,
    TokenLogprob,
    Usage,
)
from pylocalai.engine.worker import EngineWorker
from pylocalai.errors import (
    ContextLengthError,
    EngineError,
    InvalidRequestError,
    PylocalaiError,
)

_FLASH_ATTN = {"auto": -1, "off": 0, "on": 1, False: 0, True: 1, -1: -1}  # 0 and 1 equal False and True
_SAMPLING_FIELDS = frozenset(SamplingParams.__dataclass_fields__)


@dataclass(frozen=True, slots=True)
class Chunk:
    """One piece of a generation stream. The last chunk carries finish_reason and usage."""

    text: str
    tokens: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None
    stop_sequence: str | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    tokens: tuple[int, ...]
    finish_reason: str
    usage: Usage
    logprobs: tuple[TokenLogprob, ...] = ()
    stop_sequence: str | None = None


@dataclass(frozen=True, slots=True)
class ChatResult:
    """An assistant message parsed by the model's chat format (tool calls, reasoning split out)."""

    message: dict[str, Any]
    finish_reason: str
    usage: Usage
    raw_text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def sampling_from(kwargs: dict[str, Any]) -> SamplingParams:
    """Build SamplingParams from keyword arguments, naming any unknown one."""
    unknown = set(kwargs) - _SAMPLING_FIELDS
    if unknown:
        raise InvalidRequestError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}", param=sorted(unknown)[0])
    kw = dict(kwargs)
    if isinstance(kw.get("stop"), str):
        kw["stop"] = (kw["stop"],)
    for key in ("stop", "grammar_triggers", "preserved_tokens"):
        if key in kw and kw[key] is not None:
            kw[key] = tuple(kw[key])
    if "logit_bias" in kw and kw["logit_bias"] is not None:
        lb = kw["logit_bias"]
        items = lb.items() if isinstance(lb, dict) else lb
        kw["logit_bias"] = tuple((int(t), float(b)) for t, b in items)
    return SamplingParams(**{k: v for k, v in kw.items() if v is not None})


def _chunk(ev: GenerationEvent) -> Chunk:
    if isinstance(ev, TextDelta):
        return Chunk(ev.text, ev.tokens, ev.logprobs)
    if ev.error is not None:
        raise ev.error
    return Chunk("", finish_reason=ev.reason.value, usage=ev.usage, stop_sequence=ev.stop_sequence)


class Llama:
    """A loaded model with its own engine thread.

    Parameters follow llama.cpp's names: n_ctx (0 = the model's training context), n_batch,
    n_ubatch, n_threads / n_threads_batch (default: the physical cores this process may use, within
    its container's CPU quota; see engine/cpus.py), n_parallel (slots decoded together),
    flash_attn ("auto" | "on" | "off"), cache_type_k / cache_type_v ("f16", "q8_0", ...),
    kv_unified, swa_full, n_gpu_layers (-1 = all), main_gpu, tensor_split, use_mmap, use_mlock,
    check_tensors, rope_freq_base, rope_freq_scale, rpc_servers, backend ("llama-cpp" or
    "ik-llama-cpp").

    With backend="ik-llama-cpp", ik_llama.cpp's own knobs are keyword arguments too (see
    pylocalai.engine.ik_options.KNOBS): repack_tensors, fused_up_gate, attn_max_batch, mla, ...
    Unset knobs keep ik's defaults; a knob that cannot work here is a clear error. trace_ops=True
    records the ops of every computed graph (op_counts()), which shows such knobs taking effect.

    n_ctx is the whole KV cache. With kv_unified=False (the default) each of the n_parallel
    sequences owns n_ctx / n_parallel of it, and a sequence's results do not depend on what else is
    in the batch (greedy output is identical alone or batched). kv_unified=True lets sequences
    share one n_ctx-sized cache, at the cost of that batch invariance: a sequence's cells then land
    at positions that depend on the other sequences, which changes the summation order inside the
    attention kernels, and the per-row 8-bit quantization of activations amplifies those last-bit
    differences (measured on SmolLM2: logprobs differ by up to 0.3 within 48 tokens).

    A slot reuses the cached prefix a new prompt shares with it. Sliding-window layers (Gemma 3
    and others) keep only their last window of positions and recurrent state only the end of the
    sequence, so where a prompt leaves the cached tokens further back than that, the prefix comes
    from a checkpoint saved at the end of a prompt chunk (n_batch tokens apart; n_ctx_checkpoints
    per slot, 0 = none) or, without one, is computed again.

    cache_ram (MiB; -1 without a limit, 0 off): before a slot moves on to a prompt that keeps less
    than half of its memory, that memory is saved in host RAM, and a later prompt that shares more
    with a saved state than with any slot gets that state back instead of computing those tokens
    again.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        backend: str = "llama-cpp",
        n_ctx: int = 4096,
        n_batch: int = 512,
        n_ubatch: int = 512,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        n_parallel: int = 4,
        flash_attn: str | bool | int = "auto",
        cache_type_k: str = "f16",
        cache_type_v: str = "f16",
        kv_unified: bool = False,
        swa_full: bool = False,
        n_gpu_layers: int = -1,
        main_gpu: int = 0,
        tensor_split: Sequence[float] | None = None,
        use_mmap: bool = True,
        use_mlock: bool = False,
        check_tensors: bool = False,
        rope_freq_base: float = 0.0,
        rope_freq_scale: float = 0.0,
        rpc_servers: Sequence[str] | None = None,
        cache_prompt: bool = True,
        slot_prompt_similarity: float = 0.1,
        n_ctx_checkpoints: int = 32,
        cache_ram: int = 0,
        chat_template: str | None = None,
        op_offload: bool = True,
        context_shift: bool = False,
        warmup: bool = False,
        trace_ops: bool = False,
        mmproj: str | os.PathLike[str] | None = None,
        mmproj_use_gpu: bool = True,
        image_min_tokens: int = -1,
        image_max_tokens: int = -1,
        **engine_options: Any,
    ) -> None:
        path = os.fspath(model_path)
        if not os.path.isfile(path):
            raise InvalidRequestError(f"model file not found: {path}", param="model_path")
        if flash_attn not in _FLASH_ATTN:
            raise InvalidRequestError("flash_attn must be 'auto', 'on' or 'off'", param="flash_attn")
        if n_parallel < 1:
            raise InvalidRequestError("n_parallel must be at least 1", param="n_parallel")
        _check_rpc_servers(rpc_servers or [])
        self._engine = load_engine(backend)
        if n_threads is None or n_threads <= 0:
            n_threads = default_threads()
        if n_threads_batch is None or n_threads_batch <= 0:
            n_threads_batch = n_threads
        ik_model, ik_context = ik_options.split(engine_key(backend), engine_options,
                                                has_gpu=has_gpu(self._engine))
        self.model_path = path
        self._chat_template = chat_template or ""
        model_params = {
            "n_gpu_layers": n_gpu_layers,
            "main_gpu": main_gpu,
            "tensor_split": list(tensor_split or []),
            "use_mmap": use_mmap,
            "use_mlock": use_mlock,
            "check_tensors": check_tensors,
            "rpc_servers": list(rpc_servers or []),
            **ik_model,
        }
        ik_options.check_load(ik_model, model_params, os.path.getsize(path))
        self._model_params = model_params
        self._ctx_params = {
            "n_ctx": n_ctx,
            "n_batch": n_batch,
            "n_ubatch": n_ubatch,
            "n_seq_max": n_parallel,
            "n_threads": n_threads,
            "n_threads_batch": n_threads_batch,
            "flash_attn": _FLASH_ATTN[flash_attn],
            "type_k": cache_type_k,
            "type_v": cache_type_v,
            "kv_unified": kv_unified,
            "swa_full": swa_full,
            "rope_freq_base": rope_freq_base,
            "rope_freq_scale": rope_freq_scale,
            "op_offload": op_offload,
            "trace_ops": trace_ops,
            **ik_context,
        }
        with map_engine_errors("model_path"):
            self._model = self._engine.Model(path, model_params)
        self.info: dict[str, Any] = dict(self._model.info)
        ik_options.check_model(engine_options, self.info, flash_attn=_FLASH_ATTN[flash_attn] != 0)
        _check_cache_types(self.info, cache_type_k, cache_type_v)
        with map_engine_errors():
            self._session = self._engine.Session(self._model, self._ctx_params)
        self._projector: Any = None
        if mmproj is not None:
            self._projector = self._load_projector(os.fspath(mmproj), use_gpu=mmproj_use_gpu, n_threads=n_threads,
                                                   image_min_tokens=image_min_tokens, image_max_tokens=image_max_tokens)
        self._scheduler = Scheduler(
            self._session,
            recurrent=bool(self.info["recurrent"] or self.info["hybrid"]),
            cache_prompt=cache_prompt,
            slot_prompt_similarity=slot_prompt_similarity,
            # swa_full keeps every position in the window layers: checkpoints only for recurrent state then
            checkpoints=n_ctx_checkpoints if not swa_full or self.info["recurrent"] or self.info["hybrid"] else 0,
            context_shift=context_shift,
            cache_ram=cache_ram,
            projector=self._projector,
            kv_streams=self.engine_name != "ik_llama_cpp" and not kv_unified,
        )
        self._worker = EngineWorker(self._scheduler, name=os.path.basename(path))
        if warmup:
            self._warm_up()
        self._embed_session: Any = None
        self._embed_lock = threading.Lock()

    def _load_projector(self, path: str, *, use_gpu: bool, n_threads: int | None, image_min_tokens: int,
                        image_max_tokens: int) -> Any:
        if not os.path.isfile(path):
            raise InvalidRequestError(f"multimodal projector file not found: {path}", param="mmproj")
        if not hasattr(self._engine, "Projector"):
            raise InvalidRequestError(f"the {self.engine_name} engine cannot load a multimodal projector (mmproj); "
                                      "use backend llama-cpp for images and audio", param="mmproj")
        params = {"use_gpu": use_gpu, "n_threads": n_threads or -1, "image_min_tokens": image_min_tokens,
                  "image_max_tokens": image_max_tokens}
        with map_engine_errors("mmproj"):
            return self._engine.Projector(self._model, path, params)

    @property
    def multimodal(self) -> dict[str, bool]:
        """What media the model takes through its projector: {"vision": ..., "audio": ...}."""
        p = self._projector
        return {"vision": bool(p and p.vision), "audio": bool(p and p.audio)}

    def _warm_up(self) -> None:
        """One short generation so the first request does not pay for graph setup and page-in;
        its cache and its request counts are then dropped."""
        first = self.info["bos"] if self.info["bos"] >= 0 else 0
        self.complete([first], max_tokens=1, temperature=0.0, ignore_eos=True)
        self._worker.call(self._scheduler.drop_idle_caches)
        self._worker.call(self._scheduler.forget_requests)

    # ------------------------------------------------------------ lifecycle

    @property
    def engine_name(self) -> str:
        """The engine module this model runs on: "llama_cpp" or "ik_llama_cpp"."""
        return str(self._engine.__name__.rsplit(".", 1)[-1])

    @property
    def on_gpu(self) -> bool:
        """Whether layers run on a GPU: the engine was built with a GPU backend (CUDA, HIP, Vulkan, ...)
        and n_gpu_layers is not 0. There, results depend a little on how many rows the kernels compute
        at once (batching, prefix reuse), as they do in llama.cpp's own server; on the CPU they do not."""
        return has_gpu(self._engine) and self._model_params["n_gpu_layers"] != 0

    @property
    def n_ctx(self) -> int:
        return int(self._session.n_ctx)

    @property
    def n_threads(self) -> tuple[int, int]:
        """(threads for decode, threads for prompt batches) the context computes with."""
        return int(self._ctx_params["n_threads"]), int(self._ctx_params["n_threads_batch"])

    @property
    def n_ctx_seq(self) -> int:
        return int(self._session.n_ctx_seq)

    def op_counts(self) -> dict[str, int]:
        """With trace_ops=True: how often each graph op ran since the last reset, matrix products
        keyed with their weight type ("MUL_MAT:q8_0"). Empty without tracing."""
        return dict(self._session.op_counts())

    def weights_used(self) -> set[str]:
        """With trace_ops=True: the names of the weight tensors the traced ops read."""
        return set(self._session.weights_used())

    def reset_op_counts(self) -> None:
        self._session.reset_op_counts()

    @property
    def scheduler(self) -> Scheduler:
        return self._scheduler

    @property
    def worker(self) -> EngineWorker:
        return self._worker

    def close(self) -> None:
        """Stop the engine thread (running generations finish with an error) and free the model: its
        memory (and the buffers it holds on GPUs or RPC servers) is released now, not whenever the
        garbage collector gets to this object. Using the model afterwards is an EngineError."""
        self._worker.close()
        if not self._worker.stopped:  # closed from the engine thread itself: it still holds the session
            return
        with self._embed_lock:
            self._embed_session = None
        self._scheduler.release_session()
        self._session = self._projector = self._model = _CLOSED

    def __enter__(self) -> Llama:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ tokens

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        with map_engine_errors("text"):
            return [int(t) for t in self._model.tokenize(text, add_special, parse_special)]

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        with map_engine_errors("tokens"):
            raw = self._model.detokenize(np.asarray(tokens, dtype=np.int32), False, special)
        return bytes(raw).decode("utf-8", errors="replace")

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        with map_engine_errors("token"):
            return bytes(self._model.token_to_piece(token, special))

    # ------------------------------------------------------------ generation

    def tokenize_media(self, prompt: str, files: Sequence[bytes]) -> tuple[list[int], tuple[MediaSpan, ...]]:
        """Tokenize a prompt whose MEDIA_MARKERs stand for files (encoded images or audio), in order.

        Returns the tokens, in which each item takes its positions as placeholder ids (negative,
        derived from its content), and the spans that say where each item is."""
        if not files:
            return self.tokenize(prompt), ()
        if self._projector is None:
            raise InvalidRequestError("this model cannot take images or audio (it has no multimodal projector)",
                                      param="messages")
        files = [bytes(f) for f in files]
        with map_engine_errors("messages"):
            segments = self._projector.tokenize(prompt, files, True, True)
        # the placeholder comes from the file's own bytes (ik's libmtmd gives every image the same id)
        digests = iter(hashlib.sha256(f).digest() for f in files)
        tokens: list[int] = []
        spans: list[MediaSpan] = []
        for seg in segments:
            if isinstance(seg, np.ndarray):
                tokens.extend(int(t) for t in seg)
                continue
            placeholder = -1 - (int.from_bytes(next(digests)[:4], "little") & 0x7FFFFFFF)
            spans.append(MediaSpan(len(tokens), int(seg.n_pos), seg))
            tokens.extend([placeholder] * int(seg.n_pos))
        return tokens, tuple(spans)

    def _request(self, prompt: str | Sequence[int], sampling: SamplingParams,
                 media: Sequence[MediaRef] = ()) -> EngineRequest:
        if media:
            if not isinstance(prompt, str):
                raise InvalidRequestError("a prompt with media must be text", param="prompt")
            tokens, spans = self.tokenize_media(prompt, [m.load() for m in media])
            return EngineRequest(uuid.uuid4().hex, tuple(tokens), sampling, spans)
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        return EngineRequest(uuid.uuid4().hex, tuple(tokens), sampling)

    def generate(self, prompt: str | Sequence[int], **sampling: Any) -> Iterator[Chunk]:
        """Stream a completion of a raw prompt (text, tokenized with BOS and special tokens, or ids)."""
        req = self._request(prompt, sampling_from(sampling))
        with self._worker.stream_sync(req) as events:
            for ev in events:
                yield _chunk(ev)

    def complete(self, prompt: str | Sequence[int], **sampling: Any) -> Completion:
        """generate() to its end, as one result (handed over once: no wake-up per token)."""
        req = self._request(prompt, sampling_from(sampling))
        with self._worker.stream_sync(req, whole=True) as events:
            return _collect(_chunk(ev) for ev in events)

    async def agenerate(self, prompt: str | Sequence[int], **sampling: Any) -> AsyncIterator[Chunk]:
        """Trio variant of generate; close it (or use contextlib.aclosing) to cancel early."""
        req = await trio.to_thread.run_sync(self._request, prompt, sampling_from(sampling))
        async with self._worker.stream_trio(req) as events:
            async for ev in events:
                yield _chunk(ev)

    async def acomplete(self, prompt: str | Sequence[int], **sampling: Any) -> Completion:
        req = await trio.to_thread.run_sync(self._request, prompt, sampling_from(sampling))
        async with self._worker.stream_trio(req, whole=True) as events:
            chunks = [_chunk(ev) async for ev in events]
        return _collect(chunks)

    # ------------------------------------------------------------ chat

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        tool_choice: str = "auto",
        parallel_tool_calls: bool = False,
        add_generation_prompt: bool = True,
        enable_thinking: bool = True,
        json_schema: dict[str, Any] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Render messages with the model's jinja chat template (llama.cpp's chat library).

        Returns the prompt plus what generation needs: the grammar llama.cpp derives for the
        template's tool-call syntax or a response schema, lazy-grammar triggers, extra stop
        strings, and the format and parser that read the answer back.
        """
        kwargs = {k: json.dumps(v) for k, v in (template_kwargs or {}).items()}
        if json_schema:
            with map_engine_errors("response_format"):  # a schema llama.cpp cannot turn into a grammar is that field's fault
                self._engine.json_schema_to_grammar(json.dumps(json_schema))
        with map_engine_errors("messages"):
            return dict(
                self._model.chat_apply(
                    json.dumps(list(messages)),
                    json.dumps(list(tools)) if tools else "",
                    tool_choice,
                    parallel_tool_calls,
                    add_generation_prompt,
                    enable_thinking,
                    json.dumps(json_schema) if json_schema else "",
                    "",
                    self._chat_template,
                    kwargs,
                )
            )

    # ChatEngine protocol (pylocalai.engine.chat)
    def render_chat(self, messages: Sequence[dict[str, Any]], *, tools: Sequence[dict[str, Any]] | None,
                    tool_choice: str, parallel_tool_calls: bool, json_schema: dict[str, Any] | None,
                    enable_thinking: bool, template_kwargs: dict[str, Any] | None) -> dict[str, Any]:
        return self.apply_chat_template(messages, tools=tools, tool_choice=tool_choice,
                                        parallel_tool_calls=parallel_tool_calls, json_schema=json_schema,
                                        enable_thinking=enable_thinking, template_kwargs=template_kwargs)

    def schema_grammar(self, schema: dict[str, Any]) -> str:
        with map_engine_errors("json_schema"):
            return str(self._engine.json_schema_to_grammar(json.dumps(schema)))

    def parse_rendered(self, text: str, rendered: dict[str, Any], *, is_partial: bool) -> dict[str, Any]:
        with map_engine_errors():
            out = self._model.chat_parse(
                text, rendered["format"], rendered["parser"], rendered["generation_prompt"], True, True, is_partial
            )
        return dict(json.loads(out))

    def single_token_ids(self, texts: Sequence[str]) -> list[int]:
        out = []
        for text in texts:
            ids = self.tokenize(text, add_special=False, parse_special=True)
            if len(ids) == 1:
                out.append(ids[0])
        return out

    def _plan(self, messages: Sequence[dict[str, Any]], options: dict[str, Any], sampling: dict[str, Any]) -> tuple[EngineRequest, ChatPlan]:
        messages = split_messages(messages)  # image_url / input_audio parts → markers + media
        plan = plan_chat(self, without_media(messages), **options)
        return self._request(plan.prompt, sampling_from(plan.sampling_with(sampling)), message_media(messages)), plan

    def chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        *,
        tool_choice: str | dict[str, Any] = "auto",
        parallel_tool_calls: bool = False,
        json_schema: dict[str, Any] | None = None,
        enable_thinking: bool = True,
        **sampling: Any,
    ) -> ChatResult:
        """One assistant turn through the model's chat template; tool calls come back parsed.

        tool_choice "required" or {"type": "function", "function": {"name": ...}} forces a call with
        a grammar; "auto" lets the model choose; json_schema constrains a text answer.
        """
        options = {"tools": tools, "tool_choice": tool_choice, "parallel_tool_calls": parallel_tool_calls,
                   "json_schema": json_schema, "enable_thinking": enable_thinking}
        req, plan = self._plan(messages, options, sampling)
        with self._worker.stream_sync(req, whole=True) as events:
            return self._chat_result(list(events), plan)

    async def achat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        *,
        tool_choice: str | dict[str, Any] = "auto",
        parallel_tool_calls: bool = False,
        json_schema: dict[str, Any] | None = None,
        enable_thinking: bool = True,
        **sampling: Any,
    ) -> ChatResult:
        options = {"tools": tools, "tool_choice": tool_choice, "parallel_tool_calls": parallel_tool_calls,
                   "json_schema": json_schema, "enable_thinking": enable_thinking}
        req, plan = await trio.to_thread.run_sync(self._plan, messages, options, sampling)
        async with self._worker.stream_trio(req, whole=True) as recv:
            events = [ev async for ev in recv]
        return await trio.to_thread.run_sync(self._chat_result, events, plan)

    def chat_stream(self, messages: Sequence[dict[str, Any]], **sampling: Any) -> Iterator[Chunk]:
        """Stream the raw text of one assistant turn (no tools; use chat() to get parsed tool calls)."""
        req, _ = self._plan(messages, {}, sampling)
        with self._worker.stream_sync(req) as events:
            for ev in events:
                yield _chunk(ev)

    def _chat_result(self, events: list[GenerationEvent], plan: ChatPlan) -> ChatResult:
        text = "".join(ev.text for ev in events if isinstance(ev, TextDelta))
        fin = events[-1]
        assert isinstance(fin, Finished)
        if fin.error is not None:
            raise fin.error
        message = parse_answer(self, plan, text)
        calls = list(message.get("tool_calls") or [])
        reason = FinishReason.TOOL_CALLS.value if calls and fin.reason is FinishReason.STOP else fin.reason.value
        return ChatResult(message, reason, fin.usage, raw_text=text, tool_calls=calls)

    # ------------------------------------------------------------ embeddings

    def embed(self, texts: str | Sequence[str] | Sequence[Sequence[int]], *, normalize: bool = True) -> np.ndarray:
        """One pooled embedding per input, a text or a list of token ids (the model's pooling; mean over
        tokens when it has none). An input may be as long as one sequence's context."""
        items: list[Any] = [texts] if isinstance(texts, str) else list(texts)
        if not items:
            raise InvalidRequestError("no input to embed", param="input")
        n_vocab = self.info["n_vocab"]
        token_lists = []
        for i, item in enumerate(items):
            toks = self.tokenize(item) if isinstance(item, str) else [int(t) for t in item]
            if not toks or not all(0 <= t < n_vocab for t in toks):
                raise InvalidRequestError(f"input {i} is empty or has token ids outside the vocabulary", param="input")
            token_lists.append(toks)
        with self._embed_lock:
            if self._embed_session is None:
                n = max(512, self._ctx_params["n_batch"], self.n_ctx_seq)
                params = dict(self._ctx_params, embeddings=True, n_seq_max=1, n_ctx=min(n, self.info["n_ctx_train"] or n))
                params["n_batch"] = params["n_ubatch"] = params["n_ctx"]
                with map_engine_errors():
                    self._embed_session = self._engine.Session(self._model, params)
            limit = int(self._embed_session.n_ctx_seq)
            for i, toks in enumerate(token_lists):
                if len(toks) > limit:
                    raise ContextLengthError(f"input {i} has {len(toks)} tokens, but embeddings take at most {limit}",
                                             param="input")
            rows = []
            try:
                for toks in token_lists:
                    with map_engine_errors("input"):
                        rows.append(np.asarray(self._embed_session.embed(np.asarray(toks, dtype=np.int32), normalize)))
            finally:
                release_openmp_team()  # this caller's thread computed: its OpenMP team goes (see _engines)
        return np.stack(rows)

    async def aembed(self, texts: str | Sequence[str] | Sequence[Sequence[int]], *, normalize: bool = True) -> np.ndarray:
        return await trio.to_thread.run_sync(lambda: self.embed(texts, normalize=normalize))


class _Closed:
    """Stands for the native model, session and projector of a closed Llama."""

    def __getattr__(self, name: str) -> Any:
        raise EngineError("this model is closed")

    def __bool__(self) -> bool:
        return False


_CLOSED: Any = _Closed()


def _check_cache_types(info: dict[str, Any], type_k: str, type_v: str) -> None:
    """A quantized KV cache stores each head's row in 32-value blocks: heads of another size would
    trip an assertion inside the engine (a process abort), so refuse them here."""
    meta = info.get("metadata") or {}
    arch = info.get("architecture", "")

    def num(key: str) -> int:
        try:
            return int(meta.get(f"{arch}.{key}", 0))
        except ValueError:
            return 0

    n_head = num("attention.head_count")
    fallback = num("embedding_length") // n_head if n_head else 0
    for param, name, key in (("cache_type_k", type_k, "attention.key_length"),
                             ("cache_type_v", type_v, "attention.value_length")):
        head = num(key) or fallback
        if name not in ("f32", "f16", "bf16") and head and head % 32:
            raise InvalidRequestError(f"{param} {name} stores 32-value blocks, but this model's attention heads "
                                      f"have {head} values; use f16", param=param)


def _check_rpc_servers(servers: Sequence[str], timeout_s: float = 5.0) -> None:
    """Reach every ggml RPC server first: the engine aborts the process on a failed connection."""
    for endpoint in servers:
        host, sep, port = endpoint.rpartition(":")
        if not sep or not port.isdigit():
            raise InvalidRequestError(f"RPC server {endpoint!r} is not host:port", param="rpc_servers")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
        except OSError as exc:
            raise EngineError(f"cannot reach RPC server {endpoint}: {exc}") from exc


def _collect(chunks: Iterable[Chunk]) -> Completion:
    text: list[str] = []
    tokens: list[int] = []
    logprobs: list[TokenLogprob] = []
    for c in chunks:
        text.append(c.text)
        tokens.extend(c.tokens)
        logprobs.extend(c.logprobs)
        if c.finish_reason is not None:
            assert c.usage is not None
            return Completion("".join(text), tuple(tokens), c.finish_reason, c.usage, tuple(logprobs), c.stop_sequence)
    raise PylocalaiError("generation ended without a finish event")
