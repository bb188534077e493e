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
attach, C{P} the TCP ports listening in the container (L{parse_ports}; an
older keeper sends none).  The first output is a preamble saying at which offset the bytes
that follow begin::

    ESC _ capsule-keeper;offset=S;dropped=D ESC \\

(with C{;channels=N} after D when the keeper carries channels, which capsule
asked for: L{capsule.core.channels}).

Every exec that may start a keeper tells it, in its environment
(L{keeper_environment}), where to keep the session's screen across a stop
of its container (L{SCREEN_ENV}, L{encode_screen}).

Pure encoding and parsing; no I/O.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

PREFIX = b"\x1b_capsule-keeper;"
_PREAMBLE = re.compile(
    rb"\x1b_capsule-keeper;offset=(\d+);dropped=(\d+)(?:;channels=(\d{1,4}))?\x1b\\")
_MAX_PREAMBLE = 128

DEFAULT_SOCKET = "/tmp/.capsule-keeper/session.sock"


# The keeper's largest frame payload.
MAX_FRAME = 65536


def keeper_argv(shell: tuple[str, ...], offset: int = 0, buffer: int = 1024 * 1024,
                socket: str = DEFAULT_SOCKET, program: str = "capsule-keeper") -> list[str]:
    return [program, "-r", "-b", str(max(buffer, 4096)), "-o", str(offset), socket, "--",
            *shell]


# The screen across a stop (see docker/keeper/capsule-keeper.c, "The screen
# across a stop"): a keeper started with SCREEN_ENV=path in its exec's
# environment (the keeper's own: the shell does not get it; an older keeper
# ignores it) saves its ring to that file while it runs, and a keeper that
# starts where the file is shows it as the start of its output, followed by
# a dim "resumed" line.  The file: a header with the offset of its first
# byte after the header, then the bytes (the newest last).
SCREEN_ENV = "CAPSULE_KEEPER_SCREEN"
_SCREEN_HEADER = re.compile(rb"\x1b_capsule-screen;start=(\d{1,16})\x1b\\")
# The largest offset a keeper believes in a screen file.
SCREEN_MAX_END = 2**52


def keeper_environment(environment: dict[str, str], screen: str | None) -> dict[str, str]:
    """
    The environment of an exec that may start a session's keeper: the
    shell's, and where the keeper keeps the screen (C{screen}; C{None}: it
    keeps none).
    """
    return environment if screen is None else {**environment, SCREEN_ENV: screen}


def encode_screen(data: bytes, end: int) -> bytes:
    """
    A screen file as the keeper writes and reads it: C{data} the newest
    output of a session, C{end} the offset that follows its last byte.
    """
    if not len(data) <= end <= SCREEN_MAX_END:
        raise ValueError(f"a screen of {len(data)} bytes ending at offset {end}")
    return b"\x1b_capsule-screen;start=%d\x1b\\" % (end - len(data)) + data


def parse_screen(content: bytes) -> tuple[bytes, int]:
    """
    The bytes of a screen file and the offset that follows them, as a keeper
    reads it (without a header, or with one not exactly right, the file is
    all screen, from offset 0).
    """
    found = _SCREEN_HEADER.match(content)
    if found and int(found.group(1)) <= SCREEN_MAX_END:
        data = content[found.end():]
        if len(data) <= SCREEN_MAX_END:
            return data, int(found.group(1)) + len(data)
    return content, len(content)


# The direct path (see docker/keeper/capsule-keeper.c, -t): where a session
# has a network, its keeper also listens on this TCP port, for attachments
# whose first frame is C{s} with the session's secret of SECRET_BYTES bytes;
# the secret is kept in the container's label SECRET_LABEL (the Docker API's,
# which no process in the container can read).
DIRECT_PORT = 7422
SECRET_BYTES = 32
SECRET_LABEL = "io.capsule.keeper-secret"


def has_own_address(network: str | None) -> bool:
    """
    Whether a container on C{network} (C{--network}'s value) has an address
    of its own, where its keeper may listen: not without a network, nor in
    the host's or another container's namespace.
    """
    return network not in ("none", "host") and not (network or "").startswith("container:")


