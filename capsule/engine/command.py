"""
A command run to completion in a session's container, beside its terminal:
what it printed (each stream capped), how it ended.

L{OutputCollector} is the process protocol of such an exec (without a TTY,
stdout and stderr apart): it keeps at most C{max_output} bytes of each
stream and reads on past the cap, dropping what it reads, so a command that
prints without end neither blocks nor fills capsule's memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure


@dataclass
class CommandResult:
    """
    @ivar stdout, stderr: what the command wrote, each cut at the cap.
    @ivar exit_code: its exit code; C{None} when the engine could not say
        (the command was cut off, or its container went away).
    @ivar truncated_stdout, truncated_stderr: whether more was written than
        kept.
    @ivar cut: whether capsule stopped waiting for it (its deadline passed).
    """

    stdout: bytes = b""
    stderr: bytes = b""
    exit_code: int | None = None
    truncated_stdout: bool = False
    truncated_stderr: bool = False
    cut: bool = False


class OutputCollector(ProcessProtocol):
    """
    Collects an exec's stdout (fd 1) and stderr (fd 2), C{max_output} bytes
    of each at most; L{done} fires with a L{CommandResult} when the exec
    ends.
    """

    def __init__(self, max_output: int) -> None:
        self._max = max_output
        self._kept = {1: bytearray(), 2: bytearray()}
        self._seen = {1: 0, 2: 0}
        self.cut = False
        self.done: Deferred = Deferred()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        kept = self._kept.get(fd)
        if kept is None:
            return
        self._seen[fd] += len(data)
        room = self._max - len(kept)
        if room > 0:
            kept += data[:room]

    def _take(self, fd: int) -> bytes:
        """
        What was kept of C{fd}, which the collector then lets go of (the
        result holds the only copy).
        """
        kept = self._kept[fd]
        data = bytes(kept)
        kept.clear()
        return data

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        result = CommandResult(
            stdout=self._take(1), stderr=self._take(2), exit_code=code,
            truncated_stdout=self._seen[1] > self._max,
            truncated_stderr=self._seen[2] > self._max, cut=self.cut)
        if not self.done.called:
            self.done.callback(result)


def utf8_text(data: bytes, truncated: bool) -> str:
    """
    C{data} as text: bytes that are not UTF-8 become U+FFFD.  When
    C{truncated}, a character the cut split at the end is left out rather
    than shown as a replacement.
    """
    if truncated:
        data = whole_characters(data)
    return data.decode("utf-8", "replace")


def whole_characters(data: bytes) -> bytes:
    """
    C{data} without the start of a UTF-8 character that a cut split at its
    end, if it has one.
    """
    return data[: len(data) - _split_tail(data)]


def _split_tail(data: bytes) -> int:
    """
    How many bytes at the end of C{data} are the start of a UTF-8 character
    whose other bytes are missing (0 to 3).
    """
    # Look back over at most 3 continuation bytes for the lead byte.
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:
            continue
        if byte >= 0xF8:
            return 0
        if byte >= 0xF0:
            need = 4
        elif byte >= 0xE0:
            need = 3
        elif byte >= 0xC0:
            need = 2
        else:
            return 0
        return back if back < need else 0
    return 0
