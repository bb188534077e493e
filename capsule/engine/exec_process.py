"""
A Docker exec with a TTY, as a process transport for a ProcessProtocol.

Docker starts an exec's stream by upgrading an HTTP request
(C{POST /exec/{id}/start}) to a raw bidirectional byte stream.  Doing that
upgrade on a Twisted protocol, over a connection the reactor owns from the
start, means no bytes are lost in a client library's response buffer (the
first prompt arrives right after the upgrade), no file descriptor has to be
duplicated and closed, and no thread is needed per session.  With C{Tty} set
the stream is not multiplexed: it is the terminal's bytes as they are.
"""

from __future__ import annotations

import json
import struct
from typing import Callable, Iterator

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from capsule.core.errors import DockerError
from capsule.core.interfaces import IExecProcess

_log = Logger()

_MAX_HEADER = 64 * 1024
# Docker frames each write of the exec's output (at most 32 KiB in practice).
MAX_FRAME = 1024 * 1024
# Docker's stream numbers: its own error messages come on SYSTEM_ERROR.
STDOUT, STDERR, SYSTEM_ERROR = 1, 2, 3


class DemultiplexError(Exception):
    pass


class Demultiplexer:
    """
    Splits the stream of an exec without a TTY, where Docker wraps each
    piece of output in an 8-byte header (stream number, 3 zero bytes, 4-byte
    big-endian length), into C{(stream, payload)} pieces.

    @raise DemultiplexError: from L{feed}, at the first header that is not
        one of Docker's (an unknown stream, padding that is not zero, a
        frame longer than L{MAX_FRAME}); nothing is buffered past that.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        """
        Add C{data}; yield the pieces it completes, in order (those before
        a bad header, then the error).
        """
        self._buffer += data
        buffer, at = self._buffer, 0
        try:
            while len(buffer) - at >= 8:
                stream, padding, length = struct.unpack_from(">B3sI", buffer, at)
                if (stream not in (STDOUT, STDERR, SYSTEM_ERROR) or padding != b"\0\0\0"
                        or length > MAX_FRAME):
                    header = bytes(buffer[at : at + 8]).hex()
                    at = len(buffer)
                    raise DemultiplexError(f"a header that is not Docker's: {header}")
                if len(buffer) - at < 8 + length:
                    break
                at += 8 + length
                yield stream, bytes(buffer[at - length : at])
        finally:
            del buffer[:at]


def exec_start_request(api_version: str, exec_id: str, tty: bool = True) -> bytes:
    body = json.dumps({"Detach": False, "Tty": tty}).encode("ascii")
    return (
        f"POST /v{api_version}/exec/{exec_id}/start HTTP/1.1\r\n"
        "Host: docker\r\n"
        "User-Agent: capsule\r\n"
        "Content-Type: application/json\r\n"
        "Connection: Upgrade\r\n"
        "Upgrade: tcp\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    ).encode("ascii") + body


@implementer(IPushProducer)
class StreamTransport:
    """
    What a stream to a shell (a relay exec's, or the direct path's
    connection to its keeper) does with its transport for the process
    protocol: writes, input throttled by the transport's own flow, and the
    process protocol's pauses passed on as the transport's.  Nothing is done
    once C{_closed}.
    """

    transport = None
    _closed = False

    def write(self, data: bytes) -> None:
        if not self._closed:
            self.transport.write(data)

    def throttle_input(self, producer) -> None:
        """
        Pause C{producer} (the source of what is written here) while the
        other side of this stream is not taking the bytes in.
        """
        if not self._closed and self.transport is not None:
            if getattr(self.transport, "producer", None) is not None:
                self.transport.unregisterProducer()
            self.transport.registerProducer(producer, True)

    def loseConnection(self) -> None:
        if not self._closed:
            self.transport.loseConnection()

    # -- IPushProducer -------------------------------------------------

    def pauseProducing(self) -> None:
        if not self._closed:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if not self._closed:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.loseConnection()


@implementer(IExecProcess, IPushProducer)
class ExecStreamProtocol(StreamTransport, Protocol):
    """
    Speaks the exec-start upgrade to Docker, then relays the raw stream.

    @ivar upgraded: a Deferred that fires with this object once Docker has
        switched the connection to the exec's stream, or fails with a
        L{DockerError} if Docker refused.
    @ivar process_protocol: the L{IProcessProtocol} fed with the output;
        its C{processEnded} is called by whoever owns this stream (the exit
        code has to be asked of Docker after the stream closes).
    """

    def __init__(
        self,
        exec_id: str,
        request: bytes,
        process_protocol,
        on_closed: Callable[["ExecStreamProtocol", Failure], None],
        resize: Callable[[str, int, int], Deferred],
        tty: bool = True,
    ) -> None:
        self.exec_id = exec_id
        # Without a TTY, Docker multiplexes stdout and stderr.
        self._demux = None if tty else Demultiplexer()
        self.pid = None
        self.process_protocol = process_protocol
        # Cancelling it (a timeout) hangs up.
        self.upgraded: Deferred = Deferred(self._cancel_upgrade)
        self._started = False
        self._request = request
        self._on_closed = on_closed
        self._resize_call = resize
        self._header = b""
        self._phase = "header"  # then "stream"; or "refused", or "broken"
        self._pending_size: tuple[int, int] | None = None
        self._resizing = False
        self._closed = False

    # -- the Docker side ---------------------------------------------------

    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        if self._phase == "stream":
            self._deliver(data)
            return
        if self._phase == "broken":
            return
        self._header += data
        if self._phase == "refused":
            self._check_refusal_complete()
            return
        end = self._header.find(b"\r\n\r\n")
        if end < 0:
            if len(self._header) > _MAX_HEADER:
                self._fail_upgrade(DockerError("Docker sent an oversized exec-start response"))
            return
        head, rest = self._header[:end], self._header[end + 4 :]
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        if status not in (101, 200):
            # Docker answers with a JSON body (with a "message") and keeps
            # the connection open: read the body, then hang up.
            self._refused_status = status
            self._body_length = None
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length" and value.strip().isdigit():
                    self._body_length = int(value.strip())
            self._header = rest
            self._phase = "refused"
            self._check_refusal_complete()
            return
        self._header = b""
        self._phase = "stream"
        self._started = True
        self.process_protocol.makeConnection(self)
        upgraded, self.upgraded = self.upgraded, None
        upgraded.callback(self)
        if rest and not self._closed:
            self._deliver(rest)

    def _deliver(self, data: bytes) -> None:
        if self._demux is None:
            self.process_protocol.childDataReceived(1, data)
            return
        try:
            for stream, payload in self._demux.feed(data):
                if stream == SYSTEM_ERROR:
                    _log.warn("Docker says about exec {exec_id}: {message}", exec_id=self.exec_id,
                              message=payload[:500].decode("utf-8", "replace").strip())
                elif not self._closed:
                    self.process_protocol.childDataReceived(stream, payload)
        except DemultiplexError as e:
            # Nothing after a bad header can be trusted to be the output.
            _log.error("the stream of exec {exec_id} is broken ({error}): closing it",
                       exec_id=self.exec_id, error=str(e))
            self._phase = "broken"
            self.transport.abortConnection()

    def _check_refusal_complete(self) -> None:
        body = self._header
        if self._body_length is not None:
            complete = len(body) >= self._body_length
        else:
            complete = body.endswith(b"0\r\n\r\n")
        if complete or len(body) > _MAX_HEADER:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._closed = True
        if self._started:
            self._on_closed(self, reason)
        elif self._phase == "refused":
            self._fail_upgrade(self._refusal())
        else:
            self._fail_upgrade(DockerError(
                f"Docker closed the exec stream before it started: {reason.getErrorMessage()}"))

    def _cancel_upgrade(self, upgraded: Deferred) -> None:
        # No one waits for this stream any more: it must not start later.
        self.upgraded = None
        self._phase = "broken"
        if self.transport is not None and not self._closed:
            self.transport.abortConnection()

    def _refusal(self) -> DockerError:
        text = self._header.decode("utf-8", "replace")
        # The body may be chunked; the JSON object is what matters.
        start, end = text.find("{"), text.rfind("}")
        message = text.strip()
        if 0 <= start < end:
            try:
                message = json.loads(text[start : end + 1]).get("message", message)
            except ValueError:
                pass
        return DockerError(
            f"Docker refused to start the shell (HTTP {self._refused_status}): {message}"
        )

    def _fail_upgrade(self, error: Exception) -> None:
        if self.upgraded is not None:
            upgraded, self.upgraded = self.upgraded, None
            upgraded.errback(error)
        if not self._closed:
            self.transport.abortConnection()

    # -- IExecProcess: what the process protocol may do ------------------

    def writeToChild(self, childFD: int, data: bytes) -> None:
        self.write(data)

    def closeStdin(self) -> None:
        self.loseConnection()

    def resize(self, cols: int, rows: int) -> None:
        self._pending_size = (cols, rows)
        if not self._resizing:
            self._next_resize()

    def _next_resize(self) -> None:
        if self._pending_size is None or self._closed:
            self._resizing = False
            return
        cols, rows = self._pending_size
        self._pending_size = None
        self._resizing = True
        d = self._resize_call(self.exec_id, cols, rows)
        d.addErrback(
            lambda f: _log.warn(
                "resize of exec {exec_id} to {cols}x{rows} failed: {error}",
                exec_id=self.exec_id, cols=cols, rows=rows, error=f.getErrorMessage(),
            )
        )
        d.addBoth(lambda _: self._next_resize())
