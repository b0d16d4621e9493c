"""The engine thread's bridges into Trio (EngineWorker.stream_trio) and into plain threads
(stream_sync), on the fake session."""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

import pytest
import trio

from pylocalai.engine.scheduler import Scheduler
from pylocalai.engine.types import (
    EngineRequest,
    Finished,
    FinishReason,
    GenerationEvent,
    SamplingParams,
    TextDelta,
)
from pylocalai.engine.worker import RUN_AHEAD, EngineWorker
from pylocalai.errors import EngineError

from .fake_session import FakeSession

needs_eventfd = pytest.mark.skipif(not hasattr(os, "eventfd"), reason="the eventfd path is Linux-only")


def open_fds() -> int:
    """Descriptors open now, once what earlier tests left for the collector is gone."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def text_and_end(events: Iterable[GenerationEvent]) -> tuple[str, Finished]:
    """A stream's text and its Finished, which must come last."""
    text = []
    for ev in events:
        if isinstance(ev, TextDelta):
            text.append(ev.text)
        else:
            assert isinstance(ev, Finished)
            return "".join(text), ev
    raise AssertionError("the stream ended without Finished")


async def generate(worker: EngineWorker, rid: str, n: int) -> tuple[str, Finished]:
    async with worker.stream_trio(EngineRequest(rid, (5, 6), SamplingParams(max_tokens=n))) as events:
        return text_and_end([ev async for ev in events])  # the channel closes after Finished


def spied_worker(monkeypatch, **session) -> tuple[EngineWorker, list[bool], list[int]]:  # type: ignore[no-untyped-def]
    """A worker on the fake session, with what woke consumers recorded: for each step whether the
    native call wrote an eventfd, and each wake-up from Python."""
    from pylocalai.engine import worker as worker_mod

    sched = Scheduler(FakeSession(**session))
    notified: list[bool] = []
    step = sched.step

    def spy(notify_fd: int = -1, max_steps: int = 1) -> list:
        out = step(notify_fd, max_steps)
        notified.append(sched.notified)
        return out

    sched.step = spy  # type: ignore[method-assign]
    python_wakes: list[int] = []
    for cls in (worker_mod._Waker, worker_mod._TrioPump):
        monkeypatch.setattr(cls, "wake", lambda self, _w=cls.wake: (python_wakes.append(1), _w(self))[1])
    return EngineWorker(sched), notified, python_wakes


