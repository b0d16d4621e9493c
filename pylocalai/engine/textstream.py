"""Turning sampled token pieces into safe text: whole UTF-8 characters, stop strings never emitted."""

from __future__ import annotations

import codecs


class TextAssembler:
    """Accumulates token pieces (bytes) and releases text that can no longer change.

    - A multi-byte character split across tokens is held until it is complete.
    - Text that could be the start of a stop string is held until it cannot be; a stop string that
      spans several tokens is found in the joined text and neither it nor anything after it is released.
    """

    __slots__ = ("_decoder", "_max_stop", "_pending", "_stops", "stopped_by")

    def __init__(self, stops: tuple[str, ...] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(s for s in stops if s)
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self._pending = ""
        self.stopped_by: str | None = None

    def feed(self, piece: bytes) -> str:
        """Add one token's bytes; return the text now safe to emit ('' if none)."""
        text = self._decoder.decode(piece)
        if not self._stops:
            return text
        self._pending += text
        return self._release(final=False)

    def flush(self) -> str:
        """End of generation: release what is held (an incomplete character becomes U+FFFD)."""
        text = self._decoder.decode(b"", final=True)
        if not self._stops:
            return text
        self._pending += text
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        if self.stopped_by is not None:
            return ""
        buf = self._pending
        first, which = -1, None
        for s in self._stops:
            i = buf.find(s)
            if i != -1 and (first == -1 or i < first):
                first, which = i, s
        if which is not None:
            self.stopped_by = which
            self._pending = ""
            return buf[:first]
        if final:
            self._pending = ""
            return buf
        # hold back the longest tail that is a prefix of some stop string
        hold = 0
        for k in range(min(len(buf), self._max_stop - 1), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self._stops):
                hold = k
                break
        if hold:
            self._pending = buf[-hold:]
            return buf[:-hold]
        self._pending = ""
        return buf
