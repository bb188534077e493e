"""
capsule-keeper given frames it must not take, through pipes and without
Docker (see tests/keeper_harness.py): on a relay's stdin (from capsule, or
whatever speaks to the exec) and straight on the keeper's socket.  The
keeper refuses them at their header, without waiting for the length they
announce, passes on nothing of them or after them, and the shell lives on.
"""

import struct

import pytest

from capsule.core.keeper import FrameReader, encode_input, encode_window
from tests.keeper_harness import connect, hello, keeper, relay  # noqa: F401 (fixtures)

SHELL = ["sh", "-c", "stty -echo; echo pid:$$.; while read line; do"
                     " case $line in size) stty size;; *) echo got:$line.;; esac; done"]

BAD = {
    "oversized": b"i" + struct.pack(">I", 65537),
    "length 2**32-1": b"i" + struct.pack(">I", 2**32 - 1),
    "unknown type": b"z" + struct.pack(">I", 3) + b"abc",
    "NUL type": b"\0" + struct.pack(">I", 0),
    "a hello": hello(),
    "an output frame": b"o" + struct.pack(">I", 2) + b"hi",
    "a status frame": b"x" + struct.pack(">I", 4) + bytes(4),
    "window of 3": b"w" + struct.pack(">I", 3) + b"\0\x50\0",
    "window of 5": b"w" + struct.pack(">I", 5) + b"\0\x50\0\x18\0",
    "window of 0": b"w" + struct.pack(">I", 0),
}


def refusal(frame: bytes) -> str:
    kind, (length,) = frame[0], struct.unpack(">I", frame[1:5])
    shown = chr(kind) if 32 < kind < 127 else "?"
    return (f"capsule-keeper: refused a frame on stdin: type 0x{kind:02x} ('{shown}'),"
            f" {length} bytes; only 'i' of at most 65536 bytes and 'w' of 4 may come\n")


def running(relay):
    """
    A relay to the shell, and the shell's pid.
    """
    first = relay(SHELL)
    start = first.preamble()[2]
    end = first.until(b"pid:", start)
    return first, bytes(first.output[end:first.until(b".", end) - 1])


def still_running(relay, socket: str, pid: bytes, answered: bytes = b"") -> None:
    """
    A new attach from offset 0 finds the same shell, which answered exactly
    C{answered} so far, and answers it.
    """
    later = relay(SHELL, socket=socket, offset=0)
    start = later.preamble()[2]
    later.send(b"alive\n")
    later.until(b"got:alive.\r\n", start)
    assert bytes(later.output[start:]) == (b"pid:" + pid + b".\r\n" + answered
                                           + b"got:alive.\r\n")


@pytest.mark.parametrize("bad", BAD.values(), ids=BAD.keys())
def test_a_relay_refuses_a_bad_frame_on_its_stdin(relay, bad):
    """
    The frames before the bad one reach the shell; the bad one and what
    follows do not.  The relay does not wait for what the bad header
    announces: it ends while its stdin is still open.
    """
    first, pid = running(relay)
    first.send_raw(encode_input(b"before\n") + bad + encode_input(b"after\n"))
    assert first.wait() == (255, refusal(bad))
    still_running(relay, first.socket, pid, b"got:before.\r\n")


@pytest.mark.parametrize("cut", [1, 3, 5, 9])
def test_stdin_ending_inside_a_frame_drops_that_frame(relay, cut):
    first, pid = running(relay)
    partial = encode_input(b"echo\n")[:cut]
    first.send_raw(encode_input(b"before\n") + partial)
    first.process.stdin.close()
    assert first.wait() == (255, f"capsule-keeper: stdin ended inside a frame ({cut} bytes of"
                                 " it came); it was dropped\n")
    still_running(relay, first.socket, pid, b"got:before.\r\n")


def test_stdin_ending_after_whole_frames_passes_them_on(relay):
    first, pid = running(relay)
    first.send_raw(encode_input(b"one\n") + encode_input(b"two\n"))
    first.process.stdin.close()
    assert first.wait() == (253, "")
    still_running(relay, first.socket, pid, b"got:one.\r\ngot:two.\r\n")


def test_frames_split_anywhere_are_put_together(relay):
    """
    A header or payload may come in pieces (a pipe or socket splits where it
    likes): the frame counts once it is whole.
    """
    first, pid = running(relay)
    data = encode_window(100, 40) + encode_input(b"size\n") + encode_input(b"split\n")
    for i in range(len(data)):
        first.send_raw(data[i:i + 1])
    first.until(b"got:split.\r\n")
    assert first.output.endswith(b"pid:" + pid + b".\r\n40 100\r\ngot:split.\r\n")


def read_to_end(s) -> list[tuple[bytes, bytes]]:
    """
    The frames the keeper sends a client of its own until it closes the
    connection (a timeout fails).
    """
    reader, frames = FrameReader(), []
    while data := s.recv(1 << 16):
        frames += reader.feed(data)
    return frames


BAD_ON_SOCKET = {
    "input before the hello": encode_input(b"before\n"),
    "a window before the hello": encode_window(80, 24),
    "a short hello": b"a" + struct.pack(">IQH", 10, 0, 80),
    # 13 bytes is a hello that asks for channels (capsule.core.channels)
    "a long hello": b"a" + struct.pack(">IQHHBB", 14, 0, 80, 24, 1, 0),
    "a second hello": hello() + encode_input(b"before\n") + hello(),
    "an oversized frame": hello() + encode_input(b"before\n") + b"i" + struct.pack(">I", 65537),
    "length 2**32-1": hello() + encode_input(b"before\n") + b"i" + struct.pack(">I", 2**32 - 1),
    "an unknown type": hello() + encode_input(b"before\n") + b"z" + struct.pack(">I", 0),
    "an output frame": hello() + encode_input(b"before\n") + b"o" + struct.pack(">I", 1) + b"o",
    "a window of 3": hello() + encode_input(b"before\n") + b"w" + struct.pack(">I", 3) + bytes(3),
}


@pytest.mark.parametrize("bad", BAD_ON_SOCKET.values(), ids=BAD_ON_SOCKET.keys())
def test_the_keeper_disconnects_a_client_that_sends_a_bad_frame(relay, bad):
    """
    A client on the socket (anything in the container may connect) that
    breaks the framing is disconnected at the bad frame's header; only whole
    frames before it count, and the shell lives on.
    """
    first, pid = running(relay)
    with connect(first.socket) as s:
        s.sendall(bad + encode_input(b"after\n"))
        frames = read_to_end(s)
    assert {kind for kind, _ in frames} <= {b"o"}
    before = b"got:before.\r\n" if bad.startswith(b"a") and b"before" in bad else b""
    still_running(relay, first.socket, pid, before)