def own_ports(network: str | None, door_port: int = 0) -> frozenset[int]:
    """
    capsule's own ports inside a session's container on C{network}, which
    are not the session's: the keeper's direct port where the container
    has an address of its own, else the session door's (C{door_port}, 0:
    none), which the keeper carries for a session without a network.
    """
    if has_own_address(network):
        return frozenset({DIRECT_PORT})
    return frozenset({door_port}) if door_port else frozenset()


def keeper_start_argv(shell: tuple[str, ...], buffer: int = 1024 * 1024,
                      socket: str = DEFAULT_SOCKET, port: int = DIRECT_PORT,
                      program: str = "capsule-keeper") -> list[str]:
    """
    The exec that starts a session's keeper (reading the secret as an C{s}
    frame on its stdin: L{encode_secret}) with a TCP listener on C{port},
    and exits without attaching.
    """
    return [program, "-d", "-t", str(port), "-b", str(max(buffer, 4096)), socket, "--",
            *shell]


def encode_secret(secret: bytes) -> bytes:
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a secret of {len(secret)} bytes ({SECRET_BYTES} needed)")
    return b"s" + struct.pack(">I", SECRET_BYTES) + secret


def encode_hello(offset: int, cols: int = 0, rows: int = 0) -> bytes:
    """
    An attachment's first frame after its secret: from which offset it wants
    the output (and a terminal size; 0x0: leave it).
    """
    return b"a" + struct.pack(">IQHH", 12, offset, cols, rows)


def parse_secret(text: str | None) -> bytes | None:
    """
    A secret as kept in its label (hex), or C{None} if it is not one.
    """
    if not text or len(text) != 2 * SECRET_BYTES:
        return None
    try:
        return bytes.fromhex(text)
    except ValueError:
        return None


def encode_input(data: bytes) -> bytes:
    return b"".join(b"i" + struct.pack(">I", len(piece)) + piece
                    for piece in (data[i : i + MAX_FRAME]
                                  for i in range(0, len(data), MAX_FRAME)))


def encode_window(cols: int, rows: int) -> bytes:
    return b"w" + struct.pack(">IHH", 4, cols, rows)


# The most ports a keeper's C{P} frame names (the keeper's MAX_PORTS).
MAX_PORTS = 64

# What a relay may send capsule: each kind with the sizes its payload may
# have.  Anything else is malformed: the relay is inside the container, and
# the session's user controls every byte of it.
RELAY_FRAMES = {b"o": (0, MAX_FRAME), b"x": (4, 4), b"k": (0, 0),
                b"P": (2, 2 + 2 * MAX_PORTS)}

# The largest offset capsule believes (the protocol's, JavaScript's safe
# integers) and the largest exit status a shell has.
MAX_OFFSET = 2**53
MAX_STATUS = 255


class FrameError(ValueError):
    """
    A stream of frames broke: a header of a kind or size not allowed.

    @ivar frames: the whole frames that came before the bad header (they are
        good, and the caller may still use them).
    """

    def __init__(self, message: str, frames: list[tuple[bytes, bytes]]) -> None:
        super().__init__(message)
        self.message = message
        self.frames = frames


class FrameReader:
    """
    Splits a keeper's byte stream into C{(type, payload)} frames.

    It fails closed: each header is checked as soon as its 5 bytes are in
    (never waiting for a length it announces), and at the first bad one
    C{feed} raises L{FrameError} and the reader is broken for good: it holds
    nothing more and every later C{feed} raises at once.  What it holds is
    at most one frame: 5 + L{MAX_FRAME} bytes.

    @param kinds: the kinds allowed, each with the smallest and largest
        payload it may have (C{None}: any kind up to L{MAX_FRAME}).
    """

    def __init__(self, kinds: dict[bytes, tuple[int, int]] | None = None) -> None:
        self._buffer = bytearray()
        self._kinds = kinds
        self.error: str | None = None

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        if self.error is not None:
            raise FrameError(self.error, [])
        self._buffer += data
        frames, at = [], 0
        buffer = self._buffer
        while len(buffer) - at >= 5:
            kind = bytes(buffer[at : at + 1])
            (length,) = struct.unpack_from(">I", buffer, at + 1)
            problem = self._check(kind, length)
            if problem is not None:
                self.error = problem
                self._buffer = bytearray()
                raise FrameError(problem, frames)
            if len(buffer) - at < 5 + length:
                break
            frames.append((kind, bytes(buffer[at + 5 : at + 5 + length])))
            at += 5 + length
        del buffer[:at]
        return frames

    def _check(self, kind: bytes, length: int) -> str | None:
        if self._kinds is None:
            if length > MAX_FRAME:
                return f"a frame of {length} bytes (at most {MAX_FRAME})"
            return None
        sizes = self._kinds.get(kind)
        if sizes is None:
            return f"a frame of unknown type {kind!r}"
        low, high = sizes
        if not low <= length <= high:
            return (f"a {kind.decode('latin-1')!r} frame of {length} bytes"
                    f" ({low}..{high} allowed)")
        return None


