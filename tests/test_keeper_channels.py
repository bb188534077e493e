"""
capsule-keeper's channels (docker/keeper/capsule-keeper.c, "Channels"),
through pipes and without Docker (see tests/keeper_harness.py): TCP
connections on this machine's loopback carried over a relay's frames, in
both directions, with their flow control and their limits.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time

import pytest

from capsule.core.channels import (CAPSULE_BIT, CHANNEL_ENV, CHUNK, WINDOW, encode_data,
                                   encode_end, encode_fail, encode_grant, encode_open)
from tests.keeper_harness import Relay, keeper  # noqa: F401 (fixtures)

SHELL = ["sh", "-c", "stty -echo; echo V=${CAPSULE_KEEPER_CHANNELS-unset}.;"
                     " while read line; do echo got:$line.; done"]
LIMIT = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChannelRelay(Relay):
    """
    A relay whose channel frames are kept: C{(kind, channel, rest)}.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.channel_frames: list[tuple[bytes, int, bytes]] = []
        self._seen = 0

    def _read(self, left: float) -> None:
        fd = self.process.stdout.fileno()
        if select.select([fd], [], [], max(left, 0))[0]:
            data = os.read(fd, 1 << 20)
            if not data:
                self.ended = True
                return
            for kind, payload in self.reader.feed(data):
                self.frames.append((kind, len(payload)))
                if kind == b"o":
                    self.output += payload
                elif kind == b"x":
                    self.status = struct.unpack(">I", payload)[0]
                else:
                    (channel,) = struct.unpack_from(">I", payload)
                    self.channel_frames.append((kind, channel, payload[4:]))

    def next_frame(self, kinds=None, timeout: float = 10) -> tuple[bytes, int, bytes]:
        """
        The next channel frame (of one of C{kinds}), skipping the others.
        """
        deadline = time.monotonic() + timeout
        while True:
            while self._seen < len(self.channel_frames):
                frame = self.channel_frames[self._seen]
                self._seen += 1
                if kinds is None or frame[0] in kinds:
                    return frame
            left = deadline - time.monotonic()
            if left <= 0 or self.ended:
                raise AssertionError(f"no channel frame {kinds} within {timeout} s;"
                                     f" had {[(k, c, len(r)) for k, c, r in self.channel_frames]}")
            self._read(left)

    def data_until(self, channel: int, size: int, timeout: float = 20,
                   grant: bool = True) -> bytes:
        """
        Channel C{channel}'s data until C{size} bytes came, granting each.
        """
        got = bytearray()
        while len(got) < size:
            kind, ch, rest = self.next_frame({b"D", b"E", b"F"}, timeout)
            assert ch == channel and kind == b"D", (kind, ch, rest[:100])
            got += rest
            if grant:
                self.send_raw(encode_grant(channel, len(rest)))
        return bytes(got)


@pytest.fixture
def chan_relay(keeper):
    made = []

    def make(command=SHELL, door: int = 0, **kwargs):
        r = ChannelRelay(keeper, command, env={CHANNEL_ENV: str(door)}, **kwargs)
        made.append(r)
        return r

    yield make
    try:
        for r in made:
            r.stop()
    finally:
        for r in made:
            r.kill_server()


def started(r) -> bytes:
    """
    Reads the preamble and the shell's first line; returns the preamble.
    """
    end = r.until(b"\x1b\\")
    r.until(b"V=")
    return bytes(r.output[:end])


def test_channels_are_offered_when_asked_and_hidden_from_the_shell(chan_relay):
    r = chan_relay()
    assert started(r).endswith(f";dropped=0;channels={LIMIT}\x1b\\".encode())
    r.until(b"V=unset.")


def test_a_relay_not_asked_has_the_old_preamble(keeper):
    r = Relay(keeper, SHELL)
    try:
        end = r.until(b"\x1b\\")
        assert bytes(r.output[:end]) == b"\x1b_capsule-keeper;offset=0;dropped=0\x1b\\"
        # a channel frame from capsule is then refused, as any unknown one
        r.send_raw(encode_open(CAPSULE_BIT | 1, 1))
        code, err = r.wait()
        assert code == 255 and "refused a frame on stdin: type 0x43 ('C')" in err
    finally:
        r.stop()
        r.kill_server()


def test_a_connection_on_the_door_is_a_channel_both_ways(chan_relay):
    port = free_port()
    r = chan_relay(door=port)
    started(r)
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    client.sendall(b"GET / HTTP/1.0\r\n\r\n")
    kind, channel, rest = r.next_frame({b"C"})
    assert struct.unpack(">H", rest) == (port,)
    assert 0 < channel < CAPSULE_BIT
    assert r.data_until(channel, 18) == b"GET / HTTP/1.0\r\n\r\n"
    reply = b"HTTP/1.0 404 Not Found\r\n\r\n"
    r.send_raw(encode_data(channel, reply) + encode_end(channel))
    answer = b""
    while chunk := client.recv(1000):  # the keeper's half-close: the end
        answer += chunk
    assert answer == reply
    # what capsule wrote is granted back once written
    kind, ch, rest = r.next_frame({b"G"})
    assert ch == channel and struct.unpack(">I", rest) == (len(reply),)
    client.close()
    assert r.next_frame({b"E", b"F"})[:2] == (b"E", channel)
    # the shell goes on meanwhile
    r.send(b"still\n")
    r.until(b"got:still.")


