"""The n choices of one streamed request, merged into one stream: a choice that fails ends the
stream with its own error (raised to the protocol layer, which writes the error frame), never a
cancellation that lands in the server's send, whatever the other choices are doing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest
import trio

from pylocalai.api.serving import merge_choices
from pylocalai.errors import InvalidRequestError

closed: list[str] = []


async def failing(k: int) -> AsyncIterator[bytes]:
    yield b"a0"
    for _ in range(k):
        await trio.lowlevel.checkpoint()
    raise InvalidRequestError("the grammar does not parse", param="grammar")


async def busy(name: str) -> AsyncIterator[bytes]:
    try:
        i = 0
        while True:
            await trio.to_thread.run_sync(lambda: None)  # as a choice's answer parser does
            yield b"%s%d" % (name.encode(), i)
            i += 1
    finally:
        closed.append(name)


async def broken() -> AsyncIterator[bytes]:
    yield b"c0"
    await trio.sleep(0.005)
    raise KeyError("a parser bug")


async def consume(streams: list[AsyncIterator[bytes]]) -> list[bytes]:
    got: list[bytes] = []
    async with aclosing(merge_choices(streams)) as frames:
        async for frame in frames:
            got.append(frame)
            await trio.lowlevel.checkpoint()  # the server sending it
    return got


def test_a_failing_choice_raises_its_own_error_and_stops_the_others() -> None:
    async def main() -> None:
        for k in range(120):
            closed.clear()
            with pytest.raises(InvalidRequestError, match="grammar"):
                await consume([failing(k % 7), busy("b"), busy("c"), busy("d"), busy("e")])
            assert sorted(closed) == ["b", "c", "d", "e"]

    trio.run(main)


def test_any_other_failure_is_raised_as_itself() -> None:
    async def main() -> None:
        with pytest.raises(KeyError, match="parser bug"):
            await consume([broken(), busy("b")])

    trio.run(main)


def test_choices_that_end_give_every_frame() -> None:
    async def finite(name: str, n: int) -> AsyncIterator[bytes]:
        for i in range(n):
            await trio.lowlevel.checkpoint()
            yield b"%s%d" % (name.encode(), i)

    got = trio.run(consume, [finite("x", 50), finite("y", 30)])
    assert sorted(got) == sorted([b"x%d" % i for i in range(50)] + [b"y%d" % i for i in range(30)])
