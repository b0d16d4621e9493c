"""The engine thread: owns one Scheduler and runs its batching loop; thread-safe submit/cancel.

Callers hand in a *sink*: a callable the engine thread calls with each step's events for that
request (it must not block and must not raise). `stream_sync` and `stream_trio` build the two sinks
the rest of the package uses: a queue for plain threads and `TrioToken.run_sync_soon` into a memory
channel for Trio. Leaving either stream early (break, exception, cancellation, disconnect) cancels
the request, which frees its slot before the next step.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass

import trio

from pylocalai.engine.scheduler import Scheduler
from pylocalai.engine.types import EngineRequest, Finished, FinishReason, GenerationEvent, Usage
from pylocalai.errors import EngineError, PylocalaiError

log = logging.getLogger(__name__)

Sink = Callable[[list[GenerationEvent]], None]


@dataclass(frozen=True, slots=True)
class _Submit:
    req: EngineRequest
    sink: Sink


@dataclass(frozen=True, slots=True)
class _Cancel:
    request_id: str


@dataclass(frozen=True, slots=True)
class _Call:
    """Run fn on the engine thread between steps (session access that must not race a decode)."""

    fn: Callable[[], object]
    done: Callable[[object, BaseException | None], None]


class _Stop:
    pass


@dataclass(frozen=True, slots=True)
class _TrioSink:
    """Hands events to a Trio run. The engine thread batches every such sink of one step into a
    single run_sync_soon per Trio run, so n streams cost one wake-up per step, not n."""

    token: trio.lowlevel.TrioToken
    deliver: Callable[[list[GenerationEvent]], None]

    def __call__(self, events: list[GenerationEvent]) -> None:
        with suppress(trio.RunFinishedError):
            self.token.run_sync_soon(self.deliver, events)


def _deliver_all(batch: list[tuple[Callable[[list[GenerationEvent]], None], list[GenerationEvent]]]) -> None:
    for deliver, events in batch:  # on the Trio thread; each deliver swallows its own closed channel
        deliver(events)


class EngineWorker:
    def __init__(self, scheduler: Scheduler, *, name: str = "engine") -> None:
        self._sched = scheduler
        self._inbox: queue.SimpleQueue[_Submit | _Cancel | _Call | _Stop] = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._thread = threading.Thread(target=self._run, name=f"pylocalai-{name}", daemon=True)
        self._closed = False
        self._thread.start()

    @property
    def scheduler(self) -> Scheduler:
        return self._sched

    # ------------------------------------------------------------ thread-safe API

    def submit(self, req: EngineRequest, sink: Sink) -> None:
        """Queue a request; raises at once if it can never run (empty, too long for the context)."""
        if self._closed:
            raise EngineError("the engine is closed")
        self._sched.check(req)
        self._inbox.put(_Submit(req, sink))

    def cancel(self, request_id: str) -> None:
        self._inbox.put(_Cancel(request_id))

    def call(self, fn: Callable[[], object]) -> object:
        """Run fn on the engine thread and wait for its result (blocking)."""
        box: queue.SimpleQueue[tuple[object, BaseException | None]] = queue.SimpleQueue()
        self._inbox.put(_Call(fn, lambda r, e: box.put((r, e))))
        result, err = box.get()
        if err is not None:
            raise err
        return result

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._inbox.put(_Stop())
        if threading.current_thread() is not self._thread:
            self._thread.join()

    @property
    def stopped(self) -> bool:
        """The engine thread has ended: nothing uses the session any more."""
        return self._closed and not self._thread.is_alive()

    # ------------------------------------------------------------ streams

    @contextmanager
    def stream_sync(self, req: EngineRequest) -> Iterator[Iterator[GenerationEvent]]:
        q: queue.SimpleQueue[list[GenerationEvent]] = queue.SimpleQueue()
        self.submit(req, q.put)

        def events() -> Iterator[GenerationEvent]:
            while True:
                for ev in q.get():
                    yield ev
                    if isinstance(ev, Finished):
                        return

        try:
            yield events()
        finally:
            self.cancel(req.request_id)

    @asynccontextmanager
    async def stream_trio(self, req: EngineRequest) -> AsyncIterator[trio.MemoryReceiveChannel[GenerationEvent]]:
        # Unbounded on purpose: a slow consumer must never stall the shared batch; max_tokens bounds it.
        send, recv = trio.open_memory_channel[GenerationEvent](math.inf)
        token = trio.lowlevel.current_trio_token()

        def deliver(events: list[GenerationEvent]) -> None:  # on the Trio thread; must not raise
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                for ev in events:
                    send.send_nowait(ev)
                    if isinstance(ev, Finished):
                        send.close()

        self.submit(req, _TrioSink(token, deliver))
        try:
            yield recv
        finally:
            self.cancel(req.request_id)
            recv.close()

    # ------------------------------------------------------------ engine thread

    def _run(self) -> None:
        sched = self._sched
        while True:
            block = not sched.has_work()
            try:
                while True:
                    msg = self._inbox.get(block=block)
                    block = False
                    if isinstance(msg, _Stop):
                        self._emit(sched.fail_all(EngineError("the engine was closed")))
                        return
                    self._handle(msg)
            except queue.Empty:
                pass
            if not sched.has_work():
                continue
            try:
                results = sched.step()
            except PylocalaiError as exc:
                log.exception("engine step failed")
                results = sched.fail_all(exc if isinstance(exc, EngineError) else EngineError(str(exc)))
            except Exception as exc:  # a native failure: every request gets the error, the thread lives on
                log.exception("engine step failed")
                results = sched.fail_all(EngineError(f"engine step failed: {exc}"))
            self._emit(results)

    def _handle(self, msg: _Submit | _Cancel | _Call) -> None:
        if isinstance(msg, _Submit):
            self._sinks[msg.req.request_id] = msg.sink
            try:
                self._sched.submit(msg.req)
            except PylocalaiError as exc:
                self._emit([(msg.req.request_id, [Finished(FinishReason.ERROR, Usage(len(msg.req.prompt_tokens), 0), error=exc)])])
        elif isinstance(msg, _Cancel):
            self._emit(self._sched.cancel(msg.request_id))
        else:
            try:
                result = msg.fn()
            except BaseException as exc:  # handed back to the waiting caller
                msg.done(None, exc)
            else:
                msg.done(result, None)

    def _emit(self, results: list[tuple[str, list[GenerationEvent]]]) -> None:
        trio_batches: dict[trio.lowlevel.TrioToken, list[tuple[Callable[[list[GenerationEvent]], None],
                                                              list[GenerationEvent]]]] = {}
        for request_id, events in results:
            sink = self._sinks.get(request_id)
            if sink is None:
                continue
            if any(isinstance(ev, Finished) for ev in events):
                del self._sinks[request_id]
            if isinstance(sink, _TrioSink):
                trio_batches.setdefault(sink.token, []).append((sink.deliver, events))
                continue
            try:
                sink(events)
            except Exception:  # a sink must not take the engine down
                log.exception("event sink for %s failed", request_id)
        for token, batch in trio_batches.items():
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(_deliver_all, batch)
