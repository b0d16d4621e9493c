"""A deterministic stand-in for the engine Session, for scheduler tests without a model.

Its "model": the token sampled after token t is (t + 1) % n_vocab, except that EOG_TOKEN is never
produced unless a sequence reaches `eog_after` generated tokens. Token t renders as PIECES.get(t,
f"<{t}>"). It keeps a real per-sequence position map, so it catches a scheduler that decodes at a
wrong position, reuses a prefix wrongly or forgets to clear a sequence.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

EOG_TOKEN = 0


@dataclass
class FakeSession:
    n_ctx_seq: int = 64
    n_batch: int = 8
    n_seq_max: int = 2
    n_vocab: int = 100
    recurrent: bool = False
    kv_capacity: int | None = None  # total cells; None: unlimited
    pieces: dict[int, bytes] = field(default_factory=dict)
    eog_after: dict[int, int] = field(default_factory=dict)  # seq -> generated count that yields EOG
    kv: dict[int, list[int]] = field(default_factory=dict)  # seq -> tokens by position
    samplers: dict[int, dict[str, Any]] = field(default_factory=dict)
    generated: dict[int, int] = field(default_factory=dict)
    steps: list[list[tuple[int, int, int, int]]] = field(default_factory=list)  # (seq, token, pos, want)
    rm_calls: list[tuple[int, int, int]] = field(default_factory=list)
    runs: list[int] = field(default_factory=list)  # steps each run() call made
    interrupted: bool = False
    watch_stops: bool = True  # False: run() misses stop strings (they only end a run early)
    tails: dict[int, bytes] = field(default_factory=dict)  # seq -> the bytes it sampled (watched for stops)

    def set_sampler(self, seq: int, params: dict[str, Any], history: Any) -> None:
        self.samplers[seq] = dict(params)
        self.generated[seq] = 0
        self.tails[seq] = b""

    def drop_sampler(self, seq: int) -> None:
        self.samplers.pop(seq, None)

    def seq_rm(self, seq: int, p0: int, p1: int) -> bool:
        self.rm_calls.append((seq, p0, p1))
        cells = self.kv.setdefault(seq, [])
        if p0 < 0 and p1 < 0:
            cells.clear()
            return True
        if self.recurrent:
            return False
        assert p1 == -1, "the scheduler only cuts tails"
        del cells[p0:]
        return True

    def step(self, tokens: Any, pos: Any, seq_ids: Any, want: Any, notify_fd: int = -1) -> tuple[int, list[Any]]:
        if notify_fd >= 0:  # as the native step does once the GIL is released
            os.eventfd_write(notify_fd, 1)
        toks, poss, seqs, wants = (np.asarray(a).tolist() for a in (tokens, pos, seq_ids, want))
        assert len(toks) <= self.n_batch
        if self.kv_capacity is not None:
            used = sum(len(v) for v in self.kv.values())
            if used + len(toks) > self.kv_capacity:
                return 1, []
        self.steps.append(list(zip(seqs, toks, poss, wants, strict=True)))
        rows = []
        for t, p, s, w in zip(toks, poss, seqs, wants, strict=True):
            cells = self.kv.setdefault(s, [])
            assert p == len(cells), f"seq {s}: decoded at position {p}, cache holds {len(cells)}"
            cells.append(t)
            if w:
                assert s in self.samplers, f"seq {s} sampled without a sampler"
                self.generated[s] += 1
                limit = self.eog_after.get(s)
                nxt = EOG_TOKEN if limit is not None and self.generated[s] > limit else (t + 1) % self.n_vocab
                if nxt == EOG_TOKEN and (limit is None or self.generated[s] <= limit):
                    nxt = 1
                piece = self.pieces.get(nxt, f"<{nxt}>".encode())
                top = [(nxt, -0.1), (nxt + 1, -2.0)]
                rows.append((s, nxt, nxt == EOG_TOKEN, b"" if nxt == EOG_TOKEN else piece, -0.1, top))
        return 0, rows

    def interrupt(self) -> None:
        self.interrupted = True

    def clear_interrupt(self) -> None:
        self.interrupted = False

    def run(self, tokens: Any, pos: Any, seq_ids: Any, remaining: Any, stop_on_eog: Any, max_steps: int,
            notify_fd: int = -1) -> tuple[int, int, list[Any], str | None]:
        """The native run's contract: steps of generating sequences, each feeding back its sampled
        token, ending after the step where one may finish, or before a step once interrupted; a
        failure after the first step ends it with the rows so far and the error."""
        toks, poss, seqs, left, on_eog = (np.asarray(a).tolist() for a in (tokens, pos, seq_ids, remaining, stop_on_eog))
        out: list[Any] = []
        steps = 0
        error = None
        for step in range(max_steps):
            if step > 0 and self.interrupted:
                break
            try:
                status, rows = self.step(toks, poss, seqs, [1] * len(toks), notify_fd if step == 0 else -1)
            except Exception as exc:
                if step == 0:
                    raise
                error = str(exc)
                break
            if status != 0:
                if step == 0:
                    return status, 0, [], None
                break
            out.extend(rows)
            steps += 1
            end = False
            for i, (s, token, eog, piece, _, _) in enumerate(rows):
                toks[i], poss[i], left[i] = token, poss[i] + 1, left[i] - 1
                self.tails[s] = self.tails.get(s, b"") + piece
                stops = [x.encode() for x in self.samplers[s].get("stop", ()) if x] if self.watch_stops else []
                end = end or left[i] <= 0 or (eog and on_eog[i]) or any(x in self.tails[s] for x in stops)
            if end:
                break
        self.runs.append(steps)
        return 0, steps, out, error