@needs_eventfd
@pytest.mark.skipif(sys.platform != "linux", reason="counts /proc/self/fd")
def test_events_reach_every_trio_run_and_nothing_leaks(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    before = open_fds()
    worker, notified, _ = spied_worker(monkeypatch, n_seq_max=4, n_batch=64)

    async def main(k: int) -> list[tuple[str, Finished]]:
        results: list[tuple[str, Finished]] = []

        async def one(i: int) -> None:
            results.append(await generate(worker, f"r{k}-{i}", 6))

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(one, i)
        return results

    for k in range(4):  # a new Trio run each time: its own event pump, the last one's retired
        results = trio.run(main, k)
        assert len(results) == 3
        for text, fin in results:
            assert text == "<7><8><9><10><11><12>" and fin.reason is FinishReason.LENGTH
    # the step after a batch of events is what woke the event loop, from the native call
    assert any(notified)
    worker.close()
    assert open_fds() == before  # every run's eventfd was closed


@needs_eventfd
@pytest.mark.skipif(sys.platform != "linux", reason="counts /proc/self/fd")
def test_a_stream_on_a_closed_worker_is_an_error_and_opens_nothing() -> None:
    worker = EngineWorker(Scheduler(FakeSession()))
    worker.close()
    before = open_fds()

    async def main() -> None:
        with pytest.raises(EngineError, match="closed"):
            await generate(worker, "late", 2)

    trio.run(main)
    assert open_fds() == before


@needs_eventfd
@pytest.mark.skipif(sys.platform != "linux", reason="counts /proc/self/fd")
def test_a_sync_stream_is_woken_by_the_native_step_and_its_fd_goes_with_its_thread(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    worker, notified, python_wakes = spied_worker(monkeypatch, n_seq_max=4, n_batch=64)
    before = open_fds()
    results: list[tuple[str, Finished]] = []

    def consume() -> None:
        with worker.stream_sync(EngineRequest("solo", (5, 6), SamplingParams(max_tokens=6))) as events:
            results.append(text_and_end(events))

    t = threading.Thread(target=consume)
    t.start()
    t.join()
    assert results == [("<7><8><9><10><11><12>", results[0][1])] and results[0][1].reason is FinishReason.LENGTH
    # six steps, one token each: every step after the first woke the consumer from the native call
    # (the GIL already free), and only the last event, with no step after it, was woken from Python
    assert notified == [False] + [True] * 5
    assert python_wakes == [1]
    del t
    gc.collect()
    assert open_fds() == before  # the thread's eventfd went with it
    worker.close()


@needs_eventfd
def test_sync_streams_sharing_a_thread_each_get_their_own_events() -> None:
    worker = EngineWorker(Scheduler(FakeSession(n_seq_max=4, n_batch=64)))
    try:
        with worker.stream_sync(EngineRequest("a", (5, 6), SamplingParams(max_tokens=4))) as a, \
             worker.stream_sync(EngineRequest("b", (20, 21), SamplingParams(max_tokens=3))) as b:
            text = {"a": [], "b": []}
            done = set()
            while len(done) < 2:  # one event from each in turn: wake-ups meant for the other are harmless
                for name, it in (("a", a), ("b", b)):
                    if name in done:
                        continue
                    ev = next(it)
                    if isinstance(ev, Finished):
                        done.add(name)
                    else:
                        text[name].append(ev.text)
        assert "".join(text["a"]) == "<7><8><9><10>"
        assert "".join(text["b"]) == "<22><23><24>"
        # and the thread's next stream starts clean, whatever wake-ups are left over
        with worker.stream_sync(EngineRequest("c", (30,), SamplingParams(max_tokens=2))) as c:
            assert text_and_end(c)[0] == "<31><32>"
    finally:
        worker.close()


@needs_eventfd
def test_a_whole_request_wakes_its_consumer_once_with_all_its_events(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    worker, notified, python_wakes = spied_worker(monkeypatch, n_seq_max=4, n_batch=64)
    try:
        with worker.stream_sync(EngineRequest("streamed", (5, 6), SamplingParams(max_tokens=6))) as events:
            streamed = list(events)
        assert worker.scheduler._session.runs == []  # a streamed request is stepped one token at a time
        n_steps = len(worker.scheduler._session.steps)
        with worker.stream_sync(EngineRequest("whole", (5, 6), SamplingParams(max_tokens=6)), whole=True) as events:
            notified.clear()
            python_wakes.clear()
            whole = list(events)
        # the same answer (the slot's cached prompt is reused, so only the usage's reuse differs) ...
        assert [ev for ev in whole if isinstance(ev, TextDelta)] == [ev for ev in streamed if isinstance(ev, TextDelta)]
        assert "".join(ev.text for ev in whole if isinstance(ev, TextDelta)) == "<7><8><9><10><11><12>"
        assert isinstance(whole[-1], Finished) and whole[-1].reason is FinishReason.LENGTH
        assert whole[-1].usage.completion_tokens == 6
        # ... handed over once, at the end: no step was asked to wake the consumer
        assert python_wakes == [1] and not any(notified)
        # ... and decoded in two native calls: the prompt's last token, then one run of the five
        # steps that fed back each sampled token, with no Python between them
        sess = worker.scheduler._session
        assert len(notified) == 2 and len(sess.steps) - n_steps == 6 and sess.runs[-1] == 5

        async def main() -> list:
            async with worker.stream_trio(EngineRequest("trio", (40, 41), SamplingParams(max_tokens=5)), whole=True) as recv:
                return [ev async for ev in recv]

        notified.clear()
        python_wakes.clear()
        got = trio.run(main)
        assert "".join(ev.text for ev in got if isinstance(ev, TextDelta)) == "<42><43><44><45><46>"
        assert isinstance(got[-1], Finished) and got[-1].reason is FinishReason.LENGTH
        assert len(notified) == 2 and not any(notified) and python_wakes == [1] and sess.runs[-1] == 4
    finally:
        worker.close()


def test_a_whole_request_cancelled_midway_gets_what_it_generated_and_its_end() -> None:
    sess = FakeSession(n_seq_max=2, n_batch=64)
    started = threading.Event()
    step = sess.step

    def slow(*args: Any) -> tuple[int, list[Any]]:  # a native step that takes a while
        out = step(*args)
        if len(sess.steps) >= 3:
            started.set()
        time.sleep(0.005)
        return out

    sess.step = slow  # type: ignore[method-assign]
    interrupt = sess.interrupt
    at_interrupt: list[int] = []  # decodes begun at each interrupt (the submit's, then the cancel's)

    def record() -> None:
        at_interrupt.append(len(sess.steps))
        interrupt()

    sess.interrupt = record  # type: ignore[method-assign]
    worker = EngineWorker(Scheduler(sess))
    try:
        threading.Thread(target=lambda: (started.wait(), worker.cancel("long")), daemon=True).start()
        with worker.stream_sync(EngineRequest("long", (5,), SamplingParams(max_tokens=10_000)), whole=True) as events:
            got = list(events)
        assert isinstance(got[-1], Finished) and got[-1].reason is FinishReason.CANCELLED
        text = "".join(ev.text for ev in got if isinstance(ev, TextDelta))
        n = got[-1].usage.completion_tokens
        assert 2 <= n < 10_000 and text == "".join(f"<{6 + i}>" for i in range(n))
        # the cancel interrupted the multi-step run it came during: it ended after the step in progress
        assert n <= at_interrupt[-1] + 1 < RUN_AHEAD and sess.runs and sum(sess.runs) == n - 1
    finally:
        worker.close()


def test_leaving_a_whole_trio_request_early_interrupts_its_run_and_frees_the_slot() -> None:
    """A server's client that goes away while its non-streamed answer is being made: leaving the
    stream cancels the request, which ends the multi-step run after the step in progress."""
    sess = FakeSession(n_seq_max=2, n_batch=64)
    step = sess.step

    def slow(*args: Any) -> tuple[int, list[Any]]:
        out = step(*args)
        time.sleep(0.005)
        return out

    sess.step = slow  # type: ignore[method-assign]
    worker = EngineWorker(Scheduler(sess))
    left_at: list[int] = []

    async def main() -> None:
        with trio.move_on_after(0.1):  # the client leaves
            async with worker.stream_trio(EngineRequest("gone", (5,), SamplingParams(max_tokens=10_000)),
                                          whole=True) as recv:
                async for _ in recv:
                    raise AssertionError("a whole request hands over nothing before its end")
        left_at.append(len(sess.steps))

    try:
        trio.run(main)
        deadline = time.monotonic() + 10
        while worker.scheduler.active_slots and time.monotonic() < deadline:
            time.sleep(0.005)
        assert worker.scheduler.active_slots == 0
        assert 5 <= left_at[0] and len(sess.steps) <= left_at[0] + 2  # not the rest of a 64-step run
        assert sess.runs and max(sess.runs) < RUN_AHEAD
        assert worker.scheduler.stats.finish_reasons == {"cancelled": 1}
    finally:
        worker.close()
