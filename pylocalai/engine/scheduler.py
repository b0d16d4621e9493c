"""Continuous batching over one engine Session. Synchronous and thread-free.

Each `step()` builds one batch for the whole engine: first one token for every generating slot,
then prompt chunks of prefilling slots up to n_batch, and makes one C++ call (decode + sample for
every slot, GIL released). Slots keep a mirror of the tokens in their KV sequence, so a new request
reuses the longest common prefix of an idle slot's cache. The direct Python API and the server's
worker drive this same class.

Where every active slot is generating and the caller allows it (`step(max_steps=N)`), one C++ call
runs up to N such steps back to back (Session.run), each feeding the sampled tokens back, and ends
at the first step where a sequence may finish; the events are the same as N single steps give.

With a host-RAM prompt cache (cache_ram), the whole memory of a slot that moves on to an unrelated
prompt (one that keeps less than half of it) is saved first, and a later prompt that shares more
with a saved state than with any slot gets that state back (as llama-server's --cache-ram does).

Some memory cannot simply be cut back to a prefix: sliding-window layers (Gemma 3, ...) drop the
positions that fall out of their window, and recurrent state holds only the end of the sequence.
A prefix is reused only where the memory still holds what its continuation needs; otherwise from a
checkpoint (that part of the memory saved at the end of a prompt chunk, where the engine can save it),
or not at all.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from pylocalai.engine.textstream import TextAssembler
from pylocalai.engine.types import (
    EngineRequest,
    Finished,
    MediaSpan,
    FinishReason,
    GenerationEvent,
    TextDelta,
    TokenLogprob,
    Usage,
)
from pylocalai.errors import ContextLengthError, EngineError, InvalidRequestError

log = logging.getLogger(__name__)


class SessionLike(Protocol):
    """What the scheduler needs of an engine Session (the compiled one, or a fake in tests)."""

    @property
    def n_ctx_seq(self) -> int: ...
    @property
    def n_batch(self) -> int: ...
    @property
    def n_seq_max(self) -> int: ...
    def set_sampler(self, seq: int, params: dict[str, Any], history: Any) -> None: ...
    def drop_sampler(self, seq: int) -> None: ...
    def step(self, tokens: Any, pos: Any, seq_ids: Any, want_sample: Any, notify_fd: int = -1) -> tuple[int, list[Any]]: ...
    def seq_rm(self, seq: int, p0: int, p1: int) -> bool: ...
    def seq_add(self, seq: int, p0: int, p1: int, delta: int) -> None: ...
    # optional (getattr): seq_pos_min(seq) and n_swa for sliding-window models; checkpoints_supported,
    # checkpoint_save(seq) -> bytes, checkpoint_load(seq, data) -> bool; run(tokens, pos, seq_ids,
    # remaining, stop_on_eog, max_steps, notify_fd) -> (status, steps, rows, error), interrupt() and
    # clear_interrupt() for several steps in one call


class SlotState(enum.Enum):
    IDLE = "idle"
    PREFILL = "prefill"
    GENERATING = "generating"


@dataclass(slots=True)
class _Checkpoint:
    n_tokens: int  # it restores the memory that could not be cut back as it was after this many tokens
    data: bytes    # exactly then: a sliding window holds only the positions the next token attends to


@dataclass(slots=True, eq=False)  # compared by identity (list.remove)
class _Saved:
    """A slot's whole memory, kept in host RAM after the slot moved on to another prompt."""

    tokens: np.ndarray  # int32: the tokens it holds
    data: bytes
    checkpoints: list[_Checkpoint]
    pos_min: int  # the oldest position its sliding-window layers still held (0 without them)

    @property
    def size(self) -> int:
        return len(self.data) + sum(len(c.data) for c in self.checkpoints)


@dataclass(slots=True)
class _Slot:
    seq: int
    state: SlotState = SlotState.IDLE
    cached: list[int] = field(default_factory=list)  # mirror of this sequence's KV contents
    req: EngineRequest | None = None
    prompt_pos: int = 0  # next prompt index to decode
    n_reused: int = 0
    n_generated: int = 0
    last_token: int = -1
    text: TextAssembler | None = None
    pending_tokens: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    last_used: float = 0.0
    checkpoints: list[_Checkpoint] = field(default_factory=list)  # by n_tokens, ascending


@dataclass(slots=True)
class SchedulerStats:
    steps: int = 0
    tokens_decoded: int = 0
    multi_step_calls: int = 0  # native calls that ran one or more of those steps on their own (Session.run)
    max_seqs_per_step: int = 0  # most sequences that shared one decode (continuous batching at work)
    kv_full_retries: int = 0
    context_shifts: int = 0
    checkpoints_saved: int = 0
    checkpoints_restored: int = 0
    prefix_dropped: int = 0  # prompts whose cached prefix could not be reused (window or state gone)
    ram_saved: int = 0  # slot states saved to the host-RAM prompt cache
    ram_restored: int = 0  # ... and brought back for a prompt that shares more with them
    ram_bytes: int = 0  # what the saved states take now
    engine_time_s: float = 0.0  # inside the native step (decode + sampling), GIL released
    requests: int = 0  # requests finished, whatever the reason
    prompt_tokens: int = 0  # ... their prompt tokens
    prompt_tokens_reused: int = 0  # ... of which came from a slot's cache (not computed)
    tokens_generated: int = 0  # ... and the tokens they generated
    finish_reasons: dict[str, int] = field(default_factory=dict)