def test_capsule_opens_a_channel_to_a_port(chan_relay):
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    r = chan_relay()
    started(r)
    channel = CAPSULE_BIT | 7
    r.send_raw(encode_open(channel, port))
    assert r.next_frame({b"A", b"F"})[:2] == (b"A", channel)
    peer, _ = server.accept()
    r.send_raw(encode_data(channel, b"ping"))
    assert peer.recv(100) == b"ping"
    peer.sendall(b"pong")
    assert r.data_until(channel, 4) == b"pong"
    peer.shutdown(socket.SHUT_WR)
    assert r.next_frame({b"E", b"D", b"F"})[:2] == (b"E", channel)
    r.send_raw(encode_end(channel))
    peer.settimeout(10)
    assert peer.recv(100) == b""


def test_a_channel_to_a_closed_port_fails_with_the_reason(chan_relay):
    port = free_port()
    r = chan_relay()
    started(r)
    r.send_raw(encode_open(CAPSULE_BIT | 1, port))
    kind, channel, rest = r.next_frame({b"A", b"F"})
    assert (kind, channel) == (b"F", CAPSULE_BIT | 1)
    assert b"Connection refused" in rest and str(port).encode() in rest


def test_the_keeper_sends_no_more_than_the_window_until_granted(chan_relay):
    server = socket.create_server(("127.0.0.1", 0))
    r = chan_relay()
    started(r)
    channel = CAPSULE_BIT | 2
    r.send_raw(encode_open(channel, server.getsockname()[1]))
    assert r.next_frame({b"A", b"F"})[0] == b"A"
    peer, _ = server.accept()
    blob = os.urandom(4 * WINDOW)
    thread = threading.Thread(target=peer.sendall, args=(blob,), daemon=True)
    thread.start()
    got = bytearray()
    try:
        while True:
            kind, ch, rest = r.next_frame({b"D"}, timeout=0.5)
            assert len(rest) <= CHUNK
            got += rest
    except AssertionError:
        pass
    assert len(got) == WINDOW  # exactly a window, and nothing past it
    r.send_raw(encode_grant(channel, len(got)))
    got += r.data_until(channel, len(blob) - len(got))
    assert bytes(got) == blob
    thread.join(5)


def test_data_after_its_end_fails_the_channel(chan_relay):
    server = socket.create_server(("127.0.0.1", 0))
    r = chan_relay()
    started(r)
    channel = CAPSULE_BIT | 3
    r.send_raw(encode_open(channel, server.getsockname()[1]))
    assert r.next_frame({b"A", b"F"})[0] == b"A"
    peer, _ = server.accept()
    r.send_raw(encode_end(channel) + encode_data(channel, b"late"))
    kind, ch, rest = r.next_frame({b"F"})
    assert ch == channel and rest == b"data after its end"
    peer.settimeout(10)
    assert peer.recv(10) == b""
    r.send(b"alive\n")
    r.until(b"got:alive.")


def test_past_the_cap_a_channel_is_refused_and_a_door_connection_counted(chan_relay):
    server = socket.create_server(("127.0.0.1", 0), backlog=64)
    door = free_port()
    r = chan_relay(door=door)
    started(r)
    for i in range(1, LIMIT + 2):
        r.send_raw(encode_open(CAPSULE_BIT | i, server.getsockname()[1]))
    answers = [r.next_frame({b"A", b"F"}) for _ in range(LIMIT + 1)]
    assert [k for k, _, _ in answers].count(b"A") == LIMIT
    refused = [(c, rest) for k, c, rest in answers if k == b"F"]
    assert refused == [(CAPSULE_BIT | (LIMIT + 1), b"32 channels are open (at most 32)")]
    client = socket.create_connection(("127.0.0.1", door), timeout=10)
    assert client.recv(10) == b""  # closed at once
    kind, channel, rest = r.next_frame({b"F"})
    assert channel == 0 and rest.startswith(b"refused 1 connection(s) on port")
    # one closed, and the door takes a connection again
    r.send_raw(encode_fail(CAPSULE_BIT | 1, "done"))
    r.send(b"sync\n")
    r.until(b"got:sync.")
    socket.create_connection(("127.0.0.1", door), timeout=10)
    assert r.next_frame({b"C"})[0] == b"C"


def test_channels_end_with_their_attachment(chan_relay):
    server = socket.create_server(("127.0.0.1", 0))
    first = chan_relay()
    started(first)
    first.send_raw(encode_open(CAPSULE_BIT | 1, server.getsockname()[1]))
    assert first.next_frame({b"A"})[0] == b"A"
    peer, _ = server.accept()
    peer.settimeout(10)
    later = chan_relay(socket=first.socket)
    later.until(b"\x1b\\")
    assert peer.recv(10) == b""  # its socket closed with the attachment it was of


def test_the_shell_is_heard_during_a_bulk_channel(chan_relay):
    """
    A channel at full speed (granted as it comes) and the shell's answers
    take turns: an answer comes while the channel's data keeps coming.
    """
    server = socket.create_server(("127.0.0.1", 0))
    r = chan_relay()
    started(r)
    channel = CAPSULE_BIT | 5
    r.send_raw(encode_open(channel, server.getsockname()[1]))
    assert r.next_frame({b"A"})[0] == b"A"
    peer, _ = server.accept()
    stop = threading.Event()

    def flood():
        try:
            while not stop.is_set():
                peer.sendall(b"z" * 65536)
        except OSError:
            pass
    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        r.data_until(channel, 4 * WINDOW)
        frames_before = len(r.frames)
        r.send(b"echo\n")
        while b"got:echo." not in r.output:
            r.data_until(channel, 1)
        # The answer came while the channel's data kept coming: the flood
        # never ends, so a keeper that served the channel first would never
        # have answered.  (How many of the channel's frames came meanwhile
        # depends on how busy the machine is: not counted.)
        assert thread.is_alive()
        assert len(r.frames) > frames_before
    finally:
        stop.set()
        peer.close()
        thread.join(5)
