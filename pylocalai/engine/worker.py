"""The engine thread: owns one Scheduler and runs its batching loop; thread-safe submit/cancel.

Callers hand in a *sink*: a callable the engine thread calls with each step's events for that
request (it must not block and must not raise). `stream_sync` and `stream_trio` build the two sinks
the rest of the package uses: for plain threads a queue that the thread sleeps on (an eventfd), and
for Trio a memory channel that a pump task fills. Leaving either stream early (break, exception,
cancellation, disconnect) cancels the request, which frees its slot before the next step.

Either way the consumer is woken once per step, by the next native step once it has released the
GIL (notify_fd). A wake-up from Python costs the engine thread twice: the wake itself (measured on
a 2-vCPU VM: waking a thread on an idle vCPU takes the writer 18-45 us) and then the GIL, which the
woken thread waits for and which the next native step must hand over with a second wake. A
consumer that wants only the end (whole=True) is woken once, when its request ends; while every
live request is such, one native call runs up to RUN_AHEAD steps, with no Python between them.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field

import trio

from pylocalai.engine.scheduler import Scheduler
from pylocalai.engine.types import EngineRequest, Finished, FinishReason, GenerationEvent, Usage
from pylocalai.errors import EngineError, PylocalaiError

log = logging.getLogger(__name__)

Sink = Callable[[list[GenerationEvent]], None]

# Decode steps one native call may run while every live request is taken whole: between them no
# Python runs (on a GPU, or any model that decodes in about a millisecond, that Python is several per
# cent of a step). A new request, a cancellation or a call interrupts the run after its step.
RUN_AHEAD = 64


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


Deliver = Callable[[list[GenerationEvent]], None]


class _TrioPump:
    """Carries one step's events into one Trio run with a single wake-up, given at the right moment.

    The engine thread queues the step's batches here and does not wake the event loop itself: the
    next native step writes the pump's eventfd once it has released the GIL. (Woken from Python --
    run_sync_soon writes a socket, which releases the GIL -- the event loop took the GIL at once, and
    on 2 cores the engine thread stalled ~0.8 ms a step before it could start the next decode.) When
    no decode follows, the engine thread writes the eventfd itself. A Trio system task waits on it.

    Only the engine thread closes the eventfd, and only once this task has ended, so a native step
    never writes to a closed (or reused) descriptor."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.batches: deque[list[tuple[Deliver, list[GenerationEvent]]]] = deque()
        self.alive = True      # the Trio task still reads the eventfd
        self.retired = False   # the engine thread will not write it again
        self._lock = threading.Lock()

    async def run(self) -> None:
        try:
            while not self.retired:
                await trio.lowlevel.wait_readable(self.fd)
                with suppress(BlockingIOError):
                    os.eventfd_read(self.fd)
                while self.batches:
                    _deliver_all(self.batches.popleft())
        finally:
            with self._lock:
                self.alive = False
                if self.retired:
                    os.close(self.fd)

    def wake(self) -> None:
        """Engine thread: wake the task from Python (no native step is about to do it)."""
        if not self.retired:  # a retired pump's eventfd may be closed already
            os.eventfd_write(self.fd, 1)

    def retire(self) -> None:
        """Engine thread: no more events come; the task ends (or has) and the eventfd is closed."""
        with self._lock:
            self.retired = True
            if self.alive:
                os.eventfd_write(self.fd, 1)  # the task wakes, sees `retired` and closes it
            else:
                os.close(self.fd)


@dataclass(frozen=True, slots=True)
class _TrioSink:
    """Hands events to a Trio run: through its pump (one wake-up per step for all its streams), or
    where there is no eventfd (not Linux) with one run_sync_soon per step and run."""

    token: trio.lowlevel.TrioToken
    pump: _TrioPump | None
    deliver: Deliver

    def __call__(self, events: list[GenerationEvent]) -> None:
        with suppress(trio.RunFinishedError):
            self.token.run_sync_soon(self.deliver, events)


class _Waker:
    """An eventfd that a thread consuming sync streams sleeps on: one per thread, kept for its life
    and reused by its streams. A stream's events go into its own deque first, so a wake-up meant
    for another stream of the same thread (or left over from an earlier one) is harmless: the
    consumer looks at its deque and sleeps again. The fd is closed when the last reference goes,
    and the engine thread holds one until it has written the fd, so no write can hit a closed (or
    reused) descriptor."""

    __slots__ = ("fd",)
    alive = True     # what EngineWorker checks of a pump before it hands its fd to a native step
    retired = False

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC)

    def wake(self) -> None:
        os.eventfd_write(self.fd, 1)

    def wait(self) -> None:
        os.eventfd_read(self.fd)

    def __del__(self, _close: Callable[[int], None] = os.close) -> None:  # os may be gone at exit
        _close(self.fd)


@dataclass(frozen=True, slots=True, eq=False)
class _SyncSink:
    """A sync stream's sink: the engine thread appends each step's events and wakes the waker."""

    box: deque[list[GenerationEvent]]
    waker: _Waker

    def __call__(self, events: list[GenerationEvent]) -> None:
        # a direct call wakes at once; EngineWorker._emit instead leaves the wake to the next native step
        self.box.append(events)
        self.waker.wake()


