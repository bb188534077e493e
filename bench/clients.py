"""
The bench's terminals: a capsule session and the raw Docker exec it is
compared with, each on the reactor and on a blocking socket.

On the reactor (throughput, connect times, floods): L{open_session} opens a
capsule session through L{tests.support.clients.TerminalClient}, acking as
the page does; L{RawExecTerm} reads a TTY exec through capsule's own
exec-start upgrade (no docker-py socket, no thread).  Both have C{out} (an
L{Output}), C{send_input} and C{exit}.

On a blocking socket, in a thread of their own (the echo table's figures):
a keystroke's round trip is a fraction of a millisecond, and a Python
event-loop client adds its own work to each one (Autobahn's frame handling,
the reactor's turns), which a browser's native WebSocket does not.  So the
echo is timed with the leanest client to be had for each side alike:
L{tests.support.clients.BlockingTerminal} (websocket-client) for capsule,
L{LeanExecTerm} (the exec-start upgrade) for the floor.  Both have
C{send_input}, C{recv}, C{drain} and C{exit}.
"""

from __future__ import annotations

import socket
import time

from twisted.internet import defer, reactor
from twisted.internet.endpoints import connectProtocol
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThread, deferToThreadPool

from capsule.engine.exec_process import ExecStreamProtocol, exec_start_request
from tests.support.clients import BlockingTerminal, Output, TerminalClient
from tests.support.live import with_timeout

from measures import READY_INPUT, READY_MARK, BenchError, ms

# What a session's shell runs as, and on what terminal.
USER, WORKDIR = "developer", "/workspace"
ENVIRONMENT = {"TERM": "xterm-256color", "LANG": "en_US.UTF-8"}
SIZE = (80, 24)

# The page acknowledges binary output once this much is unacknowledged, or
# this long after it came.
ACK_BYTES = 64 * 1024
ACK_DELAY = 0.05

# Bytes of output a measuring terminal keeps to look for its markers in.
KEEP = 4096


# -- capsule --------------------------------------------------------------------------


async def open_session(url: str, binary: bool, auto_ack: bool = True, timeout: float = 60):
    """
    Open a session and wait until it is usable: the connect -> usable shell
    measurement.  Returns the terminal and the milliseconds it took.
    """
    t0 = time.perf_counter()
    term = await TerminalClient.connect(url, binary=binary, auto_ack=auto_ack,
                                        ack_bytes=ACK_BYTES, ack_delay=ACK_DELAY, record=False,
                                        timeout=timeout)
    try:
        term.resize(*SIZE)
        await with_timeout(term.connected, timeout, "connected")
        since = term.out.total
        term.send_input(READY_INPUT)
        await term.out.wait_for(READY_MARK, timeout, since)
    except BaseException:
        term.drop()
        raise
    return term, ms(time.perf_counter() - t0)


def lean_session(url: str, binary: bool) -> BlockingTerminal:
    """
    A capsule session on a blocking socket, started (in a thread).
    """
    term = BlockingTerminal(url, binary=binary)
    term.start(*SIZE)
    return term


# -- the raw exec (the floor) -------------------------------------------------------------


class _FloorShell(ProcessProtocol):
    def __init__(self, out: Output) -> None:
        self.out = out
        self.ended = defer.Deferred()

    def childDataReceived(self, childFD, data):
        self.out.feed(data)

    def processEnded(self, reason):
        self.out.lost("the exec stream closed")
        if not self.ended.called:
            self.ended.callback(None)


class RawExecTerm:
    """
    A TTY exec read by the reactor through capsule's own exec-start upgrade:
    what capsule itself cannot beat.
    """

    def __init__(self) -> None:
        self.out = Output(KEEP)
        self.shell = _FloorShell(self.out)
        self.stream: ExecStreamProtocol | None = None

    @classmethod
    async def open(cls, api, endpoint, container_id: str, argv=("bash", "-l"),
                   pool=None) -> "RawExecTerm":
        """
        @param api: a docker-py C{APIClient}, for the exec's creation.
        @param endpoint: the Docker engine's endpoint, for the stream.
        @param pool: the thread pool for C{exec_create} (default: the
            reactor's).
        """
        term = cls()

        def create():
            created = api.exec_create(container_id, list(argv), stdin=True, tty=True, user=USER,
                                      workdir=WORKDIR, environment=dict(ENVIRONMENT))
            return created["Id"], api.api_version

        if pool is None:
            exec_id, version = await deferToThread(create)
        else:
            exec_id, version = await deferToThreadPool(reactor, pool, create)
        stream = ExecStreamProtocol(
            exec_id, exec_start_request(version, exec_id), term.shell,
            on_closed=lambda s, reason: term.shell.processEnded(reason),
            resize=lambda eid, cols, rows: deferToThread(api.exec_resize, eid,
                                                         height=rows, width=cols))
        await connectProtocol(endpoint, stream)
        await with_timeout(stream.upgraded, 30, "the exec-start upgrade")
        stream.resize(*SIZE)
        term.stream = stream
        return term

    def send_input(self, data: bytes) -> None:
        self.stream.write(data)

    async def exit(self, timeout: float = 10) -> None:
        self.stream.write(b"exit\r")
        try:
            await with_timeout(self.shell.ended, timeout, "the floor shell's end")
        except AssertionError:
            self.stream.loseConnection()


class LeanExecTerm:
    """
    A TTY exec on a blocking socket (the floor of the echo measurement).
    """

    def __init__(self, host: str, api, container_id: str) -> None:
        exec_id = api.exec_create(container_id, ["bash", "-l"], stdin=True, tty=True, user=USER,
                                  workdir=WORKDIR, environment=dict(ENVIRONMENT))["Id"]
        if host.startswith("unix://"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(host[len("unix://"):])
        else:
            address = host.split("://", 1)[-1].rsplit(":", 1)
            self.sock = socket.create_connection((address[0], int(address[1])), timeout=30)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(30)
        self.sock.sendall(exec_start_request(api.api_version, exec_id))
        head = b""
        while b"\r\n\r\n" not in head:
            data = self.sock.recv(65536)
            if not data:
                raise BenchError("Docker closed the exec stream before it started")
            head += data
        status, self.pending = head.split(b"\r\n\r\n", 1)
        if b" 101 " not in status.split(b"\r\n", 1)[0] + b" ":
            raise BenchError(f"exec start refused: {status[:200]!r}")
        api.exec_resize(exec_id, height=SIZE[1], width=SIZE[0])

    def send_input(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> bytes:
        if self.pending:
            data, self.pending = self.pending, b""
            return data
        data = self.sock.recv(65536)
        if not data:
            raise BenchError("the exec stream closed")
        return data

    def drain(self, quiet: float = 0.2) -> None:
        self.pending = b""
        self.sock.settimeout(quiet)
        try:
            while self.sock.recv(65536):
                pass
        except TimeoutError:
            pass
        self.sock.settimeout(30)

    def exit(self) -> None:
        try:
            self.sock.sendall(b"exit\r")
        except OSError:
            pass
        self.sock.close()

    def drop(self) -> None:
        self.sock.close()
