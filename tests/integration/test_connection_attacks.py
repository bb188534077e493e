"""
Attacks on capsule's connections (issue 19, items 5 and 6), against a real
capsule and engine: idle sockets and a header trickler under a low file
descriptor limit, and a WebSocket client that floods pings and reads
nothing.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time

from tests.support.httpclient import raw_websocket

from .harness import BlockingTerminal, wait_for

# capsule runs with this many file descriptors at most (RLIMIT_NOFILE).
DESCRIPTORS = 400
IDLE_SOCKETS = 420


def _low_descriptor_server(make_server, *extra, tuning=None):
    server = make_server("--pool-size", "0", "--max-sessions", "16", *extra, start=False,
                         tuning=tuning)
    # prlimit executes twistd in its own process: the pid stays capsule's.
    server.args = ["prlimit", f"--nofile={DESCRIPTORS}:{DESCRIPTORS}", *server.args]
    return server.start()


def _idle_sockets(port: int, count: int) -> list[socket.socket]:
    """
    C{count} connections that send nothing (as many as connect within 2 s
    each).
    """
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        sockets.append(s)
    return sockets


def _closed_by_peer(sock: socket.socket, received: bytearray | None = None) -> bool:
    """
    Whether the peer closed C{sock} (reading gives EOF or a reset); what
    it read goes into C{received}.
    """
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        while True:
            data = sock.recv(65536, socket.MSG_DONTWAIT)
            if not data:
                return True
            if received is not None:
                received += data
    except BlockingIOError:
        return False
    except OSError:
        return True


class Trickler(threading.Thread):
    """
    A request whose headers never end: one header line a second.
    """

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        self.dropped = threading.Event()
        self.stopped = threading.Event()
        self.lines = 0
        self.received = bytearray()

    def run(self) -> None:
        while not self.stopped.wait(1):
            try:
                if _closed_by_peer(self.sock, self.received):
                    self.dropped.set()
                    return
                self.sock.sendall(b"X-Trickle-%d: still coming\r\n" % self.lines)
                self.lines += 1
            except OSError:
                self.dropped.set()
                return

    def stop(self) -> None:
        self.stopped.set()
        self.join(5)
        self.sock.close()


def test_idle_sockets_and_a_trickler_leave_health_and_new_sessions_working(make_server):
    server = _low_descriptor_server(make_server)
    idle = _idle_sockets(server.port, IDLE_SOCKETS)
    trickler = Trickler(server.port)
    trickler.start()
    try:
        status, body = server.health()
        assert status == 200, body
        terminal = BlockingTerminal(server.ws_url, binary=True)
        try:
            terminal.start()
            terminal.run("echo o''k", "ok", timeout=60)
        finally:
            terminal.close()
        # The trickler's headers never end: it is dropped at their deadline,
        # however often a line arrives.
        wait_for(trickler.dropped.is_set, 60, "the header trickler to be dropped")
        assert trickler.lines >= 2
        assert trickler.received.startswith(b"HTTP/1.1 408 "), bytes(trickler.received)
        # capsule kept within its descriptors: a few more requests all answer.
        for _ in range(3):
            assert server.health()[0] == 200
    finally:
        trickler.stop()
        for s in idle:
            s.close()
    assert server.unhandled_errors() == []
    log = server.log()
    assert "connections from 127.0.0.1" in log


# -- the ping flood ------------------------------------------------------------------


def _ping(payload: bytes) -> bytes:
    # A client's frame: FIN, opcode 9, masked (a zero mask keeps it cheap).
    return struct.pack("!BB", 0x89, 0x80 | len(payload)) + b"\0\0\0\0" + payload


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_a_ping_flood_that_never_reads_is_paused_and_dropped(make_server):
    server = make_server("--pool-size", "0", tuning={"ws-stall-timeout": 5})
    # Another user's session, before and after.
    other = BlockingTerminal(server.ws_url, binary=True)
    other.start()
    other.run("echo be''fore", "before", timeout=60)
    before = _rss_mib(server.pid)
    flood = raw_websocket(server.port)
    flood.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    flood.settimeout(0.5)
    frames = _ping(b"p" * 125) * 512
    sent = 0
    closed = False
    deadline = time.monotonic() + 60
    # Send pings for as long as capsule takes them (up to 256 MiB), reading
    # nothing; stop when it closes the connection.
    while sent < 256 * 1024 * 1024 and time.monotonic() < deadline:
        try:
            sent += flood.send(frames)
        except (TimeoutError, socket.timeout):
            continue
        except OSError:
            closed = True
            break
    grown = _rss_mib(server.pid) - before
    if not closed:
        closed = wait_for(lambda: _closed_by_peer(flood), 60, "capsule to drop the flooder")
    flood.close()
    assert closed
    assert grown < 64, f"capsule grew by {grown:.0f} MiB under {sent >> 20} MiB of pings"
    assert sent < 64 * 1024 * 1024, f"capsule read {sent >> 20} MiB of pings from a" \
                                    " client that reads nothing"
    # The other session is untouched.
    other.run("echo af''ter", "after", timeout=60)
    other.close()
    assert "did not read" in server.log()
    assert server.unhandled_errors() == []