@dataclass(frozen=True, slots=True, eq=False)
class _Whole:
    """A consumer that wants only the finished request (complete(), a non-streamed HTTP answer): the
    engine thread keeps its events and hands them over once, with Finished, so nothing wakes the
    consumer at each token (a wake-up from the engine thread costs it tens of microseconds on a VM)."""

    sink: Sink
    held: list[GenerationEvent] = field(default_factory=list)

    def __call__(self, events: list[GenerationEvent]) -> None:  # called directly: same contract
        self.held.extend(events)
        if any(isinstance(ev, Finished) for ev in events):
            self.sink(self.held)


def _deliver_all(batch: list[tuple[Deliver, list[GenerationEvent]]]) -> None:
    for deliver, events in batch:  # on the Trio thread; each deliver swallows its own closed channel
        deliver(events)


class EngineWorker:
    def __init__(self, scheduler: Scheduler, *, name: str = "engine") -> None:
        self._sched = scheduler
        self._inbox: queue.SimpleQueue[_Submit | _Cancel | _Call | _Stop] = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._pumps: dict[trio.lowlevel.TrioToken, _TrioPump] = {}
        self._pumps_lock = threading.Lock()
        self._unwoken: list[_TrioPump | _Waker] = []  # pumps and wakers whose events wait for a wake-up
        self._notifying: _TrioPump | _Waker | None = None  # whose fd the running native step writes
        self._wakers = threading.local()  # each consumer thread's _Waker
        self._dead_pumps: list[_TrioPump] = []
        self._pumps_closed = False
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
        self._sched.interrupt()  # a multi-step run in progress ends after its step: the request starts

    def cancel(self, request_id: str) -> None:
        self._inbox.put(_Cancel(request_id))
        self._sched.interrupt()

    def call(self, fn: Callable[[], object]) -> object:
        """Run fn on the engine thread and wait for its result (blocking)."""
        box: queue.SimpleQueue[tuple[object, BaseException | None]] = queue.SimpleQueue()
        self._inbox.put(_Call(fn, lambda r, e: box.put((r, e))))
        self._sched.interrupt()
        result, err = box.get()
        if err is not None:
            raise err
        return result

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._inbox.put(_Stop())
        self._sched.interrupt()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    @property
    def stopped(self) -> bool:
        """The engine thread has ended: nothing uses the session any more."""
        return self._closed and not self._thread.is_alive()

    # ------------------------------------------------------------ streams

    @contextmanager
    def stream_sync(self, req: EngineRequest, *, whole: bool = False) -> Iterator[Iterator[GenerationEvent]]:
        """The request's events, in a plain thread. whole: all of them at once when it ends (the
        consumer is not woken for each token)."""
        box: deque[list[GenerationEvent]] = deque()
        sink: Sink
        if hasattr(os, "eventfd"):
            waker = getattr(self._wakers, "waker", None)
            if waker is None:
                waker = self._wakers.waker = _Waker()
            sink = _SyncSink(box, waker)
            wait = waker.wait
        else:  # no eventfd (not Linux): a queue, woken from Python
            q: queue.SimpleQueue[list[GenerationEvent]] = queue.SimpleQueue()
            sink = q.put
            wait = lambda: box.append(q.get())
        self.submit(req, _Whole(sink) if whole else sink)
        ended = False  # its Finished came: the engine is done with it, nothing to cancel

        def events() -> Iterator[GenerationEvent]:
            nonlocal ended
            while True:
                while not box:
                    wait()
                for ev in box.popleft():
                    ended = ended or isinstance(ev, Finished)
                    yield ev
                    if ended:
                        return

        try:
            yield events()
        finally:
            if not ended:  # a cancel would also interrupt the other requests' multi-step run
                self.cancel(req.request_id)

    @asynccontextmanager
    async def stream_trio(self, req: EngineRequest, *,
                          whole: bool = False) -> AsyncIterator[trio.MemoryReceiveChannel[GenerationEvent]]:
        """The request's events in this Trio run. whole: all of them at once when it ends (the
        event loop is not woken for each token)."""
        # Unbounded on purpose: a slow consumer must never stall the shared batch; max_tokens bounds it.
        send, recv = trio.open_memory_channel[GenerationEvent](math.inf)
        token = trio.lowlevel.current_trio_token()
        pump = self._trio_pump(token)

        ended = False  # its Finished came: the engine is done with it, nothing to cancel

        def deliver(events: list[GenerationEvent]) -> None:  # on the Trio thread; must not raise
            nonlocal ended
            ended = ended or any(isinstance(ev, Finished) for ev in events)
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                for ev in events:
                    send.send_nowait(ev)
                    if isinstance(ev, Finished):
                        send.close()

        sink = _TrioSink(token, pump, deliver)
        self.submit(req, _Whole(sink) if whole else sink)
        try:
            yield recv
        finally:
            if not ended:  # a cancel would also interrupt the other requests' multi-step run
                self.cancel(req.request_id)
            recv.close()

    def _trio_pump(self, token: trio.lowlevel.TrioToken) -> _TrioPump | None:
        """This Trio run's pump, started on first use (None where there is no eventfd, and once the
        engine thread has retired its pumps: no one would close a new one)."""
        if not hasattr(os, "eventfd"):
            return None
        with self._pumps_lock:
            if self._pumps_closed:
                return None
            pump = self._pumps.get(token)
            if pump is None or not pump.alive:
                for old, dead in [(t, p) for t, p in self._pumps.items() if not p.alive]:  # finished runs
                    del self._pumps[old]
                    self._dead_pumps.append(dead)  # the engine thread retires it (closes its eventfd)
                pump = self._pumps[token] = _TrioPump()
                trio.lowlevel.spawn_system_task(pump.run, name="pylocalai-engine-events")
            return pump

    # ------------------------------------------------------------ engine thread

    def _run(self) -> None:
        sched = self._sched
        while True:
            block = not sched.has_work()
            if block:
                self._wake_pumps()  # no decode follows to wake the event loops: do it here
            sched.clear_interrupt()  # what is put in the inbox from now on interrupts the next run
            try:
                while True:
                    msg = self._inbox.get(block=block)
                    block = False
                    if isinstance(msg, _Stop):
                        self._emit(sched.fail_all(EngineError("the engine was closed")))
                        self._retire_pumps()
                        return
                    self._handle(msg)
                    del msg  # not held while the thread sleeps: a submit holds its sink (a thread's eventfd)
            except queue.Empty:
                pass
            if not sched.has_work():
                continue
            fd = self._notify_fd()
            try:
                results = sched.step(fd, RUN_AHEAD if self._all_whole() else 1)
            except PylocalaiError as exc:
                log.exception("engine step failed")
                results = sched.fail_all(exc if isinstance(exc, EngineError) else EngineError(str(exc)))
            except Exception as exc:  # a native failure: every request gets the error, the thread lives on
                log.exception("engine step failed")
                results = sched.fail_all(EngineError(f"engine step failed: {exc}"))
            if fd >= 0 and not sched.notified:
                os.eventfd_write(fd, 1)
            self._notifying = None
            self._retire_dead_pumps()  # after the step: the eventfd it was given is closed only now
            self._emit(results)

    def _all_whole(self) -> bool:
        """No live request has a consumer that reads its events before it ends: the engine may run
        several steps between two looks at the inbox (an interrupt ends them early)."""
        return all(isinstance(sink, _Whole) for sink in self._sinks.values())

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
        trio_batches: dict[trio.lowlevel.TrioToken, list[tuple[Deliver, list[GenerationEvent]]]] = {}
        pump_batches: dict[_TrioPump, list[tuple[Deliver, list[GenerationEvent]]]] = {}
        for request_id, events in results:
            sink = self._sinks.get(request_id)
            if sink is None:
                continue
            if any(isinstance(ev, Finished) for ev in events):
                del self._sinks[request_id]
                if isinstance(sink, _Whole):
                    sink.held.extend(events)
                    sink, events = sink.sink, sink.held
            elif isinstance(sink, _Whole):
                sink.held.extend(events)
                continue
            if isinstance(sink, _SyncSink):
                sink.box.append(events)
                if sink.waker not in self._unwoken:
                    self._unwoken.append(sink.waker)
                continue
            if isinstance(sink, _TrioSink):
                if sink.pump is not None:
                    pump_batches.setdefault(sink.pump, []).append((sink.deliver, events))
                else:
                    trio_batches.setdefault(sink.token, []).append((sink.deliver, events))
                continue
            try:
                sink(events)
            except Exception:  # a sink must not take the engine down
                log.exception("event sink for %s failed", request_id)
        for pump, batch in pump_batches.items():
            if pump.alive and not pump.retired:  # a finished run's events have no reader
                pump.batches.append(batch)
                if pump not in self._unwoken:
                    self._unwoken.append(pump)
        for token, batch in trio_batches.items():
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(_deliver_all, batch)

    def _notify_fd(self) -> int:
        """The eventfd for the next native step to write once the GIL is free (-1: none); any
        further pump with events waiting is woken from here."""
        pumps, self._unwoken = self._unwoken, []
        self._notifying = None
        for pump in pumps:
            if self._notifying is None and pump.alive and not pump.retired:
                self._notifying = pump  # referenced until the step has written its fd
            else:
                pump.wake()
        return -1 if self._notifying is None else self._notifying.fd

    def _wake_pumps(self) -> None:
        pumps, self._unwoken = self._unwoken, []
        for pump in pumps:
            pump.wake()
        self._retire_dead_pumps()

    def _retire_dead_pumps(self) -> None:
        if self._dead_pumps:
            with self._pumps_lock:
                dead, self._dead_pumps = self._dead_pumps, []
            for pump in dead:
                pump.retire()

    def _retire_pumps(self) -> None:
        """The engine thread ends: wake every pump a last time and let it close."""
        self._wake_pumps()
        with self._pumps_lock:
            pumps = list(self._pumps.values())
            self._pumps.clear()
            self._pumps_closed = True
        for pump in pumps:
            pump.retire()