def exit_status(payload: bytes) -> int:
    """
    The shell's exit status from an C{x} frame's payload (4 bytes), which
    must be one a shell can have.

    @raise ValueError: it is not.
    """
    (status,) = struct.unpack(">I", payload)
    if status > MAX_STATUS:
        raise ValueError(f"an exit status of {status} (0..{MAX_STATUS} allowed)")
    return status


@dataclass(frozen=True)
class Preamble:
    offset: int
    dropped: int
    # How many channels the keeper carries at once (capsule.core.channels);
    # None: it has none (not asked for, or an older keeper).
    channels: int | None = None


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
            channels = None if found.group(3) is None else int(found.group(3))
            return Preamble(int(found.group(1)), int(found.group(2)), channels), rest
        if len(self._buffer) > _MAX_PREAMBLE or (
                len(self._buffer) >= len(PREFIX) and b"\x1b\\" in self._buffer):
            return self._give_up()
        return None, b""

    def _give_up(self) -> tuple[None, bytes]:
        self.done = self.missing = True
        rest, self._buffer = self._buffer, b""
        return None, rest


def check_preamble(preamble: Preamble, wanted: int | None) -> str | None:
    """
    What is impossible about a preamble (C{None}: nothing), judged against
    what capsule counted itself: the offset it asked for (C{wanted}; C{None}
    when not known).

    The keeper starts at C{min(max(wanted, held_from), end)}, and says the
    bytes between C{wanted} and that start were dropped when C{wanted} is
    older than what it holds: so with nothing dropped the start is at most
    C{wanted} (less: the shell restarted and its offsets began again), and
    with bytes dropped it is C{wanted} plus exactly those.
    """
    offset, dropped = preamble.offset, preamble.dropped
    if offset > MAX_OFFSET:
        return f"an offset of {offset} (at most {MAX_OFFSET})"
    if dropped > offset:
        return f"{dropped} bytes dropped before offset {offset}"
    if wanted is None:
        return None
    if dropped == 0 and offset > wanted:
        return f"output from offset {offset}, past the {wanted} asked for, with none dropped"
    if dropped and offset != wanted + dropped:
        return (f"output from offset {offset} with {dropped} bytes dropped, when {wanted}"
                " was asked for")
    return None


@dataclass(frozen=True)
class ListeningPorts:
    """
    The TCP ports listening in a session's container, as its keeper read
    them: C{ports} ascending (at most L{MAX_PORTS}), C{more} how many more
    listen that it left out.
    """

    ports: tuple[int, ...] = ()
    more: int = 0


def parse_ports(payload: bytes) -> tuple[ListeningPorts, str | None]:
    """
    A C{P} frame's payload: a 2-byte count of ports left out, then the
    ports, 2 bytes each (big-endian).  What it holds that no keeper sends
    (an odd length, port 0, a port twice or out of order) is not believed:
    the ports that are sound are kept, sorted, and the second value says
    what was wrong (C{None}: nothing).
    """
    if len(payload) < 2 or len(payload) % 2 or len(payload) > 2 + 2 * MAX_PORTS:
        return ListeningPorts(), f"a ports frame of {len(payload)} bytes"
    (more,) = struct.unpack_from(">H", payload)
    listed = struct.unpack_from(f">{(len(payload) - 2) // 2}H", payload, 2)
    ports = tuple(sorted({port for port in listed if port}))
    problem = None
    if 0 in listed:
        problem = "port 0 among the listening ports"
    elif list(ports) != list(listed):
        problem = "listening ports out of order or twice"
    return ListeningPorts(ports, more), problem
