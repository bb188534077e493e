"""
capsule-keeper's TCP listener (-t), without Docker (see tests/keeper_harness.py):
started with -d and a secret on its stdin, it takes an attachment over TCP
only from a connection whose first frame is that secret.  A wrong secret, a
peer sending garbage, or too many connections waiting are closed, and the
attachment in place never notices.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time

import pytest

from capsule.core.keeper import (FrameReader, encode_hello, encode_input, encode_secret,
                                 keeper_start_argv)
from tests.keeper_harness import keeper, kill_keepers, socket_path  # noqa: F401 (fixtures)

SHELL = ["sh", "-c", "stty -echo; echo ready.; while read line; do echo got:$line.; done"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Direct:
    """
    A keeper started as capsule starts one for the direct path, on a port
    of its own.
    """

    def __init__(self, keeper, command=SHELL) -> None:
        self.keeper = keeper
        self.dir, self.socket = socket_path()
        self.port = free_port()
        self.secret = os.urandom(32)
        self.argv = keeper_start_argv(tuple(command), 1 << 20, self.socket, self.port,
                                      program=str(keeper.binary))

    def start(self, secret: bytes | None = None, stdin: bytes | None = None):
        data = stdin if stdin is not None else encode_secret(secret or self.secret)
        return subprocess.run(self.argv, input=data, env=self.keeper.env(),
                               capture_output=True, timeout=10)

    def connect(self, first: bytes) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        s.sendall(first)
        return s

    def attach(self, offset: int = 0) -> "Attachment":
        return Attachment(self.connect(encode_secret(self.secret) + encode_hello(offset)))

    def stop(self) -> None:
        kill_keepers(self.socket)


class Attachment:
    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.reader = FrameReader()
        self.output = bytearray()
        self.kinds: list[bytes] = []
        self.closed = False

    def read(self, timeout: float) -> None:
        self.conn.settimeout(timeout)
        try:
            data = self.conn.recv(1 << 16)
        except socket.timeout:
            return
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            return
        for kind, payload in self.reader.feed(data):
            self.kinds.append(kind)
            if kind == b"o":
                self.output += payload

    def until(self, marker: bytes, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while marker not in self.output:
            left = deadline - time.monotonic()
            assert left > 0 and not self.closed, (
                f"no {marker!r}: closed {self.closed}, output {bytes(self.output[-200:])!r}")
            self.read(left)

    def send(self, data: bytes) -> None:
        self.conn.sendall(encode_input(data))


def closed_without_a_byte(conn: socket.socket, timeout: float = 10) -> bool:
    """
    Whether the keeper closes C{conn} having sent nothing on it.
    """
    conn.settimeout(timeout)
    try:
        return conn.recv(1 << 16) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def direct(keeper):
    made = []

    def make(*args):
        made.append(Direct(keeper, *args))
        return made[-1]

    yield make
    for d in made:
        d.stop()


def test_the_secret_opens_an_attachment(direct):
    d = direct()
    started = d.start()
    assert (started.returncode, started.stdout, started.stderr) == (0, b"", b"")
    a = d.attach()
    a.until(b"ready.")
    assert bytes(a.output).startswith(b"\x1b_capsule-keeper;offset=0;dropped=0\x1b\\")
    a.send(b"hello\n")
    a.until(b"got:hello.")


@pytest.mark.parametrize("first", [
    pytest.param(None, id="wrong secret"),
    pytest.param(b"a" + struct.pack(">IQHH", 12, 0, 80, 24), id="a hello without a secret"),
    pytest.param(b"s" + struct.pack(">I", 31) + bytes(31), id="a short secret"),
    pytest.param(b"s" + struct.pack(">I", 2**32 - 1), id="a huge secret"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="HTTP"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64), id="TLS"),
    pytest.param(bytes(range(256)) * 64, id="16 KiB of bytes"),
])
def test_any_other_first_frame_is_closed_and_the_attachment_goes_on(direct, first):
    d = direct()
    assert d.start().returncode == 0
    a = d.attach()
    a.until(b"ready.")
    if first is None:
        first = encode_secret(os.urandom(32)) + encode_hello(0)
    intruder = d.connect(first)
    assert closed_without_a_byte(intruder)
    a.send(b"still\n")
    a.until(b"got:still.")
    assert b"k" not in a.kinds and not a.closed


def test_a_peer_that_says_nothing_is_closed_and_waiting_ones_are_few(direct):
    """
    At most 4 connections wait to prove themselves (a fifth is closed at
    once); none holds the attachment up.
    """
    d = direct()
    assert d.start().returncode == 0
    a = d.attach()
    a.until(b"ready.")
    silent = [d.connect(b"") for _ in range(4)]
    time.sleep(0.2)
    fifth = d.connect(b"")
    assert closed_without_a_byte(fifth, timeout=3)
    a.send(b"meanwhile\n")
    a.until(b"got:meanwhile.")
    # The silent ones are closed after their 5 s.
    assert all(closed_without_a_byte(s, timeout=10) for s in silent)
    b = d.attach()  # and a new attachment takes over, with the replay
    b.until(b"got:meanwhile.")
    a.read(5)
    assert b"k" in a.kinds


def test_starting_again_leaves_the_running_keeper_alone(direct):
    d = direct()
    assert d.start().returncode == 0
    a = d.attach()
    a.until(b"ready.")
    assert d.start(secret=os.urandom(32)).returncode == 0
    a.send(b"same\n")
    a.until(b"got:same.")
    assert b"k" not in a.kinds
    # The secret is still the first one.
    assert closed_without_a_byte(d.connect(encode_secret(os.urandom(32))))


@pytest.mark.parametrize("stdin", [b"", b"s" + struct.pack(">I", 32) + bytes(10),
                                   b"i" + struct.pack(">I", 32) + bytes(32)],
                         ids=["none", "short", "another frame"])
def test_no_secret_no_keeper(direct, stdin):
    d = direct()
    started = d.start(stdin=stdin)
    assert started.returncode == 255
    assert b"secret" in started.stderr
    assert not os.path.exists(d.socket)
