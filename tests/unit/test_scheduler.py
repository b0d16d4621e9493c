from __future__ import annotations

from collections import defaultdict

import pytest

from pylocalai.engine.scheduler import Scheduler
from pylocalai.engine.types import EngineRequest, Finished, FinishReason, GenerationEvent, SamplingParams, TextDelta
from pylocalai.errors import ContextLengthError, EngineError, InvalidRequestError

from .fake_session import FakeSession


def req(rid: str, prompt: list[int], **sampling: object) -> EngineRequest:
    return EngineRequest(rid, tuple(prompt), SamplingParams(**sampling))  # type: ignore[arg-type]


def run(sched: Scheduler, max_steps: int = 500, ahead: int = 1) -> dict[str, list[GenerationEvent]]:
    out: dict[str, list[GenerationEvent]] = defaultdict(list)
    for _ in range(max_steps):
        if not sched.has_work():
            return out
        for rid, evs in sched.step(max_steps=ahead):
            out[rid].extend(evs)
    raise AssertionError("scheduler did not finish")


def text_of(events: list[GenerationEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def finished(events: list[GenerationEvent]) -> Finished:
    assert isinstance(events[-1], Finished)
    assert sum(isinstance(e, Finished) for e in events) == 1
    return events[-1]


def test_max_tokens_gives_length_and_real_usage() -> None:
    sess = FakeSession()
    sched = Scheduler(sess)
    sched.submit(req("a", [5, 6, 7], max_tokens=4))
    ev = run(sched)["a"]
    fin = finished(ev)
    assert fin.reason is FinishReason.LENGTH
    assert (fin.usage.prompt_tokens, fin.usage.completion_tokens) == (3, 4)
    assert text_of(ev) == "<8><9><10><11>"
    toks = [t for e in ev if isinstance(e, TextDelta) for t in e.tokens]
    assert toks == [8, 9, 10, 11]
    assert sched.active_slots == 0


def test_end_of_generation_token_stops_and_is_not_emitted() -> None:
    sess = FakeSession(eog_after={0: 2})
    sched = Scheduler(sess)
    sched.submit(req("a", [5], max_tokens=50))
    ev = run(sched)["a"]
    fin = finished(ev)
    assert fin.reason is FinishReason.STOP
    assert fin.usage.completion_tokens == 2
    assert text_of(ev) == "<6><7>"


def test_ignore_eos_keeps_generating() -> None:
    sess = FakeSession(eog_after={0: 2})
    sched = Scheduler(sess)
    sched.submit(req("a", [5], max_tokens=5, ignore_eos=True))
    fin = finished(run(sched)["a"])
    assert fin.reason is FinishReason.LENGTH
    assert fin.usage.completion_tokens == 5


def test_long_prompt_is_prefilled_in_chunks_of_n_batch() -> None:
    sess = FakeSession(n_batch=4)
    sched = Scheduler(sess, n_slots=1)
    sched.submit(req("a", list(range(1, 11)), max_tokens=1))
    run(sched)
    sizes = [len(s) for s in sess.steps]
    assert sizes == [4, 4, 2]
    # logits only for the last prompt token
    wants = [w for s in sess.steps for (_, _, _, w) in s]
    assert wants == [0] * 9 + [1]


def test_generation_tokens_come_first_and_prompts_fill_the_rest() -> None:
    sess = FakeSession(n_batch=4)
    sched = Scheduler(sess)
    sched.submit(req("a", [1, 2], max_tokens=10))
    sched.step()  # prefill a
    sched.submit(req("b", list(range(10, 20)), max_tokens=2))
    sched.step()
    last = sess.steps[-1]
    assert last[0][0] == 0 and last[0][3] == 1  # a's generation token first
    assert [s for s, *_ in last[1:]] == [1, 1, 1]  # then 3 of b's prompt tokens
    run(sched)


def test_concurrent_requests_share_steps_and_queue_beyond_slots() -> None:
    sess = FakeSession(n_seq_max=2, n_batch=16)
    sched = Scheduler(sess)
    for rid in "abc":
        sched.submit(req(rid, [ord(rid)], max_tokens=3))
    first = sched.step()
    assert sched.active_slots == 2 and sched.queued == 1
    assert {rid for rid, _ in first} == {"a", "b"}
    out = run(sched)
    for rid in "bc":
        assert finished(out[rid]).usage.completion_tokens == 3
    shared = [s for s in sess.steps if len({seq for seq, *_ in s}) == 2]
    assert shared, "two active requests never shared a decode step"


def test_cancel_frees_the_slot_at_once_and_reports_cancelled() -> None:
    sess = FakeSession(n_seq_max=1)
    sched = Scheduler(sess)
    sched.submit(req("a", [1], max_tokens=100))
    sched.submit(req("b", [2], max_tokens=2))
    sched.step()
    sched.step()
    assert sched.active_slots == 1 and sched.queued == 1
    (rid, evs), = sched.cancel("a")
    assert rid == "a" and finished(evs).reason is FinishReason.CANCELLED
    assert sched.active_slots == 0
    assert 0 not in sess.samplers
    out = run(sched)
    assert finished(out["b"]).reason is FinishReason.LENGTH
    assert sched.cancel("a") == []  # already over


def test_cancel_of_a_queued_request() -> None:
    sess = FakeSession(n_seq_max=1)
    sched = Scheduler(sess)
    sched.submit(req("a", [1], max_tokens=5))
    sched.submit(req("b", [2], max_tokens=5))
    (rid, evs), = sched.cancel("b")
    assert rid == "b" and finished(evs).reason is FinishReason.CANCELLED
    assert sched.queued == 1  # only "a" is left
    assert set(run(sched)) == {"a"}


def test_prefix_of_an_idle_slot_is_reused() -> None:
    sess = FakeSession(n_seq_max=2, n_batch=64)
    sched = Scheduler(sess)
    prompt = list(range(1, 21))
    sched.submit(req("a", prompt, max_tokens=2))
    run(sched)
    n_steps = len(sess.steps)
    sched.submit(req("b", [*prompt, 50, 51], max_tokens=2))
    fin = finished(run(sched)["b"])
    assert fin.usage.cached_tokens == 20  # the shared prompt; the cached generated token differs from 50
    decoded = [t for s in sess.steps[n_steps:] for (_, t, _, _) in s]
    assert decoded[:2] == [50, 51]  # only the new suffix is prefilled


def test_identical_prompt_re_evaluates_one_token() -> None:
    sess = FakeSession(n_seq_max=1, n_batch=64)
    sched = Scheduler(sess)
    prompt = [3, 4, 5, 6]
    sched.submit(req("a", prompt, max_tokens=1))
    run(sched)
    sched.submit(req("b", prompt, max_tokens=1))
    fin = finished(run(sched)["b"])
    assert fin.usage.cached_tokens == 3
    assert sess.steps[-1] == [(0, 6, 3, 1)]


def test_recurrent_state_is_cleared_when_the_prefix_is_not_whole() -> None:
    sess = FakeSession(n_seq_max=1, recurrent=True)
    sched = Scheduler(sess, recurrent=True)
    sched.submit(req("a", [1, 2, 3, 4], max_tokens=2))
    run(sched)
    sched.submit(req("b", [1, 2, 9], max_tokens=1))
    fin = finished(run(sched)["b"])
    assert fin.usage.cached_tokens == 0
    assert (0, -1, -1) in sess.rm_calls
    assert sess.kv[0][:3] == [1, 2, 9]


def test_recurrent_state_continues_when_the_cache_is_a_prefix() -> None:
    sess = FakeSession(n_seq_max=1, recurrent=True)
    sched = Scheduler(sess, recurrent=True)
    sched.submit(req("a", [1, 2, 3], max_tokens=1))
    run(sched)
    cached = list(sched.slot_tokens(0))
    sched.submit(req("b", [*cached, 70, 71], max_tokens=1))
    fin = finished(run(sched)["b"])
    assert fin.usage.cached_tokens == len(cached)
    assert sess.rm_calls == []


def test_prompt_longer_than_context_is_rejected_before_queueing() -> None:
    sched = Scheduler(FakeSession(n_ctx_seq=8))
    with pytest.raises(ContextLengthError, match="8"):
        sched.submit(req("a", list(range(1, 9))))
    with pytest.raises(InvalidRequestError):
        sched.submit(req("b", []))
    assert sched.queued == 0


def test_generation_stops_when_the_context_is_full() -> None:
    sess = FakeSession(n_ctx_seq=8)
    sched = Scheduler(sess)
    sched.submit(req("a", [1, 2, 3], max_tokens=100))
    fin = finished(run(sched)["a"])
    assert fin.reason is FinishReason.LENGTH
    assert len(sess.kv[0]) <= 8


def test_stop_string_across_tokens_finishes_with_the_sequence() -> None:
    sess = FakeSession(pieces={6: b"hel", 7: b"lo ST", 8: b"OP more"})
    sched = Scheduler(sess)
    sched.submit(req("a", [5], max_tokens=20, stop=("STOP",)))
    ev = run(sched)["a"]
    fin = finished(ev)
    assert fin.reason is FinishReason.STOP and fin.stop_sequence == "STOP"
    assert text_of(ev) == "hello "
    assert fin.usage.completion_tokens == 3


def test_logprobs_are_attached_to_deltas() -> None:
    sched = Scheduler(FakeSession())
    sched.submit(req("a", [5], max_tokens=2, logprobs=1))
    ev = run(sched)["a"]
    lps = [lp for e in ev if isinstance(e, TextDelta) for lp in e.logprobs]
    assert [lp.token for lp in lps] == [6, 7]
    assert all(len(lp.top) == 1 for lp in lps)


def test_full_kv_cache_drops_idle_prefix_caches_then_shrinks_prefill() -> None:
    sess = FakeSession(n_seq_max=2, n_batch=8, kv_capacity=12)
    sched = Scheduler(sess)
    sched.submit(req("a", [1, 2, 3, 4, 5, 6], max_tokens=1))
    run(sched)
    assert len(sess.kv[0]) == 6
    sched.submit(req("b", [9, 8, 7, 6, 5, 4, 3, 2], max_tokens=1))
    fin = finished(run(sched)["b"])
    assert fin.reason is FinishReason.LENGTH
    assert sess.kv[0] == []  # the idle slot's cache made room


def test_n_slots_bounds() -> None:
    with pytest.raises(InvalidRequestError):
        Scheduler(FakeSession(n_seq_max=2), n_slots=3)


def test_context_shift_keeps_generating_past_the_context() -> None:
    sess = FakeSession(n_ctx_seq=8)
    shifts: list[tuple[int, int, int, int]] = []

    def seq_add(seq: int, p0: int, p1: int, delta: int) -> None:
        shifts.append((seq, p0, p1, delta))

    sess.seq_add = seq_add  # type: ignore[attr-defined]
    sess.seq_rm = lambda seq, p0, p1: sess.kv[seq].__delitem__(slice(p0, p1 if p1 >= 0 else None)) is None  # type: ignore[method-assign]
    sched = Scheduler(sess, context_shift=True)
    sched.submit(req("a", [1, 2, 3], max_tokens=20))
    fin = finished(run(sched)["a"])
    assert fin.reason is FinishReason.LENGTH and fin.usage.completion_tokens == 20
    assert sched.stats.context_shifts >= 2
    assert shifts[0] == (0, 4, -1, -3)  # keep 1, drop the older half of the other 7 (3), move the rest down


def test_a_new_request_keeps_the_active_sequence_ids_consecutive() -> None:
    # llama.cpp decodes only consecutive sequence ids in one ubatch (per-sequence KV streams): a
    # request placed in an empty slot 2 next to an active slot 0 would split every step in two.
    sess = FakeSession(n_seq_max=4, n_batch=64)
    sched = Scheduler(sess)
    sched.submit(req("a", [1, 2, 3], max_tokens=2))
    sched.submit(req("b", [20, 21, 22], max_tokens=2))
    run(sched)
    assert sorted(sess.kv) == [0, 1]  # slots 0 and 1 hold caches, 2 and 3 are empty
    sched.submit(req("c", [1, 2, 3, 4], max_tokens=20))  # reuses slot 0's prefix
    sched.step()
    sched.submit(req("d", [40, 41], max_tokens=2))
    sched.step()
    seqs = {seq for (seq, tok, _, _) in sess.steps[-1]}
    assert seqs == {0, 1}  # d took slot 1 (dropping its cache), not the empty slot 2
    assert sess.kv[1][:2] == [40, 41]
    assert finished(run(sched)["d"]).reason is FinishReason.LENGTH


def test_a_request_that_fails_to_start_gets_an_error_and_the_slot_serves_on() -> None:
    """A failure while a request takes its slot (after it left the queue) must still finish it:
    before, it was in neither the queue nor a slot, and its caller waited forever."""
    from pylocalai.errors import EngineError

    sess = FakeSession(n_seq_max=1)
    sched = Scheduler(sess)
    sched.submit(req("warm", [1, 2, 3, 4], max_tokens=2))
    run(sched)
    broken = sess.set_sampler

    def fail_once(seq: int, params: dict, history: object) -> None:
        sess.set_sampler = broken  # type: ignore[method-assign]
        raise KeyError("boom")

    sess.set_sampler = fail_once  # type: ignore[method-assign]
    sched.submit(req("a", [1, 2, 3, 9], max_tokens=2))
    sched.submit(req("b", [1, 2, 3, 8], max_tokens=2))
    out = run(sched)
    err = finished(out["a"])
    assert err.reason is FinishReason.ERROR and isinstance(err.error, EngineError) and "boom" in str(err.error)
    assert finished(out["b"]).reason is FinishReason.LENGTH
    assert sess.kv[0][:4] == [1, 2, 3, 8]  # the slot was cleared and b decoded from the start
    assert finished(out["b"]).usage.cached_tokens == 0


def test_after_a_failed_step_the_slots_serve_from_a_consistent_state() -> None:
    """A step that fails after the engine wrote part of its batch (e.g. sampling raised after the
    decode) ends every running request; their slots' memory must be cleared with the mirror, or
    every later request there decodes at positions the memory already holds."""
    from pylocalai.errors import EngineError

    sess = FakeSession(n_seq_max=2)
    sched = Scheduler(sess)
    sched.submit(req("a", [1, 2, 3, 4], max_tokens=50))
    sched.submit(req("b", [1, 2, 3, 5], max_tokens=50))
    sched.step()
    sched.step()
    real_step = sess.step

    def decode_then_fail(*args: object, **kw: object) -> object:
        real_step(*args, **kw)  # type: ignore[arg-type]
        raise RuntimeError("sampling failed")

    sess.step = decode_then_fail  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        sched.step()
    failed = dict(sched.fail_all(EngineError("engine step failed: sampling failed")))
    assert {finished(failed[r]).reason for r in ("a", "b")} == {FinishReason.ERROR}
    sess.step = real_step  # type: ignore[method-assign]
    sched.submit(req("c", [1, 2, 3, 6], max_tokens=3))
    sched.submit(req("d", [7, 8], max_tokens=3))
    out = run(sched)
    assert text_of(out["c"]) == "<7><8><9>" and text_of(out["d"]) == "<9><10><11>"
    assert finished(out["c"]).usage.cached_tokens == 0


class WindowSession(FakeSession):
    """A fake with a sliding window: the scheduler keeps checkpoints (their content is a stand-in)."""

    n_swa = 4
    checkpoints_supported = True

    def seq_pos_min(self, seq: int) -> int:
        return 0 if self.kv.get(seq) else -1

    def checkpoint_save(self, seq: int, partial: bool = True) -> bytes:
        return bytes(len(self.kv.get(seq, [])))


def test_prompt_chunks_keep_most_of_the_budget_while_others_generate() -> None:
    """Chunks end on the n_batch grid where checkpoints are kept, but never shrink below half the
    budget for it: with a generating slot taking one place in every batch of 8, aligning each chunk
    to the grid would alternate chunks of 7 and 1, doubling the steps a prompt takes."""
    sess = WindowSession(n_seq_max=2, n_batch=8, n_ctx_seq=128)
    sched = Scheduler(sess)
    sched.submit(req("gen", [1, 2, 3], max_tokens=40))
    sched.step()
    sched.submit(req("long", list(range(10, 70)), max_tokens=1))  # 60 prompt tokens
    run(sched)
    chunks = [sum(1 for s, *_ in step if s == 1) for step in sess.steps]
    chunks = [c for c in chunks if c]
    assert sum(chunks) == 60
    assert all(c >= 4 for c in chunks[:-1]), chunks  # half the budget of 7 at least
    assert len(chunks) <= 60 // 7 + 2
    # one checkpoint per 8 positions at most, and one at the prompt's end
    assert sched.stats.checkpoints_saved <= 60 // 8 + 1


def _shifting(**kw: object) -> FakeSession:
    """A fake whose memory can drop and move positions (context shift)."""
    sess = FakeSession(**kw)  # type: ignore[arg-type]
    sess.seq_add = lambda seq, p0, p1, delta: None  # type: ignore[attr-defined]
    sess.seq_rm = lambda seq, p0, p1: sess.kv[seq].__delitem__(slice(p0, p1 if p1 >= 0 else None)) is None  # type: ignore[method-assign]
    return sess


MULTI_STEP_CASES = {
    "token limit": (lambda: FakeSession(), {}, [("a", [5, 6, 7], {"max_tokens": 9})]),
    "end of generation": (lambda: FakeSession(eog_after={0: 5}), {}, [("a", [5], {"max_tokens": 50})]),
    "ignore_eos": (lambda: FakeSession(eog_after={0: 2}), {}, [("a", [5], {"max_tokens": 7, "ignore_eos": True})]),
    "stop string across tokens": (
        lambda: FakeSession(pieces={9: b"hel", 10: b"lo ST", 11: b"OP more"}), {},
        [("a", [5], {"max_tokens": 20, "stop": ("STOP",)})]),
    "stop string the engine misses": (
        lambda: FakeSession(pieces={9: b"hel", 10: b"lo ST", 11: b"OP more"}, watch_stops=False), {},
        [("a", [5], {"max_tokens": 20, "stop": ("STOP",)})]),
    "logprobs": (lambda: FakeSession(), {}, [("a", [5], {"max_tokens": 6, "logprobs": 1})]),
    "context full": (lambda: FakeSession(n_ctx_seq=12), {}, [("a", [1, 2, 3], {"max_tokens": 100})]),
    "context shift": (lambda: _shifting(n_ctx_seq=8), {"context_shift": True}, [("a", [1, 2, 3], {"max_tokens": 20})]),
    "one ignores end of generation, one stops on it": (
        lambda: FakeSession(n_seq_max=2, eog_after={0: 3, 1: 5}), {},
        [("a", [5], {"max_tokens": 9, "ignore_eos": True}), ("b", [40], {"max_tokens": 30})]),
    "KV cache full midway": (
        lambda: FakeSession(n_seq_max=2, kv_capacity=24), {},
        [("a", [5, 6], {"max_tokens": 30}), ("b", [40, 41, 42], {"max_tokens": 30})]),
    "requests of different lengths, one queued": (
        lambda: FakeSession(n_seq_max=2, eog_after={1: 4}), {},
        [("a", [5, 6], {"max_tokens": 12}), ("b", [40], {"max_tokens": 30}), ("c", [70, 71, 72], {"max_tokens": 3})]),
}


@pytest.mark.parametrize("case", MULTI_STEP_CASES)
def test_several_steps_per_call_give_what_one_step_at_a_time_gives(case: str) -> None:
    make, options, requests = MULTI_STEP_CASES[case]
    outcome = {}
    for ahead in (1, 16):
        sess = make()
        sched = Scheduler(sess, **options)
        for rid, prompt, sampling in requests:
            sched.submit(req(rid, prompt, **sampling))
        events = run(sched, ahead=ahead)
        assert set(events) == {rid for rid, _, _ in requests}
        for evs in events.values():
            finished(evs)
        # the scheduler's mirror of each sequence is what the engine's memory holds
        assert all(sched.slot_tokens(seq) == tuple(sess.kv.get(seq, [])) for seq in range(sched.n_slots))
        outcome[ahead] = (dict(events), sess.runs, len(sess.steps), sched.stats.tokens_generated)
    (one, runs1, _, gen1), (many, runs16, decodes16, gen16) = outcome[1], outcome[16]
    assert many == one and gen16 == gen1
    assert runs1 == []  # one step at a time never asks for a run
    assert runs16 and max(runs16) > 1  # ... while runs took several steps per call
    if case != "stop string the engine misses":
        assert decodes16 == outcome[1][2]  # no step beyond what one-at-a-time decodes


def test_an_interrupt_ends_a_multi_step_run_after_its_first_step() -> None:
    sess = FakeSession()
    sched = Scheduler(sess)
    sched.submit(req("a", [5], max_tokens=40))
    sched.step(max_steps=16)  # the prompt: one step, no run
    sched.interrupt()
    sched.step(max_steps=16)
    sched.clear_interrupt()
    sched.step(max_steps=16)
    assert sess.runs == [1, 16]


def test_a_failure_after_a_runs_first_step_keeps_the_steps_before_it_and_fails_the_next() -> None:
    sess = FakeSession()
    step = sess.step

    def failing(*args: object) -> tuple[int, list[object]]:
        if len(sess.steps) == 6:
            raise RuntimeError("decode broke")
        return step(*args)

    sess.step = failing  # type: ignore[method-assign]
    sched = Scheduler(sess)
    sched.submit(req("a", [5], max_tokens=40))
    first = sched.step(max_steps=16)  # the prompt
    ran = sched.step(max_steps=16)  # a run of five steps, then the sixth decode fails
    assert sess.runs == [5]
    # the five sampled tokens come out as they would have one step at a time
    assert text_of([ev for _, evs in first + ran for ev in evs]) == "<6><7><8><9><10><11>"
    assert sched.slot_tokens(0) == tuple(sess.kv[0])  # the mirror holds what was decoded
    with pytest.raises(EngineError, match="decode broke"):
        sched.step(max_steps=16)
    # the caller (the engine thread) then ends every request with the error, as after any failed step
    fin = finished([ev for _, evs in sched.fail_all(EngineError("x")) for ev in evs])
    assert fin.reason is FinishReason.ERROR and fin.usage.completion_tokens == 6
    assert sched.step(max_steps=16) == []  # and the next step has no stale error to raise
