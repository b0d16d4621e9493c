"""The engine thread's bridge into Trio (EngineWorker.stream_trio), on the fake session."""

from __future__ import annotations

import os
import sys

import pytest
import trio

from pylocalai.engine.scheduler import Scheduler
from pylocalai.engine.types import (
    EngineRequest,
    Finished,
    FinishReason,
    SamplingParams,
    TextDelta,
)
from pylocalai.engine.worker import EngineWorker
from pylocalai.errors import EngineError

from .fake_session import FakeSession

needs_eventfd = pytest.mark.skipif(not hasattr(os, "eventfd"), reason="the eventfd path is Linux-only")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def generate(worker: EngineWorker, rid: str, n: int) -> tuple[str, Finished]:
    text = []
    async with worker.stream_trio(EngineRequest(rid, (5, 6), SamplingParams(max_tokens=n))) as events:
        async for ev in events:
            if isinstance(ev, TextDelta):
                text.append(ev.text)
            else:
                assert isinstance(ev, Finished)
                return "".join(text), ev
    raise AssertionError("the stream ended without Finished")


@needs_eventfd
@pytest.mark.skipif(sys.platform != "linux", reason="counts /proc/self/fd")
def test_events_reach_every_trio_run_and_nothing_leaks() -> None:
    sess = FakeSession(n_seq_max=4, n_batch=64)
    sched = Scheduler(sess)
    notified = []
    step = sched.step

    def spy(notify_fd: int = -1) -> list:
        out = step(notify_fd)
        notified.append(sched.notified)
        return out

    sched.step = spy  # type: ignore[method-assign]
    before = open_fds()
    worker = EngineWorker(sched)

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
