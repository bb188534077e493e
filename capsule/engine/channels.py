"""
Keeper channels, capsule's side: TCP connections carried over a session's
keeper stream (the frames: L{capsule.core.channels}), for sessions with no
network of their own.

Both directions:

  - In: a connection made in the container to 127.0.0.1:DOOR (the keeper
    listens there for a session without a network; C{--door-port}) becomes a
    channel, handed to the session door's protocol factory as if it had
    connected to the door (L{ChannelOptions.accept}).
  - Out: L{KeeperChannelEndpoint}C{(reactor, session, port)} is an
    C{IStreamClientEndpoint} whose C{connect(factory)} has the keeper
    connect to 127.0.0.1:PORT in the container and fires with the connected
    protocol, exactly as C{TCP4ClientEndpoint} does (a refused port fails
    with C{ConnectionRefusedError}, the keeper's reason in its message).

The interface for whoever serves such a connection: its transport's
C{getPeer()} (and C{getHost()}) is a
L{ChannelAddress<capsule.core.channels.ChannelAddress>} whose C{session_id}
names the session, where a connection over a session network has the
container's C{IPv4Address}: a server that identifies sessions by their
source address checks for a C{ChannelAddress} first
(L{channel_session<capsule.core.channels.channel_session>}C{(peer)}: the
session's id, or C{None} for an address of the network).  (A request's
C{getClientAddress()} is that address too.)  The transport is an
C{ITransport}, C{IConsumer} (producers are paused while more than a window
waits for the keeper's grants) and C{IPushProducer} (paused, it stops
granting: the keeper stops reading the socket in the container), and
half-closes (C{loseWriteConnection}); a protocol that provides
C{IHalfCloseableProtocol} gets C{readConnectionLost} when the container's
side has ended its writing, any other a clean close once its own writes are
delivered.

Limits: at most the keeper's count of channels at once per session (its
preamble says; past it capsule refuses with a sentence and a log line), a
window of L{WINDOW} bytes each way per channel (what capsule holds of a
channel it reads: at most a window while its protocol is paused; what it
holds of what it writes: what the protocol writes past a window before it
honours a pause).  A keeper that breaks a channel's rules (more than the
window, data after its end, an id not its own) has that channel failed and
one line logged; a frame of a kind or size not allowed ends the session
(L{ShellProtocol<capsule.engine.keeper_stream.ShellProtocol>}).  Channels
end with their stream: a reattached session starts with none.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from typing import Callable

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import (ConnectError, ConnectionAborted, ConnectionDone,
                                    ConnectionLost, ConnectionRefusedError)
from twisted.internet.interfaces import (IConsumer, IHalfCloseableProtocol, IPushProducer,
                                         IStreamClientEndpoint, ITransport)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from capsule.core.channels import (CAPSULE_BIT, CHUNK, WINDOW, ChannelAddress, channel_of,
                                   encode_data, encode_end, encode_fail, encode_grant,
                                   encode_open, grant_of, port_of, reason_of)
from capsule.core.ratelog import RateLimitedLog

__all__ = ["ChannelMux", "ChannelOptions", "ChannelTransport", "KeeperChannelEndpoint",
           "TooManyChannels"]

_log = Logger()

# A protocol's writes waiting for the keeper's grants past this pause its
# producer; below RESUME_AT it goes on.
PAUSE_AT = WINDOW
RESUME_AT = WINDOW // 4


class TooManyChannels(ConnectError):
    "The session has as many channels open as its keeper carries."


@dataclass(frozen=True)
class ChannelOptions:
    """
    What a session's stream asks of its keeper's channels.

    @param door_port: the port the keeper listens on at 127.0.0.1 in the
        container, whose connections come to capsule (0: none).
    @param accept: the protocol for such a connection, given its address
        (C{None}: refused); the session door's factory's C{buildProtocol}.
    """

    door_port: int = 0
    accept: Callable[[ChannelAddress], object] | None = None


@implementer(ITransport, IConsumer, IPushProducer)
class ChannelTransport:
    """
    One channel, as its protocol's transport (see the module's docstring).
    """

    def __init__(self, mux: "ChannelMux", channel: int, address: ChannelAddress) -> None:
        self._mux = mux
        self.channel = channel
        self._address = address
        self.protocol = None
        self.connected = True
        self.disconnecting = False
        self._credit = WINDOW        # bytes the keeper lets capsule send
        self._out = bytearray()      # written, waiting for credit
        self._unanswered = 0         # bytes received, not yet granted back
        self._held: deque[bytes] = deque()  # received while paused
        self._paused = False
        self._delivering = False
        self._write_ended = False    # loseConnection / loseWriteConnection
        self._end_sent = False
        self._end_received = False
        self._end_pending = False    # the keeper's end, after what is held
        self._producer = None
        self._streaming = True
        self._producer_paused = False
        self._closed = False

    # -- ITransport ----------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._closed or self._write_ended or not data:
            return
        self._out += data
        self._flush()

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """
        Close once what was written has reached the container's socket.
        """
        if self._closed or self.disconnecting:
            return
        self.disconnecting = True
        self._write_ended = True
        self._flush()

    def loseWriteConnection(self) -> None:
        "Half-close: no more writes (the container's side reads its end)."
        if self._closed:
            return
        self._write_ended = True
        self._flush()

    def abortConnection(self) -> None:
        if self._closed:
            return
        self._mux.send(encode_fail(self.channel, "closed by capsule"))
        self._finish(ConnectionAborted())

    def getPeer(self) -> ChannelAddress:
        return self._address

    def getHost(self) -> ChannelAddress:
        return self._address

    # -- IConsumer -------------------------------------------------------------

    def registerProducer(self, producer, streaming: bool) -> None:
        if self._producer is not None:
            raise RuntimeError(f"cannot register producer {producer!r}: {self._producer!r}"
                               " is registered")
        if self._closed:
            producer.stopProducing()
            return
        self._producer, self._streaming = producer, streaming
        self._producer_paused = False
        if not streaming:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        self._producer = None

    # -- IPushProducer -----------------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        if self._closed:
            return
        self._paused = False
        self._deliver_held()

    def stopProducing(self) -> None:
        self.loseConnection()

    # -- what the keeper says -----------------------------------------------------

    def data_received(self, data: bytes) -> str | None:
        """
        Bytes from the container's side; what is wrong with them, if
        anything (the channel then fails).
        """
        if self._end_received:
            return "data after its end"
        if self._unanswered + len(data) > WINDOW:
            return f"more than the window of {WINDOW} bytes"
        self._unanswered += len(data)
        self._held.append(data)
        self._deliver_held()
        return None

    def _deliver(self, data: bytes) -> None:
        self._delivering = True
        try:
            self.protocol.dataReceived(data)
        finally:
            self._delivering = False
        self._unanswered -= len(data)
        if not self._closed:
            self._mux.send(encode_grant(self.channel, len(data)))

    def _deliver_held(self) -> None:
        while self._held and not self._paused and not self._closed and not self._delivering:
            self._deliver(self._held.popleft())
        if not self._held and self._end_pending and not self._closed:
            self._end_pending = False
            self._ended()

    def end_received(self) -> str | None:
        if self._end_received:
            return "ended twice"
        self._end_received = True
        if self._held or self._delivering:
            self._end_pending = True
        else:
            self._ended()
        return None

    def _ended(self) -> None:
        if self._end_sent:
            self._finish(ConnectionDone())
        elif IHalfCloseableProtocol.providedBy(self.protocol) and not self._write_ended:
            self.protocol.readConnectionLost()
        else:
            self.loseConnection()

    def granted(self, count: int) -> str | None:
        if self._credit + count > WINDOW:
            return f"granted past the window of {WINDOW} bytes"
        self._credit += count
        self._flush()
        return None

    def failed(self, reason: str) -> None:
        self._finish(ConnectionLost(f"the container's side: {reason}"))

    # -- ours ------------------------------------------------------------------------

    def _flush(self) -> None:
        while self._out and self._credit > 0 and not self._closed:
            n = min(len(self._out), self._credit, 4 * CHUNK)
            self._mux.send(encode_data(self.channel, bytes(self._out[:n])))
            del self._out[:n]
            self._credit -= n
        if self._closed:
            return
        if self._producer is not None:
            if len(self._out) >= PAUSE_AT and not self._producer_paused and self._streaming:
                self._producer_paused = True
                self._producer.pauseProducing()
            elif len(self._out) <= RESUME_AT and (self._producer_paused or not self._streaming):
                self._producer_paused = False
                self._producer.resumeProducing()
        if self._out or not self._write_ended:
            return
        if not self._end_sent:
            self._end_sent = True
            self._mux.send(encode_end(self.channel))
        if self._end_received:
            self._finish(ConnectionDone())
        elif self.disconnecting and self._credit == WINDOW:
            # All written reached the socket: close it, as TCP's close would
            # (what the container's side still sends is not waited for).
            self._mux.send(encode_fail(self.channel, "closed by capsule"))
            self._finish(ConnectionDone())

    def _finish(self, reason: Exception) -> None:
        if self._closed:
            return
        self._closed = True
        self.connected = False
        self._held.clear()
        self._out = bytearray()
        self._mux.forget(self.channel)
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.stopProducing()
        if self.protocol is not None:
            self.protocol.connectionLost(Failure(reason))


class ChannelMux:
    """
    The channels of one keeper stream.

    @param session_id: the session's id (in each channel's address).
    @param send: writes bytes (frames) to the keeper's stream.
    @param limit: the most channels open at once (the keeper's preamble).
    @param options: the door's channels (L{ChannelOptions}).
    @param now: the clock, for rate-limited log lines.
    """

    # A keeper's errors are its session user's to make: rate-limited.
    _errors = RateLimitedLog(_log)

    def __init__(self, session_id: str, send: Callable[[bytes], None], limit: int,
                 options: ChannelOptions | None = None,
                 now: Callable[[], float] = lambda: 0.0) -> None:
        self.session_id = session_id
        self._send = send
        self.limit = limit
        self._options = options or ChannelOptions()
        self._now = now
        self.channels: dict[int, ChannelTransport] = {}
        self._opening: dict[int, tuple[object, Deferred, int]] = {}
        self._ids = itertools.count(1)
        self.closed: str | None = None

    def __len__(self) -> int:
        return len(self.channels) + len(self._opening)

    def send(self, data: bytes) -> None:
        if self.closed is None:
            self._send(data)

    def forget(self, channel: int) -> None:
        self.channels.pop(channel, None)

    def _complain(self, kind: str, format: str, **fields) -> None:
        self._errors.error(self._now(), self.session_id, kind, format, **fields)

    # -- capsule's channels ------------------------------------------------------

    def open(self, port: int, factory) -> Deferred:
        """
        Connect to 127.0.0.1:C{port} in the container; fires with
        C{factory}'s protocol, connected.
        """
        if self.closed is not None:
            return fail(ConnectError(string=f"the session's stream is gone ({self.closed})"))
        if not 0 < port < 65536:
            return fail(ConnectError(string=f"no port {port}"))
        if len(self) >= self.limit:
            self._complain("channel-limit", "session {session_id} has {n} channels open (at"
                           " most {limit}): a channel to port {port} was refused",
                           n=len(self), limit=self.limit, port=port)
            return fail(TooManyChannels(string=f"the session has {len(self)} channels open"
                                               f" (at most {self.limit})"))
        channel = self._new_id()

        def cancel(d):
            if self._opening.pop(channel, None) is not None:
                self.send(encode_fail(channel, "cancelled by capsule"))

        d = Deferred(cancel)
        self._opening[channel] = (factory, d, port)
        self.send(encode_open(channel, port))
        return d

    def _new_id(self) -> int:
        while True:
            channel = CAPSULE_BIT | (next(self._ids) & (CAPSULE_BIT - 1))
            if channel != CAPSULE_BIT and channel not in self.channels \
                    and channel not in self._opening:
                return channel

    def _opened(self, channel: int) -> None:
        factory, d, port = self._opening.pop(channel)
        address = ChannelAddress(self.session_id, channel, port)
        transport = ChannelTransport(self, channel, address)
        protocol = factory.buildProtocol(address)
        if protocol is None:
            self.send(encode_fail(channel, "refused by capsule"))
            d.errback(ConnectError(string="the factory made no protocol"))
            return
        transport.protocol = protocol
        self.channels[channel] = transport
        protocol.makeConnection(transport)
        d.callback(protocol)

    # -- the keeper's frames ----------------------------------------------------

    def received(self, kind: bytes, payload: bytes) -> None:
        """
        One channel frame from the keeper (of a kind and size allowed:
        L{CHANNEL_FRAMES<capsule.core.channels.CHANNEL_FRAMES>}).
        """
        channel = channel_of(payload)
        try:
            self._received(kind, channel, payload)
        except Exception:
            # A protocol's fault, not the stream's: that channel goes.
            self._errors.failure(self._now(), self.session_id, "channel-protocol",
                                 "session {session_id}: a channel's protocol failed; the"
                                 " channel is closed")
            if channel != 0:
                self.send(encode_fail(channel, "capsule's side failed"))
            transport = self.channels.get(channel)
            if transport is not None:
                transport._finish(ConnectionLost("its protocol failed"))
            opening = self._opening.pop(channel, None)
            if opening is not None and not opening[1].called:
                opening[1].errback(ConnectError(string="capsule's side failed"))

    def _received(self, kind: bytes, channel: int, payload: bytes) -> None:
        if kind == b"C":
            self._incoming(channel, port_of(payload))
            return
        if kind == b"F" and channel == 0:
            self._complain("keeper-notice", "session {session_id}'s keeper: {reason}",
                           reason=reason_of(payload))
            return
        if channel in self._opening:
            if kind == b"A":
                self._opened(channel)
            elif kind == b"F":
                _, d, port = self._opening.pop(channel)
                d.errback(ConnectionRefusedError(string=f"port {port} in the container:"
                                                        f" {reason_of(payload)}"))
            else:
                self._broken(channel, f"a {kind.decode()!r} frame before it was connected")
            return
        transport = self.channels.get(channel)
        if transport is None:
            return  # it ended meanwhile: what was on its way goes
        problem = None
        if kind == b"D":
            problem = transport.data_received(payload[4:])
        elif kind == b"E":
            problem = transport.end_received()
        elif kind == b"G":
            problem = transport.granted(grant_of(payload))
        elif kind == b"F":
            transport.failed(reason_of(payload))
        elif kind == b"A":
            problem = "connected twice"
        if problem is not None:
            self._broken(channel, problem)

    def _incoming(self, channel: int, port: int) -> None:
        if channel & CAPSULE_BIT or channel == 0 or channel in self.channels:
            self._broken(channel, f"the keeper opened channel {channel}, not one it may")
            return
        accept = self._options.accept
        if accept is None or port != self._options.door_port:
            self.send(encode_fail(channel, f"nothing of capsule's on port {port}"))
            return
        if len(self) >= self.limit:
            self._complain("channel-limit", "session {session_id} has {n} channels open (at"
                           " most {limit}): a connection on port {port} was refused",
                           n=len(self), limit=self.limit, port=port)
            self.send(encode_fail(channel, f"{len(self)} channels are open (at most"
                                           f" {self.limit})"))
            return
        address = ChannelAddress(self.session_id, channel, port)
        protocol = accept(address)
        if protocol is None:
            self.send(encode_fail(channel, "refused by capsule"))
            return
        transport = ChannelTransport(self, channel, address)
        transport.protocol = protocol
        self.channels[channel] = transport
        protocol.makeConnection(transport)

    def _broken(self, channel: int, problem: str) -> None:
        self._complain("channel-broken", "session {session_id}'s keeper broke channel"
                       " {channel}'s rules ({problem}): the channel is closed",
                       channel=channel, problem=problem)
        self.send(encode_fail(channel, problem))
        transport = self.channels.get(channel)
        if transport is not None:
            transport._finish(ConnectionLost(f"the keeper broke the channel's rules: {problem}"))
        opening = self._opening.pop(channel, None)
        if opening is not None:
            opening[1].errback(ConnectError(string=problem))

    def close_all(self, reason: str) -> None:
        """
        The stream is gone: every channel with it.
        """
        if self.closed is not None:
            return
        self.closed = reason
        for transport in list(self.channels.values()):
            transport._finish(ConnectionLost(f"the session's stream is gone ({reason})"))
        opening, self._opening = self._opening, {}
        for _, d, _ in opening.values():
            d.errback(ConnectError(string=f"the session's stream is gone ({reason})"))


@implementer(IStreamClientEndpoint)
class KeeperChannelEndpoint:
    """
    A TCP port in a session's container, reached over its keeper's stream:
    C{connect(factory)} fires with the connected protocol, or fails with
    C{ConnectError} (the session has no channels, its stream is not up, too
    many channels: L{TooManyChannels}), C{ConnectionRefusedError} (nothing
    listens there) or C{TimeoutError}.

    @param session: the session (its C{shell}, the stream protocol, has
        C{channels} once its keeper said it carries them).
    """

    def __init__(self, reactor, session, port: int, timeout: float = 10.0) -> None:
        self._reactor = reactor
        self._session = session
        self._port = port
        self._timeout = timeout

    def connect(self, factory) -> Deferred:
        shell = getattr(self._session, "shell", None)
        mux = getattr(shell, "channels", None)
        if mux is None:
            why = ("its stream is not up" if shell is None else
                   "its keeper carries no channels (a session with a network of its own,"
                   " or an older session image)")
            return fail(ConnectError(string=f"no channel to session"
                                            f" {self._session.id[:8]}: {why}"))
        d = mux.open(self._port, factory)
        d.addTimeout(self._timeout, self._reactor)
        return d
