"""
Coalescing small output chunks into fewer, larger frames.

Output goes out at once until more than C{burst} bytes have been sent
within C{delay} seconds: a keystroke's echo, or an interactive program's
quick replies, are never held.  Past that the output is a flood, and what
follows is gathered and sent when C{delay} is up, or as soon as C{limit}
bytes are waiting: a flood goes out as frames of up to C{limit} bytes, a few
milliseconds apart.
"""

from __future__ import annotations

from typing import Callable


class Coalescer:
    def __init__(self, clock, emit: Callable[[bytes], None], delay: float = 0.002,
                 limit: int = 256 * 1024, burst: int = 16 * 1024) -> None:
        self._clock = clock
        self._emit = emit
        self.delay = delay
        self.limit = limit
        self.burst = burst
        self._chunks: list[bytes] = []
        self._size = 0
        self._timer = None
        # Bytes sent since the current window of `delay` seconds opened.
        self._window_start = float("-inf")
        self._window_sent = 0

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
            now = self._clock.seconds()
            elapsed = now - self._window_start
            if elapsed >= self.delay:
                self._window_start, self._window_sent = now, 0
                self.flush()
            elif self._window_sent + self._size <= self.burst:
                self.flush()
            else:
                self._timer = self._clock.callLater(self.delay - elapsed, self._flush_window)

    def _flush_window(self) -> None:
        self._timer = None
        self._window_start, self._window_sent = self._clock.seconds(), 0
        self.flush()

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
        self._window_sent += len(data)
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
