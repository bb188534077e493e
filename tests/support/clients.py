"""
Real WebSocket clients of capsule, for the integration tests, the benchmark
and the soak script (with L{tests.support.live}, which starts the server).

 - L{TerminalClient}: a session over Autobahn, on the reactor.
 - L{BlockingTerminal}: a session over websocket-client, on a blocking
   socket, for scripts and threads.
 - L{Output}: terminal output, counted and awaitable.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import time
import uuid

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.python.failure import Failure

from tests.support.live import WaitFailed, with_timeout

BINARY_PROTOCOL = "capsule.binary.v1"

# The start of a JSON output frame as capsule encodes it: what the lean
# path of a client decodes without parsing JSON.
_OUTPUT_PREFIX = b'{"type":"output","data":"'


# -- terminal output ----------------------------------------------------------------


class Output:
    """
    The terminal output a client received: counted, kept whole (or, with
    C{keep}, only about its last C{keep} bytes), and awaitable.
    """

    def __init__(self, keep: int | None = None) -> None:
        self.total = 0
        self.chunks = 0
        self._keep = keep
        self._buf = bytearray()
        self._start = 0  # the stream offset of _buf[0]
        self._waiting: list = []
        self._lost: str | None = None

    @property
    def kept(self) -> bytes:
        return bytes(self._buf)

    @property
    def start(self) -> int:
        return self._start

    def clear(self) -> None:
        """
        Forget what was kept; waiters look at what comes from now on.
        """
        del self._buf[:]
        self._start = self.total

    def tail(self, size: int = 1000) -> bytes:
        return bytes(self._buf[-size:])

    def feed(self, data: bytes) -> None:
        before = self.total
        self.total += len(data)
        self.chunks += 1
        self._buf += data
        if self._waiting:
            waiting, self._waiting = self._waiting, []
            for entry in waiting:
                found = self._search(entry[0], entry[1], before)
                if found is None:
                    self._waiting.append(entry)
                else:
                    entry[2].callback(found)
        if self._keep is not None and len(self._buf) > 2 * self._keep:
            cut = len(self._buf) - self._keep
            del self._buf[:cut]
            self._start += cut

    def _search(self, pattern, since: int, before: int):
        """
        A marker (bytes) among what came after C{since}, looking only where
        bytes after C{before} could complete it: the count so far, or None.
        A compiled pattern: its match in what is kept after C{since}, or None.
        """
        if isinstance(pattern, bytes):
            start = max(since, before - len(pattern) + 1, self._start) - self._start
            return self.total if self._buf.find(pattern, start) >= 0 else None
        # On a copy: a match must not change when more output comes.
        return pattern.search(bytes(self._buf), max(since, self._start) - self._start)

    def wait_for(self, pattern: bytes | re.Pattern, timeout: float,
                 since: int | None = None) -> defer.Deferred:
        """
        Fire once C{pattern} appears in what was received after C{since}
        (a byte count; default: from now on): with the byte count for a
        marker, with the match for a compiled pattern.  Fail with
        L{WaitFailed} after C{timeout} seconds, or when the stream ends.
        """
        since = self.total if since is None else since
        found = self._search(pattern, since, since)
        if found is not None:
            return defer.succeed(found)
        shown = pattern if isinstance(pattern, bytes) else pattern.pattern
        if self._lost is not None:
            return defer.fail(WaitFailed(f"no {shown!r}: {self._lost}; output ended with"
                                         f" {self.tail()!r}"))
        d = defer.Deferred(lambda d: self._waiting.remove(entry))
        entry = (pattern, since, d)
        self._waiting.append(entry)

        def timed_out(f):
            f.trap(defer.TimeoutError)
            raise WaitFailed(f"no {shown!r} within {timeout:g} s; output ended with"
                             f" {self.tail()!r}")

        return d.addTimeout(timeout, reactor).addErrback(timed_out)

    def lost(self, why: str) -> None:
        """
        The stream ended: whoever waits will wait in vain.
        """
        self._lost = why
        waiting, self._waiting = self._waiting, []
        for pattern, _, d in waiting:
            shown = pattern if isinstance(pattern, bytes) else pattern.pattern
            d.errback(WaitFailed(f"no {shown!r}: {why}; output ended with {self.tail()!r}"))


class _Once:
    """
    Something that happens at most once; each caller awaits it through a
    Deferred of its own, so that nobody's result is consumed by another.
    """

    def __init__(self) -> None:
        self.happened = False
        self._result = None
        self._waiting: list[defer.Deferred] = []

    def fire(self, result) -> None:
        if self.happened:
            return
        self.happened, self._result = True, result
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            self._deliver(d)

    def _deliver(self, d: defer.Deferred) -> None:
        if isinstance(self._result, Failure):
            d.errback(self._result)
        else:
            d.callback(self._result)

    def deferred(self) -> defer.Deferred:
        d = defer.Deferred(lambda d: self._waiting.remove(d))
        if self.happened:
            self._deliver(d)
        else:
            self._waiting.append(d)
        return d


# -- a session on the reactor ---------------------------------------------------------


class _TerminalProtocol(WebSocketClientProtocol):
    def onConnect(self, response):
        self.factory.terminal._handshaken(self, response.protocol)

    def onOpen(self):
        # Autobahn means to set TCP_NODELAY but tries before its options are
        # in place, so it never does: set it, as browsers do.
        self.transport.setTcpNoDelay(True)
        self.factory.terminal._opened.fire(self.factory.terminal)

    def onMessage(self, payload, isBinary):
        self.factory.terminal._received(payload, isBinary)

    def onClose(self, wasClean, code, reason):
        self.factory.terminal._lost(code, reason)


class TerminalClient:
    """
    One capsule session from the client's side, over a real WebSocket
    (Autobahn, on the reactor), in either protocol.

    With C{record} (the default), every message is kept (C{all_messages})
    and queued for L{next}, and all output is kept (C{output}).  Without
    it, for measurements, output is only counted and its last bytes kept,
    and JSON output frames are decoded without a JSON parser.

    Binary protocol, with C{auto_ack}: output is acknowledged once
    C{ack_bytes} are unacknowledged (0: every frame at once), or
    C{ack_delay} seconds after it came.
    """

    KEEP = 4096  # bytes of output kept without record

    def __init__(self, auto_ack: bool = True, ack_bytes: int = 0, ack_delay: float = 0.05,
                 record: bool = True) -> None:
        self.protocol: WebSocketClientProtocol | None = None
        self.binary = False
        self.auto_ack = auto_ack
        self.ack_bytes = ack_bytes
        self.ack_delay = ack_delay
        self.record = record
        self.out = Output(None if record else self.KEEP)
        self.received = 0  # binary: the offset just past the last output byte
        self.acked = 0
        self.session_id: str | None = None
        self.errors: list[dict] = []
        self.close_code = self.close_reason = None
        self.messages = defer.DeferredQueue() if record else None
        self.all_messages: list | None = [] if record else None
        self._opened, self._connected, self._exited, self._closed = (
            _Once(), _Once(), _Once(), _Once())
        self._ack_timer = None

    @classmethod
    async def connect(cls, url: str, session_id: str | None = None, origin=None,
                      binary: bool = False, offset: int | None = None,
                      auto_ack: bool = True, *, ack_bytes: int = 0, ack_delay: float = 0.05,
                      record: bool = True, timeout: float = 10, profile: str | None = None,
                      headers: dict | None = None) -> "TerminalClient":
        """
        Open a WebSocket to C{url} (C{ws://host:port/ws}), for a session of
        C{profile}, with C{headers} (credentials); fail with
        C{ConnectionError} when capsule refuses it.
        """
        client = cls(auto_ack, ack_bytes=ack_bytes, ack_delay=ack_delay, record=record)
        query = []
        if session_id is not None:
            query.append(f"session_id={session_id}")
        if offset is not None:
            query.append(f"offset={offset}")
        if profile is not None:
            query.append(f"profile={profile}")
        if query:
            url = f"{url}?{'&'.join(query)}"
        factory = WebSocketClientFactory(
            url, origin=origin, protocols=[BINARY_PROTOCOL] if binary else None,
            headers=headers)
        factory.protocol = _TerminalProtocol
        factory.terminal = client
        factory.setProtocolOptions(autoPingInterval=0, openHandshakeTimeout=timeout,
                                   closeHandshakeTimeout=5,
                                   # capsule's text frames are checked by json.loads
                                   utf8validateIncoming=record)
        host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
        await TCP4ClientEndpoint(reactor, host, int(port), timeout=timeout).connect(factory)
        await with_timeout(client._opened.deferred(), timeout, "the WebSocket handshake")
        if binary and not client.binary:
            await client.close()
            raise ConnectionError("capsule did not accept the binary subprotocol")
        return client

    # -- what can be awaited --

    @property
    def _protocol(self):
        return self.protocol

    @property
    def closed(self) -> defer.Deferred:
        """
        Fires with C{(code, reason)} once the connection closed.
        """
        return self._closed.deferred()

    @property
    def connected(self) -> defer.Deferred:
        """
        Fires with the C{connected} message; fails if the connection closes
        first.
        """
        return self._connected.deferred()

    @property
    def exited(self) -> defer.Deferred:
        """
        Fires with the C{exit} message; fails if the connection closes first.
        """
        return self._exited.deferred()

    @property
    def is_closed(self) -> bool:
        return self._closed.happened

    @property
    def is_open(self) -> bool:
        return (self.protocol is not None and not self._closed.happened
                and self.protocol.state == WebSocketProtocol.STATE_OPEN)

    @property
    def output(self) -> bytes:
        """
        The output kept (all of it, with record), since the last L{run}.
        """
        return self.out.kept

    @property
    def transport(self):
        return self.protocol.transport

    # -- frames in --

    def _handshaken(self, protocol, subprotocol) -> None:
        self.protocol = protocol
        self.binary = subprotocol == BINARY_PROTOCOL

    def _received(self, payload: bytes, is_binary: bool) -> None:
        if is_binary:
            self.received += len(payload)
            self.out.feed(payload)
            if self.record:
                self._keep_message(payload)
            if self.auto_ack:
                self._maybe_ack()
            return
        if not self.record and payload.startswith(_OUTPUT_PREFIX):
            self.out.feed(base64.b64decode(payload[len(_OUTPUT_PREFIX):-2]))
            return
        message = json.loads(payload)
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "output":
            self.out.feed(base64.b64decode(message["data"]))
        elif kind == "connected":
            self.session_id = message.get("session_id")
            if "offset" in message:
                self.received = self.acked = message["offset"]
            self._connected.fire(message)
        elif kind == "exit":
            self._exited.fire(message)
        elif kind == "dropped":
            self.received = max(self.received, message.get("offset", 0))
        elif kind == "error":
            self.errors.append(message)
        if self.record:
            self._keep_message(message)

    def _keep_message(self, message) -> None:
        self.all_messages.append(message)
        self.messages.put(message)

    def _lost(self, code, reason) -> None:
        self.close_code, self.close_reason = code, reason
        if self._ack_timer is not None and self._ack_timer.active():
            self._ack_timer.cancel()
        if not self._opened.happened:
            self._opened.fire(Failure(ConnectionError(f"closed before open: {code} {reason}")))
        why = f"the WebSocket closed ({code} {reason}; errors {self.errors})"
        self.out.lost(why)
        self._connected.fire(Failure(WaitFailed(f"no connected message: {why}")))
        self._exited.fire(Failure(WaitFailed(f"no exit message: {why}")))
        self._closed.fire((code, reason))

    def _maybe_ack(self) -> None:
        if self.received - self.acked >= self.ack_bytes:
            self.ack()
        elif self._ack_timer is None:
            self._ack_timer = reactor.callLater(self.ack_delay, self.ack)

    # -- frames out --

    def ack(self, offset: int | None = None) -> None:
        """
        Acknowledge output up to C{offset} (default: all received).  Only in
        the binary protocol, and not once closing: raising inside
        dataReceived would make Twisted abort the connection and drop
        frames still being written.
        """
        if self._ack_timer is not None:
            if self._ack_timer.active():
                self._ack_timer.cancel()
            self._ack_timer = None
        if not self.binary or not self.is_open:
            return
        if offset is None:
            if self.received <= self.acked:
                return
            offset = self.received
        if isinstance(offset, int):
            self.acked = max(self.acked, offset)
        self.send({"type": "ack", "offset": offset})

    def send(self, message) -> None:
        self.send_raw(json.dumps(message).encode())

    def send_raw(self, payload: bytes, binary: bool = False) -> None:
        self.protocol.sendMessage(payload, isBinary=binary)

    def type(self, text: str) -> None:
        """
        Send C{text} as a JSON C{input} message (either protocol takes it).
        """
        self.send({"type": "input", "data": text})

    def send_input(self, data: bytes) -> None:
        """
        Send keystrokes as the protocol in use does: a binary frame, or a
        JSON C{input} message.  Nothing once the connection is closing.
        """
        if not self.is_open:
            return
        if self.binary:
            self.protocol.sendMessage(data, isBinary=True)
        else:
            self.type(data.decode("utf-8"))

    def resize(self, cols: int, rows: int) -> None:
        if self.is_open:
            self.send({"type": "resize", "cols": cols, "rows": rows})

    # -- conversations --

    async def next(self, kind: str | None = None, timeout: float = 20):
        """
        The next message (of C{kind}, skipping others; C{"binary"} for an
        output frame of the binary protocol), or fail on timeout.
        """
        if self.messages is None:
            raise TypeError("next() needs a client made with record=True")
        while True:
            message = await with_timeout(self.messages.get(), timeout,
                                         f"a {kind or 'any'} message")
            if kind is None or (isinstance(message, dict) and message.get("type") == kind):
                return message
            if kind == "binary" and isinstance(message, bytes):
                return message

    async def start(self, cols: int = 80, rows: int = 24, timeout: float = 30) -> str:
        """
        Ask for a new session (the first resize) and return its id.
        """
        self.send({"type": "resize", "cols": cols, "rows": rows})
        if self.record:
            message = await self.next("connected", timeout)
        else:
            message = await with_timeout(self.connected, timeout, "the connected message")
        return message["session_id"]

    async def until(self, pattern: bytes | str, timeout: float = 20) -> re.Match:
        """
        Wait until the output kept so far matches C{pattern}; return the match.
        """
        if isinstance(pattern, str):
            pattern = pattern.encode()
        return await self.out.wait_for(re.compile(pattern, re.S), timeout, since=self.out.start)

    async def run(self, command: str, timeout: float = 20) -> str:
        """
        Run a shell command and return what it printed (between markers).
        The output kept starts anew.
        """
        marker = uuid.uuid4().hex[:8]
        self.out.clear()
        self.type(f"echo {marker}B; {command}; echo {marker}E\r")
        found = await self.until(rf"{marker}B\r\n(.*?){marker}E\r\n".encode(), timeout)
        return found.group(1).decode("utf-8", "replace")

    async def exit(self, timeout: float = 20) -> None:
        """
        End the shell, and wait for capsule's C{exit} message and its close.
        """
        if self._closed.happened:
            return
        self.send_input(b"exit\r")
        try:
            await with_timeout(self.exited, timeout, "the exit message")
            await with_timeout(self.closed, 10, "the close after exit")
        except BaseException:
            self.drop()
            raise

    async def close(self, code: int = 1000) -> None:
        if not self._closed.happened:
            self.protocol.sendClose(code)
            await with_timeout(self.closed, 10, "the close handshake")

    def drop(self) -> None:
        """
        Vanish without a close handshake, as a network drop does.
        """
        if self.protocol is not None and not self._closed.happened:
            self.protocol.transport.abortConnection()


# -- a session on a blocking socket -----------------------------------------------------


class SessionEnded(Exception):
    """
    capsule ended the session or closed the connection.
    """


class BlockingTerminal:
    """
    One capsule session through websocket-client on a blocking socket: for
    scripts and threads, and wherever an event loop's own work per message
    is not wanted (a browser's WebSocket has none).

    Binary protocol: output is acknowledged once C{ACK_BYTES} are
    unacknowledged.
    """

    ACK_BYTES = 64 * 1024

    def __init__(self, url: str, session_id: str | None = None, *, binary: bool = False,
                 timeout: float = 30) -> None:
        import websocket  # websocket-client: a test and bench dependency

        self._timeout_error = websocket.WebSocketTimeoutException
        self._closed_error = websocket.WebSocketConnectionClosedException
        target = url if session_id is None else f"{url}?session_id={session_id}"
        self.timeout = timeout
        self.ws = websocket.create_connection(
            target, timeout=timeout, subprotocols=[BINARY_PROTOCOL] if binary else None,
            sockopt=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self.binary = self.ws.subprotocol == BINARY_PROTOCOL
        if binary and not self.binary:
            self.ws.close()
            raise ConnectionError("capsule did not accept the binary subprotocol")
        self.session_id = session_id
        self.received = self.acked = 0
        self.output = b""  # what next() and run() saw go by

    def send(self, message: dict) -> None:
        self.ws.send(json.dumps(message))

    def send_input(self, data: bytes) -> None:
        if self.binary:
            self.ws.send_binary(data)
        else:
            self.send({"type": "input", "data": data.decode("utf-8")})

    def _frame(self):
        """
        The next frame: output bytes, a message (a dict), or C{None} for a
        ping or pong (answered by websocket-client; returned so that a
        caller's deadline is checked after each, which a ping would
        otherwise push back).
        """
        opcode, payload = self.ws.recv_data(control_frame=True)
        if opcode in (9, 10):
            return None
        if opcode == 2:
            self.received += len(payload)
            if self.received - self.acked >= self.ACK_BYTES:
                self.acked = self.received
                self.send({"type": "ack", "offset": self.received})
            return payload
        if opcode == 8:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
            raise SessionEnded(f"capsule closed the WebSocket ({code})")
        message = json.loads(payload)
        if message.get("type") == "output":
            return base64.b64decode(message["data"])
        if message.get("type") == "connected":
            self.session_id = message["session_id"]
            self.received = self.acked = message.get("offset", 0)
        return message

    def recv(self) -> bytes:
        """
        The next output, as it came; raise L{SessionEnded} if the session
        ends first.  Other messages are skipped.
        """
        while True:
            frame = self._frame()
            if frame is None:
                continue
            if isinstance(frame, bytes):
                return frame
            if frame.get("type") == "exit":
                raise SessionEnded(f"the session ended: {frame}")

    def _read_until(self, check, timeout: float, what: str):
        """
        Read frames, adding output to C{output}, until C{check(frame)}
        returns something other than None, and return that.
        """
        deadline = time.monotonic() + timeout
        try:
            while True:
                self.ws.settimeout(max(0.01, deadline - time.monotonic()))
                frame = self._frame()
                if frame is None:
                    continue
                if isinstance(frame, bytes):
                    self.output += frame
                found = check(frame)
                if found is not None:
                    return found
        except self._timeout_error:
            raise WaitFailed(f"no {what} within {timeout:g} s; output ended with"
                             f" {self.output[-300:]!r}") from None
        finally:
            self.ws.settimeout(self.timeout)

    def next(self, kind: str, timeout: float = 20) -> dict:
        """
        The next message of C{kind}; output meanwhile is added to
        C{output}, and an C{error} (unless awaited) raises L{SessionEnded}.
        """
        def check(frame):
            if isinstance(frame, dict):
                if frame.get("type") == kind:
                    return frame
                if frame.get("type") == "error":
                    raise SessionEnded(f"error frame: {frame}")
            return None

        return self._read_until(check, timeout, f"{kind} message")

    def start(self, cols: int = 80, rows: int = 24, timeout: float = 30) -> str:
        """
        Ask for a new session (the first resize) and return its id.
        """
        self.send({"type": "resize", "cols": cols, "rows": rows})
        return self.next("connected", timeout)["session_id"]

    def run(self, command: str, expect: str, timeout: float = 20) -> None:
        """
        Type C{command} and wait until C{expect} appears in what follows;
        an C{error} or C{exit} meanwhile raises L{SessionEnded}.
        """
        self.output = b""
        self.send_input(command.encode() + b"\r")

        def check(frame):
            if isinstance(frame, dict) and frame.get("type") in ("error", "exit"):
                raise SessionEnded(f"unexpected {frame}")
            return True if expect.encode() in self.output else None

        self._read_until(check, timeout, repr(expect))

    def drain(self, quiet: float = 0.2) -> None:
        """
        Read until nothing came for C{quiet} seconds.
        """
        self.ws.settimeout(quiet)
        try:
            while True:
                self._frame()
        except self._timeout_error:
            pass
        finally:
            self.ws.settimeout(self.timeout)

    def exit(self, timeout: float = 10) -> dict:
        """
        End the shell; return capsule's C{exit} message once the
        connection closed.
        """
        self.send_input(b"exit\r")
        message = self.next("exit", timeout)
        try:
            while True:
                self._frame()
        except (SessionEnded, self._closed_error, OSError):
            pass
        self.ws.shutdown()
        return message

    def drop(self) -> None:
        """
        Vanish without a close handshake, as a network drop does.
        """
        try:
            self.ws.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.ws.shutdown()

    def close(self) -> None:
        self.ws.close(timeout=2)
