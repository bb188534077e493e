"""
A bounded buffer of a session's most recent output, addressed by byte offset.

The offset of a byte is its position in everything the session ever produced,
so a client that has seen output up to offset N can be sent exactly what came
after it, with no duplicates and no gaps, as long as it is still held.
"""

from __future__ import annotations

from collections import deque


class ReplayBuffer:
    """
    @ivar end: the offset just past the newest byte ever appended.
    @ivar start: the offset of the oldest byte still held.
    """

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("limit must not be negative")
        self.limit = limit
        self._chunks: deque[bytes] = deque()
        self._held = 0
        self.end = 0

    @property
    def start(self) -> int:
        return self.end - self._held

    def __len__(self) -> int:
        return self._held

    def append(self, data: bytes) -> None:
        if not data:
            return
        self.end += len(data)
        if len(data) >= self.limit:
            self._chunks.clear()
            self._held = 0
            data = data[len(data) - self.limit :] if self.limit else b""
            if not data:
                return
        self._chunks.append(data)
        self._held += len(data)
        while self._held > self.limit:
            excess = self._held - self.limit
            oldest = self._chunks[0]
            if len(oldest) <= excess:
                self._chunks.popleft()
                self._held -= len(oldest)
            else:
                self._chunks[0] = oldest[excess:]
                self._held -= excess

    def restart_at(self, offset: int) -> None:
        """
        Forget what is held: the output continues at C{offset} (the offsets
        of a stream picked up again after a restart).
        """
        self._chunks.clear()
        self._held = 0
        self.end = offset

    def since(self, offset: int) -> tuple[bytes, int]:
        """
        Everything held after C{offset}.

        @return: the bytes, and how many bytes after C{offset} are no longer
            held (0 when nothing was lost).
        """
        offset = max(0, min(offset, self.end))
        dropped = max(0, self.start - offset)
        skip = max(0, offset - self.start)
        if skip >= self._held:
            return b"", dropped
        data = b"".join(self._chunks)
        return data[skip:], dropped
