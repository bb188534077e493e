"""
Coalescing small output chunks into fewer, larger frames.

The first chunk after a quiet spell goes out at once, so a single keystroke's
echo is never delayed; chunks that follow within C{delay} seconds of the last
send are gathered and sent together when the delay is up, or as soon as
C{limit} bytes are waiting.  A flood is thus sent as frames of up to
C{limit} bytes, a few milliseconds apart.
"""

from __future__ import annotations

from typing import Callable


class Coalescer:
    def __init__(self, clock, emit: Callable[[bytes], None], delay: float = 0.002,
                 limit: int = 256 * 1024) -> None:
        self._clock = clock
        self._emit = emit
        self.delay = delay
        self.limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self._timer = None
        self._last_send = float("-inf")

    @property
    def pending(self) -> int:
        return self._size

    def push(self, data: bytes) -> None:
        if not data:
            return
        self._chunks.append(data)
        self._size += len(data)
        if self._size >= self.limit:
            self.flush()
        elif self._timer is None:
            quiet = self._clock.seconds() - self._last_send
            if quiet >= self.delay:
                self.flush()
            else:
                self._timer = self._clock.callLater(self.delay - quiet, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if not self._chunks:
            return
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        self._last_send = self._clock.seconds()
        self._emit(data)

    def discard(self) -> None:
        """
        Drop what is waiting (the connection is gone) and stop the timer.
        """
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._chunks.clear()
        self._size = 0
