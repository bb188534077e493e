"""
Talking to capsule-keeper, the in-container program that keeps a session's
shell alive between connections (see docker/keeper/capsule-keeper.c).

Each exec runs C{capsule-keeper -r -o OFFSET SOCKET -- SHELL...} without a
TTY: it starts the shell under a keeper the first time (on the keeper's own
pty) and attaches to the running keeper after that, relaying the keeper's
frames verbatim.  capsule speaks that framing itself: a 1-byte type, a
4-byte big-endian length, the payload.  To the keeper: C{i} input bytes,
C{w} the terminal size (cols, rows as 2-byte numbers).  From it: C{o} output
bytes, C{x} the shell's exit status (4 bytes), C{k} replaced by another
attach.  The first output is a preamble saying at which offset the bytes
that follow begin::

    ESC _ capsule-keeper;offset=S;dropped=D ESC \\

Pure encoding and parsing; no I/O.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

PREFIX = b"\x1b_capsule-keeper;"
_PREAMBLE = re.compile(rb"\x1b_capsule-keeper;offset=(\d+);dropped=(\d+)\x1b\\")
_MAX_PREAMBLE = 128

DEFAULT_SOCKET = "/tmp/.capsule-keeper/session.sock"


# The keeper's largest frame payload.
MAX_FRAME = 65536


def keeper_argv(shell: tuple[str, ...], offset: int = 0, buffer: int = 1024 * 1024,
                socket: str = DEFAULT_SOCKET, program: str = "capsule-keeper") -> list[str]:
    return [program, "-r", "-b", str(max(buffer, 4096)), "-o", str(offset), socket, "--",
            *shell]


def encode_input(data: bytes) -> bytes:
    return b"".join(b"i" + struct.pack(">I", len(piece)) + piece
                    for piece in (data[i : i + MAX_FRAME]
                                  for i in range(0, len(data), MAX_FRAME)))


def encode_window(cols: int, rows: int) -> bytes:
    return b"w" + struct.pack(">IHH", 4, cols, rows)


class FrameReader:
    """
    Splits the keeper's byte stream into C{(type, payload)} frames.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self._buffer += data
        frames, at = [], 0
        buffer = self._buffer
        while len(buffer) - at >= 5:
            (length,) = struct.unpack_from(">I", buffer, at + 1)
            if length > MAX_FRAME:
                raise ValueError(f"keeper frame of {length} bytes")
            if len(buffer) - at < 5 + length:
                break
            frames.append((bytes(buffer[at : at + 1]), bytes(buffer[at + 5 : at + 5 + length])))
            at += 5 + length
        del buffer[:at]
        return frames


@dataclass(frozen=True)
class Preamble:
    offset: int
    dropped: int


class PreambleReader:
    """
    Separates the keeper's preamble from the output that follows it.

    C{feed(data)} returns C{(preamble, rest)}: C{preamble} is C{None} until it
    has been read whole, or if the stream does not start with one (no keeper:
    everything is output, and C{missing} is set).
    """

    def __init__(self) -> None:
        self._buffer = b""
        self.done = False
        self.missing = False

    def feed(self, data: bytes) -> tuple[Preamble | None, bytes]:
        if self.done:
            return None, data
        self._buffer += data
        head = self._buffer[: len(PREFIX)]
        if not PREFIX.startswith(head):
            return self._give_up()
        found = _PREAMBLE.match(self._buffer)
        if found:
            self.done = True
            rest, self._buffer = self._buffer[found.end():], b""
            return Preamble(int(found.group(1)), int(found.group(2))), rest
        if len(self._buffer) > _MAX_PREAMBLE or (
                len(self._buffer) >= len(PREFIX) and b"\x1b\\" in self._buffer):
            return self._give_up()
        return None, b""

    def _give_up(self) -> tuple[None, bytes]:
        self.done = self.missing = True
        rest, self._buffer = self._buffer, b""
        return None, rest
