"""
The pods/exec stream of the Kubernetes engine (L{capsule.engine.kubernetes}):
a WebSocket opened by an Autobahn client in the reactor, adapted to
L{IExecProcess}.

Its messages are binary, the first byte a channel: 0 the process's input,
1 and 2 its output, 3 its end as a C{Status} (C{Success}, or C{Failure}
with reason C{NonZeroExitCode} and the code as the C{ExitCode} cause), 4 a
terminal size C{{"Width", "Height"}}; with C{v5.channel.k8s.io}, 255 and a
channel number closes that channel (the end of the input).  The API server
relays them from the node's runtime: the bytes on 1 and 2 come from inside
the session and are passed on, never interpreted.
"""

from __future__ import annotations

import json
import uuid

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from capsule.core.errors import ContainerGone, DockerError, DockerUnavailable
from capsule.core.interfaces import IExecProcess

_log = Logger()

EXEC_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255
# How long to wait for an exec's end (its Status on channel 3) after
# capsule let go of it: as long as Docker's exit code may lag.
EXIT_CODE_WAIT = 2.0


def exit_code(status: dict) -> int | None:
    """
    The exit code a pods/exec stream's C{Status} (channel 3) tells.
    """
    if status.get("status") == "Success":
        return 0
    if status.get("reason") == "NonZeroExitCode":
        for cause in (status.get("details") or {}).get("causes") or []:
            if cause.get("reason") == "ExitCode":
                try:
                    return int(cause.get("message"))
                except (TypeError, ValueError):
                    return None
    return None


@implementer(IExecProcess, IPushProducer)
class ExecStream:
    """
    A pods/exec WebSocket as a process transport.

    @ivar upgraded: fires with this object once the WebSocket is open (the
        process protocol was given it first), or fails: L{ContainerGone}
        when the API server says there is no such running pod.
    """

    pid = None

    def __init__(self, reactor, pod: str, process_protocol, tty: bool) -> None:
        self._reactor = reactor
        self.exec_id = f"{pod}/{uuid.uuid4().hex[:12]}"
        self.process_protocol = process_protocol
        self.tty = tty
        self.protocol: ExecClientProtocol | None = None
        self.upgraded: Deferred = Deferred(self._cancel)
        self.code: int | None = None
        self.status: dict | None = None
        self._opened = False
        self._detached = False
        self._ended = False
        self._closed = False
        self._timer = None

    # -- from the protocol -------------------------------------------------

    def opened(self, protocol: "ExecClientProtocol") -> None:
        self.protocol = protocol
        self._opened = True
        self.process_protocol.makeConnection(self)
        upgraded, self.upgraded = self.upgraded, None
        if upgraded is not None:
            upgraded.callback(self)

    def message(self, payload: bytes) -> None:
        if not payload:
            return
        channel, data = payload[0], payload[1:]
        if channel in (STDOUT, STDERR):
            if data and not self._detached and not self._ended:
                self.process_protocol.childDataReceived(channel, data)
        elif channel == ERROR:
            try:
                status = json.loads(data)
            except ValueError:
                status = {"status": "Failure", "message": data[:300].decode("utf-8", "replace")}
            self.status = status
            self.code = exit_code(status)
            if self.code is None and status.get("status") != "Success":
                _log.info("the exec {exec_id} ended: {message}", exec_id=self.exec_id,
                          message=str(status.get("message"))[:300])
            if self.protocol is not None:
                self.protocol.sendClose(1000)

    def closed(self, failure: Exception | None) -> None:
        self._closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if not self._opened:
            upgraded, self.upgraded = self.upgraded, None
            if upgraded is not None:
                upgraded.errback(failure or DockerError("the exec stream closed before it"
                                                        " started"))
            return
        if self._ended:
            return
        self._ended = True
        code = self.code
        self.process_protocol.processEnded(
            Failure(ProcessDone(0)) if code == 0 else Failure(ProcessTerminated(exitCode=code)))

    def _cancel(self, d) -> None:
        self.upgraded = None
        self.abort()

    # -- IExecProcess ------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._opened and not self._closed and not self._detached and data:
            self.protocol.sendMessage(bytes([STDIN]) + bytes(data), isBinary=True)

    def writeToChild(self, childFD: int, data: bytes) -> None:
        self.write(data)

    def resize(self, cols: int, rows: int) -> None:
        if self._opened and not self._closed and self.tty:
            self.protocol.sendMessage(bytes([RESIZE]) + json.dumps(
                {"Width": int(cols), "Height": int(rows)}).encode(), isBinary=True)

    def throttle_input(self, producer) -> None:
        transport = self._transport()
        if transport is not None and not self._closed:
            if getattr(transport, "producer", None) is not None:
                transport.unregisterProducer()
            transport.registerProducer(producer, True)

    # An IConsumer of the process's input (an upload's archive): the
    # producer is paused while the WebSocket's connection cannot take more.

    def registerProducer(self, producer, streaming: bool) -> None:
        self.throttle_input(producer)

    def unregisterProducer(self) -> None:
        transport = self._transport()
        if transport is not None and getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()

    @property
    def disconnected(self) -> bool:
        """
        Whether the stream closed (no input reaches the process any more).
        """
        return self._closed or self._detached

    def close_input(self) -> None:
        """
        The end of the process's input (v5: channel 0 closed; v4 cannot say
        it, so the stream is closed).
        """
        if not self._opened or self._closed:
            return
        if self.protocol.subprotocol == EXEC_PROTOCOLS[0]:
            self.protocol.sendMessage(bytes([CLOSE, STDIN]), isBinary=True)
        else:
            self.protocol.sendClose(1000)

    closeStdin = close_input

    def loseConnection(self) -> None:
        """
        Let go of the process: its input ends, its output is not read any
        more, and its end is awaited (L{EXIT_CODE_WAIT}) to learn its code.
        """
        if not self._opened or self._closed or self._detached:
            return
        self._detached = True
        self.close_input()
        self._timer = self._reactor.callLater(EXIT_CODE_WAIT, self._give_up)

    def _give_up(self) -> None:
        if not self._closed and self.protocol is not None:
            self.protocol.sendClose(1000)
            self._timer = self._reactor.callLater(EXIT_CODE_WAIT, self.abort)

    def abort(self) -> None:
        transport = self._transport()
        if transport is not None and not self._closed:
            transport.abortConnection()

    def _transport(self):
        return None if self.protocol is None else self.protocol.transport

    def pauseProducing(self) -> None:
        transport = self._transport()
        if transport is not None and not self._closed:
            transport.pauseProducing()

    def resumeProducing(self) -> None:
        transport = self._transport()
        if transport is not None and not self._closed:
            transport.resumeProducing()

    def stopProducing(self) -> None:
        self.loseConnection()


