"""
The direct path to a session's keeper: a TCP connection from capsule to the
keeper's listener at the container's address, instead of a relay exec whose
every byte crosses dockerd and containerd-shim.

The keeper frames its stream either way (L{capsule.core.keeper}), so the
session's L{ShellProtocol<capsule.engine.keeper_stream.ShellProtocol>} reads
a L{DirectStream} exactly as it reads a relay exec: the same frames, the
same preamble checked against the offset asked for, the same backpressure
(pausing the stream stops reading the socket; the keeper stops reading the
shell's pty), the same replay.

Only capsule may attach: the keeper is started (C{capsule-keeper -d -t
PORT}, an exec that exits at once) with a per-session secret on its stdin,
and a TCP connection's first frame must carry it, or the keeper closes the
connection without disturbing the attachment in place.  The secret lives in
the container's label L{SECRET_LABEL} (the Docker API's, which nothing in the
container can read), so a capsule that restarted finds it again.  Anything
that fails on this path (no address, an image whose keeper has no C{-d}, a
refused or unanswered connection) raises L{KeeperUnreachable}, and the
caller falls back to the relay exec.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone, NoRouteError, ProcessDone, ProcessTerminated
from twisted.internet.error import TCPTimedOutError
from twisted.internet.error import TimeoutError as ConnectingTimeoutError
from twisted.internet.interfaces import IPushProducer, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from zope.interface import implementer

from capsule.core.interfaces import IExecProcess
from capsule.core.keeper import (DIRECT_PORT, SECRET_LABEL, encode_hello, encode_secret,
                                 keeper_start_argv)
from capsule.engine.docker import OneStream
from capsule.engine.exec_process import StreamTransport

__all__ = ["DirectKeeper", "DirectStream", "KeeperUnreachable", "SECRET_LABEL"]

_log = Logger()


class KeeperUnreachable(Exception):
    "The direct path cannot be had (the sentence says why): use the relay exec."


@implementer(IExecProcess, IPushProducer)
class DirectStream(StreamTransport, Protocol):
    """
    A TCP connection to a session's keeper, presented to a process protocol
    as a relay exec's stream is: the keeper's frames on fd 1, its end as
    C{processEnded}.

    @ivar ready: fires with this stream at the keeper's first bytes (its
        secret was taken), or fails with L{KeeperUnreachable} if the
        connection closed first.
    """

    exec_id = None

    def __init__(self, process_protocol, secret: bytes, offset: int) -> None:
        self.process_protocol = process_protocol
        self._greeting = encode_secret(secret) + encode_hello(offset)
        self.ready: Deferred | None = Deferred(self._cancel)
        self._started = False
        self._closed = False

    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            # A keystroke's echo must not wait for the previous one's ack.
            self.transport.setTcpNoDelay(True)
        self.transport.write(self._greeting)

    def dataReceived(self, data: bytes) -> None:
        if not self._started:
            self._started = True
            ready, self.ready = self.ready, None
            self.process_protocol.makeConnection(self)
            if ready is not None:
                ready.callback(self)
        if not self._closed:
            self.process_protocol.childDataReceived(1, data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._closed = True
        if not self._started:
            if self.ready is not None:
                ready, self.ready = self.ready, None
                ready.errback(KeeperUnreachable(
                    "the keeper closed the connection before answering"
                    f" ({reason.getErrorMessage()})"))
            return
        # As a relay exec ends: cleanly when the keeper closed after its
        # last frame; otherwise without the shell's status.
        self.process_protocol.processEnded(
            Failure(ProcessDone(0)) if reason.check(ConnectionDone)
            else Failure(ProcessTerminated(exitCode=255)))

    def _cancel(self, ready: Deferred) -> None:
        self.ready = None
        if self.transport is not None and not self._closed:
            self.transport.abortConnection()

    # -- IExecProcess ------------------------------------------------------

    def resize(self, cols: int, rows: int) -> None:
        "Sizes go to the keeper as its frames (L{KeeperProcess<capsule.engine.keeper_stream.KeeperProcess>})."


# Connections to containers' addresses that did not even complete (no
# answer: a firewall, or capsule in a container of its own on another
# network) this many times in a row, with none that did in between, mean
# capsule cannot reach the sessions' addresses from where it runs: the
# direct path is not tried again for RETRY_AFTER seconds.
UNREACHABLE_IN_A_ROW = 3
RETRY_AFTER = 600.0


class DirectKeeper:
    """
    Reaches sessions' keepers over TCP.

    @param docker: the engine (L{IDockerAPI<capsule.core.interfaces.IDockerAPI>}):
        the container's address and secret, and the exec that starts a keeper.
    @param timeout: seconds for the start exec and the keeper's first bytes,
        each.
    @param connect_timeout: seconds for a TCP connection to a container's
        address (on the host's own bridge it takes well under a millisecond).
    """

    def __init__(self, reactor, docker, port: int = DIRECT_PORT, timeout: float = 5.0,
                 connect_timeout: int = 2, connect=None) -> None:
        self._reactor = reactor
        self._docker = docker
        self.port = port
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._connect = connect or self._tcp
        self._unreachable = 0
        self._paused_until = float("-inf")

    def _tcp(self, address: str, stream: DirectStream) -> Deferred:
        endpoint = TCP4ClientEndpoint(self._reactor, address, self.port,
                                      timeout=self._connect_timeout)
        return endpoint.connect(OneStream(stream))

    @property
    def available(self) -> bool:
        """
        Whether the direct path is worth trying now (it is not while capsule
        has found it cannot reach the sessions' addresses).
        """
        return self._reactor.seconds() >= self._paused_until

    def _no_answer(self, address: str, error: Exception) -> None:
        self._unreachable += 1
        if self._unreachable >= UNREACHABLE_IN_A_ROW:
            self._unreachable = 0
            self._paused_until = self._reactor.seconds() + RETRY_AFTER
            _log.warn("capsule cannot reach its sessions' addresses ({address}:{port}: {error},"
                      " {n} times in a row): their streams go through relay execs, and the"
                      " direct path is tried again in {after:g} s. Where capsule runs on"
                      " another network than its sessions (in a container of its own), set"
                      " the tuning knob keeper-direct=false",
                      address=address, port=self.port, error=error, n=UNREACHABLE_IN_A_ROW,
                      after=RETRY_AFTER)

    def _start(self, container_id: str, start: dict) -> Deferred:
        """
        Start the keeper; fires with C{None}, or what went wrong.
        """
        argv = keeper_start_argv(tuple(start["shell"]), start["buffer"], start["socket"],
                                 self.port)
        d = self._docker.run_command(
            container_id, argv, start["user"], start["workdir"], start["env"],
            stdin=encode_secret(start["secret"]), max_output=4096, timeout=self._timeout)

        def ended(result):
            if result.exit_code == 0:
                return None
            said = result.stderr.decode("utf-8", "replace").strip()[-300:]
            return f"the keeper's start exec ended with {result.exit_code}: {said or 'nothing said'}"
        return d.addCallback(ended)

    async def attach(self, protocol, container_id: str, offset: int,
                     start: dict | None = None) -> DirectStream:
        """
        Attach C{protocol} to the keeper of container C{container_id},
        asking for output from C{offset}.

        @param start: to start the keeper first (a new container): the
            C{shell}, C{buffer}, C{socket}, C{user}, C{workdir} and C{env}
            of the start exec, and the C{secret} put in its label.
        @raise KeeperUnreachable: the direct path cannot be had.
        """
        if start is None:
            address, secret = await self._docker.keeper_address(container_id)
        else:
            # A new container: its address is asked while its keeper starts.
            found, started = await gatherResults(
                [self._docker.keeper_address(container_id), self._start(container_id, start)],
                consumeErrors=True).addErrback(lambda f: f.value.subFailure)
            (address, secret), problem = found, started
            if address is not None and problem is not None:
                raise KeeperUnreachable(problem)
        if address is None:
            raise KeeperUnreachable("the container has no address capsule can reach")
        if secret is None:
            raise KeeperUnreachable("the container has no keeper secret")
        stream = DirectStream(protocol, secret, offset)
        try:
            await self._connect(address, stream)
        except Exception as e:
            if isinstance(e, (TCPTimedOutError, ConnectingTimeoutError, NoRouteError)):
                self._no_answer(address, e)
            raise KeeperUnreachable(f"no connection to {address}:{self.port} ({e})") from None
        self._unreachable = 0
        ready = stream.ready
        if ready is None:
            return stream
        ready.addTimeout(self._timeout, self._reactor)
        try:
            await ready
        except (CancelledError, TimeoutError):
            raise KeeperUnreachable(
                f"the keeper at {address}:{self.port} did not answer within"
                f" {self._timeout:g} s") from None
        return stream