class Scheduler:
    """Admits requests into slots, runs batched steps and turns samples into events.

    Contract: `submit` validates and queues; `step` returns `(request_id, events)` pairs, where a
    request's last event is always `Finished`; `cancel` finishes a request at once (its slot is
    free for the next step). Not thread-safe: one thread drives it.
    """

    def __init__(
        self,
        session: SessionLike,
        *,
        n_slots: int | None = None,
        recurrent: bool = False,
        slot_prompt_similarity: float = 0.1,
        cache_prompt: bool = True,
        context_shift: bool = False,
        projector: Any = None,
        kv_streams: bool = True,
        checkpoints: int = 32,
        cache_ram: int = 0,
    ) -> None:
        self._session = session
        self._projector = projector  # the engine's Projector: evaluates a prompt's media items
        self._n_ctx_seq = int(session.n_ctx_seq)
        self._n_batch = int(session.n_batch)
        n = int(session.n_seq_max) if n_slots is None else n_slots
        if n < 1 or n > int(session.n_seq_max):
            raise InvalidRequestError(f"n_slots must be 1..{session.n_seq_max}", param="n_slots")
        self._slots = [_Slot(seq=i) for i in range(n)]
        self._queue: deque[EngineRequest] = deque()
        self._by_id: dict[str, _Slot] = {}
        self._recurrent = recurrent
        self._similarity = slot_prompt_similarity
        self._cache_prompt = cache_prompt
        self._prefill_budget = self._n_batch
        self._context_shift = context_shift
        self.notified = False  # the last step's native call woke its notify_fd
        self._kv_streams = kv_streams  # one KV stream per sequence (llama.cpp, not unified): keep ids consecutive
        self._n_swa = int(getattr(session, "n_swa", 0) or 0)
        # checkpoints per slot, where some memory cannot be cut back and the engine can save it alone
        can_save = bool(getattr(session, "checkpoints_supported", False))
        self._max_checkpoints = checkpoints if can_save and (self._n_swa > 0 or recurrent) else 0
        # host-RAM prompt cache: MiB (-1 without a limit, 0 off), where the engine can save a sequence
        self._ram_limit = None if cache_ram < 0 else cache_ram << 20
        self._ram_on = cache_ram != 0 and cache_prompt and hasattr(session, "checkpoint_save")
        self._ram: list[_Saved] = []  # least recently saved first
        self._can_run = all(hasattr(session, f) for f in ("run", "interrupt", "clear_interrupt"))
        self._failed: EngineError | None = None  # a multi-step call's failure, raised by the next step()
        self.stats = SchedulerStats()

    # ------------------------------------------------------------ public

    @property
    def n_ctx_seq(self) -> int:
        return self._n_ctx_seq

    @property
    def graphs_reused(self) -> int:
        """Steps whose decode reused the previous compute graph (llama.cpp skips rebuilding it when the
        batch has the same shape); -1 where the engine does not count them."""
        return int(getattr(self._session, "graphs_reused", -1))

    @property
    def n_swa(self) -> int:
        """Positions a sliding-window layer attends back (0: none, or the engine keeps them all)."""
        return self._n_swa

    @property
    def n_slots(self) -> int:
        return len(self._slots)

    @property
    def active_slots(self) -> int:
        return sum(1 for s in self._slots if s.state is not SlotState.IDLE)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def has_work(self) -> bool:
        return bool(self._queue) or self.active_slots > 0

    def slot_tokens(self, seq: int) -> tuple[int, ...]:
        """The tokens mirrored in a slot's cache (tests and diagnostics)."""
        return tuple(self._slots[seq].cached)

    def check(self, req: EngineRequest) -> None:
        """Raise if the request can never run here (so callers can fail before streaming)."""
        n = len(req.prompt_tokens)
        if n == 0:
            raise InvalidRequestError("the prompt is empty (no tokens)", param="prompt")
        if n >= self._n_ctx_seq:
            raise ContextLengthError(
                f"the prompt has {n} tokens, but the context holds {self._n_ctx_seq} per sequence "
                f"(at least one more is needed to generate)",
                param="prompt",
            )
        if req.sampling.max_tokens is not None and req.sampling.max_tokens < 1:
            raise InvalidRequestError("max_tokens must be at least 1", param="max_tokens")
        if req.media:
            if self._projector is None:
                raise InvalidRequestError("this model cannot take images or audio (it has no multimodal projector)",
                                          param="messages")
            if req.media[-1].end >= n:
                raise InvalidRequestError("the prompt must go on with text after its last media item", param="messages")

    def forget_requests(self) -> None:
        """Zero the per-request counters (the load's warm-up is not a request); the engine's own
        (steps, tokens decoded, seconds) stay, as that work was done."""
        st = self.stats
        st.requests = st.prompt_tokens = st.prompt_tokens_reused = st.tokens_generated = 0
        st.finish_reasons = {}

    def submit(self, req: EngineRequest) -> None:
        self.check(req)
        self._queue.append(req)

    def cancel(self, request_id: str) -> list[tuple[str, list[GenerationEvent]]]:
        """Stop a request now; returns its final event (nothing if it already ended)."""
        for i, req in enumerate(self._queue):
            if req.request_id == request_id:
                del self._queue[i]
                return [(request_id, [Finished(FinishReason.CANCELLED, Usage(len(req.prompt_tokens), 0))])]
        slot = self._by_id.get(request_id)
        if slot is None:
            return []
        return [(request_id, self._finish(slot, FinishReason.CANCELLED))]

    def fail_all(self, error: EngineError) -> list[tuple[str, list[GenerationEvent]]]:
        """The engine broke: finish every request with the error. The memory of their slots is
        cleared with their mirrors (a failed step may have written part of its batch), so the
        slots serve the next requests from a consistent state."""
        self._failed = None  # what it was is the error every request now gets
        out: list[tuple[str, list[GenerationEvent]]] = []
        while self._queue:
            req = self._queue.popleft()
            out.append((req.request_id, [Finished(FinishReason.ERROR, Usage(len(req.prompt_tokens), 0), error=error)]))
        for slot in self._slots:
            if slot.req is not None:
                rid = slot.req.request_id
                out.append((rid, self._finish(slot, FinishReason.ERROR, error=error)))
                if self._session is not None:
                    self._session.seq_rm(slot.seq, -1, -1)
                slot.cached.clear()
                slot.checkpoints.clear()
        return out

    def interrupt(self) -> None:
        """Any thread: a multi-step call in progress (or the next) ends before its next step, so that
        what was queued since is taken in at once."""
        session = self._session
        if self._can_run and session is not None:
            session.interrupt()

    def clear_interrupt(self) -> None:
        """Before the driving thread looks for new work: interrupts from then on count."""
        if self._can_run and self._session is not None:
            self._session.clear_interrupt()

    def step(self, notify_fd: int = -1, max_steps: int = 1) -> list[tuple[str, list[GenerationEvent]]]:
        """Admit what fits, run one batched decode, return the events it produced.

        notify_fd, an eventfd, is written by the native step once it has released the GIL (see
        EngineWorker); `notified` tells afterwards whether that happened (no decode, no write).

        max_steps > 1 lets the engine run up to that many decode steps in one native call where every
        active slot is generating and nothing is queued: no Python runs between those steps. The
        call ends at the first step where any sequence may finish (end of generation, its token
        limit or context, a stop string) or once `interrupt()` was called. Meant for requests whose
        events nobody reads before they end."""
        self.notified = False
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise failed
        out: list[tuple[str, list[GenerationEvent]]] = []
        self._admit(out)
        if self._projector is not None:
            self._eval_media(out)
        if max_steps > 1 and self._can_run and not self._queue:
            generating = [s for s in self._slots if s.state is SlotState.GENERATING]
            if generating and not any(s.state is SlotState.PREFILL for s in self._slots):
                if self._run_steps(generating, max_steps, notify_fd, out):
                    return out
                notify_fd = -1  # written by the run call already
        return self._decode(out, notify_fd)

    def _run_steps(self, slots: list[_Slot], max_steps: int, notify_fd: int,
                   out: list[tuple[str, list[GenerationEvent]]]) -> bool:
        """Up to max_steps steps of the generating slots in one native call; False where the first
        found no KV room (the one-step path makes room or ends requests)."""
        remaining: list[int] = []
        stop_on_eog: list[bool] = []
        for slot in slots:
            assert slot.req is not None
            sampling = slot.req.sampling
            left = self._n_ctx_seq - len(slot.cached)  # positions before the context is full
            if sampling.max_tokens is not None:
                left = min(left, sampling.max_tokens - slot.n_generated)
            remaining.append(max(1, left))
            stop_on_eog.append(not sampling.ignore_eos)
        decoded = [slot.last_token for slot in slots]
        t0 = time.perf_counter()
        status, steps, rows, error = self._session.run(  # type: ignore[attr-defined]
            np.asarray(decoded, dtype=np.int32),
            np.asarray([len(slot.cached) for slot in slots], dtype=np.int32),
            np.asarray([slot.seq for slot in slots], dtype=np.int32),
            np.asarray(remaining, dtype=np.int32),
            np.asarray(stop_on_eog, dtype=np.uint8),
            max_steps,
            notify_fd,
        )
        self.stats.engine_time_s += time.perf_counter() - t0
        self.notified = notify_fd >= 0
        if status != 0:
            self.stats.kv_full_retries += 1
            return False
        self._prefill_budget = self._n_batch
        n = len(slots)
        st = self.stats
        st.steps += steps
        st.multi_step_calls += 1
        st.tokens_decoded += steps * n
        st.max_seqs_per_step = max(st.max_seqs_per_step, n)
        now = time.monotonic()
        for j in range(steps):
            for k, slot in enumerate(slots):
                _, token, eog, piece, logprob, top = rows[j * n + k]
                slot.cached.append(decoded[k])  # what this step decoded; it sampled `token`
                decoded[k] = token
                slot.last_used = now
                if slot.req is None:  # it ended at an earlier step (the engine missed a stop string)
                    continue
                rid = slot.req.request_id
                events = self._on_sample(slot, int(token), bool(eog), piece, float(logprob), top)
                if events:
                    out.append((rid, events))
        if error is not None:  # a later step failed: these events stand, the next step() raises it
            self._failed = EngineError(f"engine step failed: {error}")
        return True

    def _decode(self, out: list[tuple[str, list[GenerationEvent]]], notify_fd: int) -> list[tuple[str, list[GenerationEvent]]]:
        """One batched decode of what the slots need next (prompt chunks, generated tokens)."""
        while True:
            plan = self._plan()
            if plan is None:
                return out
            tokens, pos, seqs, want, decoded = plan
            t0 = time.perf_counter()
            status, rows = self._session.step(tokens, pos, seqs, want, notify_fd)
            self.stats.engine_time_s += time.perf_counter() - t0
            self.notified = self.notified or notify_fd >= 0
            notify_fd = -1
            if status == 0:
                break
            self.stats.kv_full_retries += 1
            # No room in the KV cache for this batch: make room, or shrink the prompt chunk.
            if self.drop_idle_caches():
                continue
            if any(slot.state is SlotState.PREFILL for slot, _ in decoded) and self._prefill_budget > 1:
                self._prefill_budget = max(1, self._prefill_budget // 2)
                continue
            for slot, _ in decoded:
                if slot.req is not None:
                    out.append((slot.req.request_id, self._finish(slot, FinishReason.LENGTH)))
            return out
        self._prefill_budget = self._n_batch
        self.stats.steps += 1
        self.stats.tokens_decoded += len(tokens)
        self.stats.max_seqs_per_step = max(self.stats.max_seqs_per_step, len(decoded))
        now = time.monotonic()
        for slot, toks in decoded:
            slot.cached.extend(toks)
            slot.last_used = now
            if slot.state is SlotState.PREFILL:
                slot.prompt_pos += len(toks)
                if self._max_checkpoints:
                    self._checkpoint(slot, slot.req is not None and slot.prompt_pos == len(slot.req.prompt_tokens))
        for seq, token, eog, piece, logprob, top in rows:
            slot = self._slots[seq]
            if slot.req is None:
                continue
            rid = slot.req.request_id
            events = self._on_sample(slot, int(token), bool(eog), piece, float(logprob), top)
            if events:
                out.append((rid, events))
        return out

    # ------------------------------------------------------------ admission

    def _admit(self, out: list[tuple[str, list[GenerationEvent]]]) -> None:
        while self._queue:
            idle = [s for s in self._slots if s.state is SlotState.IDLE]
            if not idle:
                return
            req = self._queue.popleft()
            slot = self._pick_slot(idle, req.prompt_tokens)
            try:
                self._start(slot, req)
            except (ValueError, RuntimeError) as exc:  # e.g. a grammar that does not parse
                slot.req = None
                slot.state = SlotState.IDLE
                err = InvalidRequestError(f"cannot start generation: {exc}", param="grammar")
                out.append((req.request_id, [Finished(FinishReason.ERROR, Usage(len(req.prompt_tokens), 0), error=err)]))
            except Exception as exc:  # a defect: this request fails (it is no longer queued), the slot starts over
                log.exception("starting a request failed")
                self._by_id.pop(req.request_id, None)
                slot.req = None
                slot.state = SlotState.IDLE
                self._session.seq_rm(slot.seq, -1, -1)
                slot.cached.clear()
                slot.checkpoints.clear()
                err = EngineError(f"cannot start generation: {exc}")
                out.append((req.request_id, [Finished(FinishReason.ERROR, Usage(len(req.prompt_tokens), 0), error=err)]))

    def _pick_slot(self, idle: list[_Slot], prompt: Sequence[int]) -> _Slot:
        reuse: dict[int, int] = {}  # seq -> prefix its memory can serve, where it is similar enough to reuse
        if self._cache_prompt:
            for slot in idle:
                lcp = _common_prefix(slot.cached, prompt)
                if lcp > 0 and lcp / len(prompt) >= self._similarity:
                    # a window or recurrent memory may serve less than it shares (only a checkpoint,
                    # or nothing): rank by what it serves, so a slot that serves nothing is not
                    # taken from the prompt its cache still serves in full
                    reuse[slot.seq] = self._reachable(slot.cached, slot.checkpoints, lcp, None, slot.seq)
        # With per-sequence KV streams llama.cpp puts only sequences with consecutive ids into one
        # ubatch: active ids {0, 2, 3} make every step two decodes ({0}, {2, 3}), each rebuilding its
        # graph. So: a long cached prefix first (it saves more than a few split steps cost, and the
        # next request fills the gap), then the slot that leaves the fewest runs of consecutive
        # active ids, then any reusable prefix, then an empty slot (the others keep their prefix
        # caches), then the lowest id.
        active = [s.seq for s in self._slots if s.state is not SlotState.IDLE] if self._kv_streams else None

        def rank(slot: _Slot) -> tuple[bool, int, int, int, bool, int]:
            lcp = reuse.get(slot.seq, 0)
            long = lcp >= _LONG_PREFIX
            runs = _runs([*active, slot.seq]) if active is not None else 0
            return (not long, -lcp if long else 0, runs, -lcp, bool(slot.cached), slot.seq)

        return min(idle, key=rank)

    def _start(self, slot: _Slot, req: EngineRequest) -> None:
        prompt = req.prompt_tokens
        keep = _usable_prefix(_common_prefix(slot.cached, prompt), req) if self._cache_prompt else 0
        if self._ram_on:
            keep = self._swap_in(slot, req, keep)
        if keep > 0 and not self._reusable(slot, keep):
            keep = self._restore(slot, keep)
        if keep < len(slot.cached):
            if keep == 0 or not self._session.seq_rm(slot.seq, keep, -1):
                self._session.seq_rm(slot.seq, -1, -1)
                keep = 0
            del slot.cached[keep:]
        while slot.checkpoints and slot.checkpoints[-1].n_tokens > keep:  # they hold tokens replaced now
            slot.checkpoints.pop()
        history = np.asarray(prompt, dtype=np.int32)
        if req.media:
            history = history[history >= 0]  # media placeholders are no tokens to penalize
        self._session.set_sampler(slot.seq, req.sampling.engine_dict(), history)
        slot.req = req
        slot.state = SlotState.PREFILL
        slot.prompt_pos = keep
        slot.n_reused = keep
        slot.n_generated = 0
        slot.last_token = -1
        slot.text = TextAssembler(req.sampling.stop)
        slot.pending_tokens = []
        slot.pending_logprobs = []
        self._by_id[req.request_id] = slot

    # ------------------------------------------------------------ host-RAM prompt cache

    def _swap_in(self, slot: _Slot, req: EngineRequest, keep: int) -> int:
        """Before the slot takes req: save what it holds if the prompt discards it, and bring back a
        saved state that serves the prompt better than the slot does. Returns the prefix to keep."""
        own = self._reachable(slot.cached, slot.checkpoints, keep, None, slot.seq)
        best: tuple[int, int, _Saved] | None = None  # (reachable, prefix, state)
        prompt = np.asarray(req.prompt_tokens, dtype=np.int32)
        for saved in self._ram:
            lcp = _usable_prefix(_array_prefix(saved.tokens, prompt), req)
            gain = self._reachable(saved.tokens, saved.checkpoints, lcp, saved.pos_min, None)
            if gain > own + _RAM_MIN_GAIN and (best is None or gain > best[0]):
                best = (gain, lcp, saved)
        if best is None:
            # Worth saving only where the prompt discards most of what the slot holds, as llama-server
            # decides (it saves when the new prompt keeps less than half). A prompt that keeps the
            # larger part (a chat's next turn, another question after the same system prompt) loses
            # a tail that is cheap to compute again, while a save copies the whole memory (36 MB for
            # Gemma 3 270M at 1,160 tokens, ~14 ms in the request's path) and fills RAM with near-copies.
            if len(slot.cached) - own >= _RAM_MIN_TOKENS and 2 * own < len(slot.cached):
                self._ram_save(slot)
            return keep
        _, lcp, saved = best
        self._ram.remove(saved)  # the state moves into the slot (before saving the slot's own: no eviction)
        self.stats.ram_bytes -= saved.size
        self._ram_save(slot)
        loaded = self._session.checkpoint_load(slot.seq, saved.data, False)
        if not loaded:  # no room in a shared cache: what idle slots hold goes to RAM, then try again
            self._session.seq_rm(slot.seq, -1, -1)
            slot.cached.clear()
            slot.checkpoints.clear()
            loaded = (not self._kv_streams and self.drop_idle_caches()
                      and self._session.checkpoint_load(slot.seq, saved.data, False))
        if not loaded:
            self._session.seq_rm(slot.seq, -1, -1)
            self._ram.append(saved)  # not lost: it serves a later prompt
            self.stats.ram_bytes += saved.size
            return 0
        slot.cached = saved.tokens.tolist()
        slot.checkpoints = saved.checkpoints
        self.stats.ram_restored += 1
        return lcp

    def _reachable(self, tokens: Sequence[int], checkpoints: list[_Checkpoint], keep: int,
                   pos_min: int | None, seq: int | None) -> int:
        """The prefix a memory holding `tokens` can serve for a prompt sharing `keep` of them."""
        if keep <= 0:
            return 0
        if self._recurrent:
            whole = keep == len(tokens)
        elif self._n_swa > 0:
            low = self._session.seq_pos_min(seq) if pos_min is None else pos_min
            whole = low <= max(0, keep - self._n_swa)
        else:
            whole = True
        if whole:
            return keep
        return max((c.n_tokens for c in checkpoints if c.n_tokens <= keep), default=0)

    def _ram_save(self, slot: _Slot) -> None:
        """Keep the slot's whole memory in host RAM (it is about to be cut back or replaced)."""
        n = len(slot.cached)
        if n < _RAM_MIN_TOKENS:
            return
        tokens = np.asarray(slot.cached, dtype=np.int32)
        for saved in self._ram:
            if len(saved.tokens) >= n and _array_prefix(saved.tokens, tokens) == n and self._covers(saved.checkpoints, n):
                return  # a saved state already serves all of it
        try:
            data = self._session.checkpoint_save(slot.seq, False)
        except (MemoryError, RuntimeError):  # an optional cache: the request goes on without it
            log.exception("saving a slot's state to host RAM failed")
            return
        if not data:
            return
        # a whole-sequence save keeps only the window's positions (older ones are masked out) even
        # where the live cache still holds a few more
        pos_min = max(int(self._session.seq_pos_min(slot.seq)), n - self._n_swa) if self._n_swa > 0 else 0
        saved = _Saved(tokens, data, list(slot.checkpoints), pos_min)
        if self._ram_limit is not None and saved.size > self._ram_limit:
            return
        for old in [s for s in self._ram if len(s.tokens) < n and _array_prefix(s.tokens, tokens) == len(s.tokens)
                    and self._covers(saved.checkpoints, len(s.tokens))]:
            self._ram.remove(old)  # the new state serves all that one did
            self.stats.ram_bytes -= old.size
        self._ram.append(saved)
        self.stats.ram_bytes += saved.size
        self.stats.ram_saved += 1
        while len(self._ram) > _RAM_MAX_STATES or (self._ram_limit is not None and self.stats.ram_bytes > self._ram_limit):
            old = self._ram.pop(0)
            self.stats.ram_bytes -= old.size

    def _covers(self, checkpoints: list[_Checkpoint], n: int) -> bool:
        """Whether a longer state serves a prefix of n tokens: where memory cuts back freely, always;
        a window or recurrent state only through a checkpoint of exactly that length."""
        if not (self._recurrent or self._n_swa > 0):
            return True
        return any(c.n_tokens == n for c in checkpoints)

    def _reusable(self, slot: _Slot, keep: int) -> bool:
        """Whether the slot's memory, cut back to its first `keep` tokens, holds all the next token needs."""
        if self._recurrent:  # recurrent state is the end of the sequence: only the whole of it is a prefix
            return keep == len(slot.cached)
        if self._n_swa > 0:
            # a sliding-window layer attends to the last n_swa positions; older ones may be gone already
            return self._session.seq_pos_min(slot.seq) <= max(0, keep - self._n_swa)
        return True

    def _restore(self, slot: _Slot, keep: int) -> int:
        """The longest prefix (at most keep) a checkpoint can bring back into the slot's memory; 0 if none.

        A checkpoint serves exactly its own length: the window it saved is what the token after it
        attends to (an earlier token would need older positions), and recurrent state is only ever
        the state after all of its tokens."""
        cp = next((c for c in reversed(slot.checkpoints) if 0 < c.n_tokens <= keep), None)
        if cp is None:
            self.stats.prefix_dropped += 1
            return 0
        target = cp.n_tokens
        # the checkpoint replaces the part that could not be cut back; the rest is cut back to target
        if not self._session.checkpoint_load(slot.seq, cp.data) or not self._session.seq_rm(slot.seq, target, -1):
            self._session.seq_rm(slot.seq, -1, -1)
            slot.cached.clear()
            slot.checkpoints.clear()
            return 0
        self.stats.checkpoints_restored += 1
        del slot.cached[target:]
        return target

    def _checkpoint(self, slot: _Slot, prompt_end: bool) -> None:
        """Save what of the slot's memory cannot be cut back, as it is after its cached tokens: at the
        prompt's end, and at most once for every n_batch positions (short chunks, when generating
        slots or a full cache shrink the budget, do not each get one)."""
        n = len(slot.cached)
        last = slot.checkpoints[-1].n_tokens if slot.checkpoints else 0
        if last >= n or (not prompt_end and n // self._n_batch <= last // self._n_batch):
            return
        try:
            data = self._session.checkpoint_save(slot.seq)
        except (MemoryError, RuntimeError):  # an optional cache: the requests go on without it
            log.exception("saving a checkpoint failed")
            return
        if not data or len(data) > _CHECKPOINT_BYTES:
            return
        slot.checkpoints.append(_Checkpoint(n, data))
        if len(slot.checkpoints) > self._max_checkpoints:
            del slot.checkpoints[0]  # the oldest (shortest prefix) goes first, as in llama-server
        # host RAM for all slots' checkpoints is bounded too (a big model's window is hundreds of MiB):
        # the oldest checkpoint of the slot that holds the most goes first
        while sum(len(c.data) for sl in self._slots for c in sl.checkpoints) > _CHECKPOINT_BYTES:
            fat = max(self._slots, key=lambda sl: sum(len(c.data) for c in sl.checkpoints))
            del fat.checkpoints[0]
        self.stats.checkpoints_saved += 1

    # ------------------------------------------------------------ batching

    def _eval_media(self, out: list[tuple[str, list[GenerationEvent]]]) -> None:
        """Encode the media items that prefilling slots have reached and decode their embeddings
        into the slots' sequences (one decode each, outside the token batch)."""
        for slot in self._slots:
            while slot.state is SlotState.PREFILL and slot.req is not None and slot.req.media:
                span = _span_at(slot.req.media, slot.prompt_pos)
                if span is None:
                    break
                pos = len(slot.cached)
                t0 = time.perf_counter()
                try:
                    self._projector.eval(self._session, span.chunk, slot.seq, pos)
                except RuntimeError as exc:
                    self._session.seq_rm(slot.seq, pos, -1)
                    if self.drop_idle_caches():  # no KV room: free the idle prefix caches and try again
                        continue
                    rid = slot.req.request_id
                    out.append((rid, self._finish(slot, FinishReason.ERROR, error=EngineError(str(exc)))))
                    self._session.seq_rm(slot.seq, -1, -1)
                    slot.cached.clear()
                    slot.checkpoints.clear()
                    break
                finally:
                    self.stats.engine_time_s += time.perf_counter() - t0
                slot.cached.extend(slot.req.prompt_tokens[span.start : span.end])
                slot.prompt_pos = span.end
                slot.last_used = time.monotonic()

    def _plan(self) -> tuple[Any, Any, Any, Any, list[tuple[_Slot, list[int]]]] | None:
        tokens: list[int] = []
        pos: list[int] = []
        seqs: list[int] = []
        want: list[int] = []
        decoded: list[tuple[_Slot, list[int]]] = []
        for slot in self._slots:
            if slot.state is SlotState.GENERATING:
                tokens.append(slot.last_token)
                pos.append(len(slot.cached))
                seqs.append(slot.seq)
                want.append(1)
                decoded.append((slot, [slot.last_token]))
        budget = min(self._n_batch - len(tokens), self._prefill_budget)
        for slot in self._slots:
            if slot.state is not SlotState.PREFILL or budget <= 0:
                continue
            assert slot.req is not None
            prompt = slot.req.prompt_tokens
            end = slot.prompt_pos + budget
            for span in slot.req.media:  # text up to the next media item (evaluated on its own)
                if span.start >= slot.prompt_pos:
                    end = min(end, span.start)
                    break
            start = len(slot.cached)
            if self._max_checkpoints:
                # chunks end on a grid of n_batch positions, so checkpoints (saved at chunk ends) lie at the
                # same positions whatever prefix a prompt began from, where later prompts can find them;
                # not where that would cut the chunk below half the budget (generating slots take some)
                grid = slot.prompt_pos + self._n_batch - start % self._n_batch
                if 2 * (grid - slot.prompt_pos) >= budget:
                    end = min(end, grid)
            chunk = list(prompt[slot.prompt_pos : end])
            if not chunk:
                continue
            last = slot.prompt_pos + len(chunk) == len(prompt)
            tokens.extend(chunk)
            pos.extend(range(start, start + len(chunk)))
            seqs.extend([slot.seq] * len(chunk))
            want.extend([0] * (len(chunk) - 1) + [1 if last else 0])
            decoded.append((slot, chunk))
            budget -= len(chunk)
        if not tokens:
            return None
        return (
            np.asarray(tokens, dtype=np.int32),
            np.asarray(pos, dtype=np.int32),
            np.asarray(seqs, dtype=np.int32),
            np.asarray(want, dtype=np.uint8),
            decoded,
        )

    def release_session(self) -> None:
        """Drop the reference to the engine session (the model is being closed); the engine thread has ended."""
        self._session = None  # type: ignore[assignment]
        self._projector = None

    def drop_idle_caches(self) -> bool:
        """Free KV held by idle slots (their prefix cache); True if anything was freed. With the
        host-RAM cache on, what they held is saved there first. Engine thread only."""
        freed = False
        for slot in self._slots:
            if slot.state is SlotState.IDLE and slot.cached:
                if self._ram_on:
                    self._ram_save(slot)
                self._session.seq_rm(slot.seq, -1, -1)
                slot.cached.clear()
                slot.checkpoints.clear()
                freed = True
        return freed

    # ------------------------------------------------------------ sampling results

    def _on_sample(
        self, slot: _Slot, token: int, eog: bool, piece: bytes, logprob: float, top: Sequence[tuple[int, float]]
    ) -> list[GenerationEvent]:
        req = slot.req
        assert req is not None and slot.text is not None
        slot.state = SlotState.GENERATING
        if eog and not req.sampling.ignore_eos:
            return self._finish(slot, FinishReason.STOP)
        slot.n_generated += 1
        slot.last_token = token
        slot.pending_tokens.append(token)
        if req.sampling.logprobs is not None:
            n_top = req.sampling.logprobs
            slot.pending_logprobs.append(TokenLogprob(token, logprob, tuple(top[:n_top]) if n_top else ()))
        text = slot.text.feed(piece)
        events: list[GenerationEvent] = []
        if slot.text.stopped_by is not None:
            if text or slot.pending_tokens:
                events.append(self._delta(slot, text))
            events.extend(self._finish(slot, FinishReason.STOP))
            return events
        if text:
            events.append(self._delta(slot, text))
        limit = req.sampling.max_tokens
        if limit is not None and slot.n_generated >= limit:
            events.extend(self._finish(slot, FinishReason.LENGTH))
        elif len(slot.cached) >= self._n_ctx_seq:  # no position left to decode it at
            if not (self._context_shift and self._shift(slot)):
                events.extend(self._finish(slot, FinishReason.LENGTH))
        return events

    def _shift(self, slot: _Slot) -> bool:
        """Context shift: drop the older half of the sequence after its first token (BOS) and move
        the rest down, so generation can go on. False when the memory cannot shift positions."""
        if slot.req is not None and slot.req.media:
            return False  # a shift could cut through a media item's embeddings
        n_keep = 1
        n_discard = (len(slot.cached) - n_keep) // 2
        if n_discard <= 0 or not self._session.seq_rm(slot.seq, n_keep, n_keep + n_discard):
            return False
        try:
            self._session.seq_add(slot.seq, n_keep + n_discard, -1, -n_discard)
        except ValueError:
            self._session.seq_rm(slot.seq, -1, -1)
            slot.cached.clear()
            slot.checkpoints.clear()
            return False
        del slot.cached[n_keep : n_keep + n_discard]
        slot.checkpoints.clear()  # they hold the positions before the shift
        self.stats.context_shifts += 1
        return True

    def _delta(self, slot: _Slot, text: str) -> TextDelta:
        delta = TextDelta(text, tuple(slot.pending_tokens), tuple(slot.pending_logprobs))
        slot.pending_tokens = []
        slot.pending_logprobs = []
        return delta

    def _finish(self, slot: _Slot, reason: FinishReason, error: EngineError | None = None) -> list[GenerationEvent]:
        req = slot.req
        assert req is not None and slot.text is not None
        events: list[GenerationEvent] = []
        stop_sequence = slot.text.stopped_by
        if reason in (FinishReason.LENGTH, FinishReason.STOP) and stop_sequence is None:
            tail = slot.text.flush()
            if tail or slot.pending_tokens:
                events.append(self._delta(slot, tail))
        events.append(
            Finished(
                reason,
                Usage(len(req.prompt_tokens), slot.n_generated, slot.n_reused),
                stop_sequence=stop_sequence,
                error=error,
            )
        )
        st = self.stats
        st.requests += 1
        st.prompt_tokens += len(req.prompt_tokens)
        st.prompt_tokens_reused += slot.n_reused
        st.tokens_generated += slot.n_generated
        st.finish_reasons[reason.value] = st.finish_reasons.get(reason.value, 0) + 1
        self._session.drop_sampler(slot.seq)
        self._by_id.pop(req.request_id, None)
        slot.req = None
        slot.text = None
        slot.state = SlotState.IDLE
        slot.last_used = time.monotonic()
        return events


def _span_at(media: Sequence[MediaSpan], index: int) -> MediaSpan | None:
    for span in media:
        if span.start == index:
            return span
        if span.start > index:
            return None
    return None


_LONG_PREFIX = 256  # cached tokens worth taking a slot for even if its id is not next to the active ones
_RAM_MIN_TOKENS = 32  # shorter states (or discarded tails) are not worth saving to host RAM
_RAM_MIN_GAIN = 8  # tokens a saved state must serve beyond what the slot itself does to be brought back
_RAM_MAX_STATES = 256  # each prompt is compared with every saved state
_CHECKPOINT_BYTES = 2 << 30  # host RAM for all slots' checkpoints together


def _usable_prefix(lcp: int, req: EngineRequest) -> int:
    """A shared prefix as far as it can be kept: at least one prompt token is decoded (its logits start
    generation), and a media item's embeddings are kept whole or not at all."""
    keep = min(lcp, len(req.prompt_tokens) - 1)
    for span in req.media:
        if span.start < keep < span.end:
            keep = span.start
    return keep


def _array_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    same = a[:n] == b[:n]
    return n if same.all() else int(same.argmin())


def _runs(seqs: list[int]) -> int:
    """How many runs of consecutive ids seqs makes: [0, 1, 2] is one, [0, 2, 3] two."""
    ids = sorted(seqs)
    return 1 + sum(1 for a, b in zip(ids, ids[1:]) if b != a + 1)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