class ExecClientProtocol(WebSocketClientProtocol):
    subprotocol = None

    def onConnect(self, response):
        self.subprotocol = response.protocol

    def onOpen(self):
        if hasattr(self.transport, "setTcpNoDelay"):
            try:
                self.transport.setTcpNoDelay(True)
            except Exception:
                pass
        self.factory.stream.opened(self)

    def onMessage(self, payload, isBinary):
        self.factory.stream.message(payload)

    def onClose(self, wasClean, code, reason):
        stream = self.factory.stream
        failure = None
        if not stream._opened:
            failure = self._refusal(reason)
        stream.closed(failure)

    def _refusal(self, reason) -> Exception:
        line = getattr(self, "http_status_line", None) or ""
        parts = line.split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        body = bytes(getattr(self, "data", b"") or b"")
        start, end = body.find(b"{"), body.rfind(b"}")
        message = line or str(reason)
        if 0 <= start < end:
            try:
                message = json.loads(body[start:end + 1]).get("message") or message
            except ValueError:
                pass
        if status == 404 or (status == 400 and any(text in message for text in (
                "completed pod", "container not found", "not running", "is terminated"))):
            return ContainerGone(f"the session's pod is gone or not running: {message}")
        return DockerError(f"Kubernetes refused the exec ({message or reason})")


class ExecClientFactory(WebSocketClientFactory):
    protocol = ExecClientProtocol
    noisy = False

    def __init__(self, stream: ExecStream, url: str, headers: dict[str, str]) -> None:
        super().__init__(url, protocols=list(EXEC_PROTOCOLS), headers=headers)
        self.stream = stream
        self.setProtocolOptions(maxFramePayloadSize=16 * 1024 * 1024,
                                maxMessagePayloadSize=16 * 1024 * 1024,
                                autoFragmentSize=0, openHandshakeTimeout=60,
                                closeHandshakeTimeout=2, failByDrop=False)

    def clientConnectionFailed(self, connector, reason):
        self.stream.closed(DockerUnavailable(reason.getErrorMessage()))
