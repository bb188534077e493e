"""
Client connections, counted: how many one client address may hold, how
many capsule holds in all (what its file descriptors allow), and how long
a connection may take to say what it wants.

Every connection of L{capsule.web.site.CapsuleSite} is a L{Connection}
(a protocol wrapper around the HTTP channel, which stays in place when the
channel hands the connection to a WebSocket), registered with the site's
L{Connections}:

 - a client address (an IPv6 /64 counts as one) holds at most
   C{per_client} connections at once: a new one past it closes that
   address's oldest I{idle} connection (one waiting for a request's
   headers, or between requests), or, when every one of them is busy (a
   request being read or answered, a WebSocket), is refused at once with
   429 C{too_many_connections}.  The trusted proxies, and peers that have
   no IP address (a UNIX socket), are not capped per address;
 - capsule holds at most C{total} connections (its file descriptors less
   a reserve for the engine, the sessions and its files): a new one past
   it closes the oldest idle connection of the address that holds the
   most, else is refused with 503 C{server_busy};
 - a request's headers must be complete within C{header_timeout} seconds
   of its first byte (of the connection's opening, for its first
   request), whatever trickles in meanwhile; a connection between
   requests is closed after C{idle_timeout} seconds without one.

So idle sockets cannot use up the descriptors, and a new client always
finds room: C{/health} answers while one address sits at its cap.  A cap
that bites is logged once a minute per address, with how often it bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.interfaces import IProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.web.http import HTTPChannel
from zope.interface import directlyProvides, providedBy

from capsule.core.addresses import Network, is_trusted, parse_ip

_log = Logger()

# File descriptors capsule needs besides its clients' connections: the log,
# the listening sockets, the reactor's own, a few files at once...
BASE_DESCRIPTORS = 64
# ... one connection to the engine per Docker thread ...
# ... and, per session, its keeper stream, an exec or two, its recording.
DESCRIPTORS_PER_SESSION = 4
# Fewer connections than this in all would not serve anyone.
MIN_CONNECTIONS = 16
# Seconds between two log lines about one address's cap.
LOG_EVERY = 60.0
# Seconds a connection closed at its header deadline may still take to go.
CLOSE_GRACE = 5.0

# A connection's phases.
HEADERS = "headers"    # waiting for a request's headers to be complete
IDLE = "idle"          # between two requests of a keep-alive connection
BUSY = "busy"          # a request being read or answered


@dataclass(frozen=True)
class ConnectionLimits:
    """
    @ivar per_client: connections one client address may hold at once
        (C{--max-connections-per-client}); C{None}: no cap.
    @ivar total: connections capsule holds at once, in all.
    @ivar header_timeout: seconds a request has to complete its headers.
    @ivar idle_timeout: seconds a connection is kept between requests.
    @ivar exempt: networks whose connections are not capped per address
        (the trusted proxies: every client behind one shares its address).
    """

    per_client: int | None = 64
    total: int = 4096
    header_timeout: float = 10.0
    idle_timeout: float = 30.0
    exempt: tuple[Network, ...] = ()


def reserved_descriptors(max_sessions: int, threads: int) -> int:
    """
    The file descriptors capsule keeps for other things than its clients'
    connections, with C{max_sessions} sessions and C{threads} Docker
    threads.
    """
    return BASE_DESCRIPTORS + threads + DESCRIPTORS_PER_SESSION * max_sessions


def connection_budget(descriptors: int, max_sessions: int, threads: int) -> int:
    """
    The connections capsule may hold at once with C{descriptors} file
    descriptors (its C{RLIMIT_NOFILE}): what the reserve leaves, and at
    least L{MIN_CONNECTIONS} (or a quarter of a tiny limit).
    """
    budget = descriptors - reserved_descriptors(max_sessions, threads)
    if budget >= MIN_CONNECTIONS:
        return budget
    return max(4, min(MIN_CONNECTIONS, descriptors // 4))


def recommended_descriptors(max_sessions: int, threads: int,
                            per_client: int | None) -> int:
    """
    The C{RLIMIT_NOFILE} under which capsule warns at start: the reserve,
    and room for a WebSocket and a few requests per session and for one
    address at its cap.
    """
    room = max(256, 8 * max_sessions, 2 * (per_client or 0))
    return reserved_descriptors(max_sessions, threads) + room


def client_key(host: str | None, exempt: Iterable[Network] = ()) -> str | None:
    """
    What a peer's connections are counted against: its address (an IPv6
    one by its /64); C{None} for a peer that is not capped per address (no
    IP address, or one of C{exempt}).
    """
    address = parse_ip(host or "")
    if address is None or is_trusted(address, exempt):
        return None
    if address.version == 6:
        return f"{address.exploded[:19]}::/64"
    return str(address)


class Connections:
    """
    The open connections of a site, by client address; see the module.
    """

    def __init__(self, limits: ConnectionLimits, clock) -> None:
        self.limits = limits
        self.clock = clock
        # Insertion-ordered: the oldest first.
        self._all: dict[Connection, None] = {}
        self._by_client: dict[str, dict[Connection, None]] = {}
        # Per address: when its last line was logged, and what happened since.
        self._said: dict[str, tuple[float, int]] = {}
        self.refused = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._all)

    def count(self, client: str | None) -> int:
        return len(self._by_client.get(client, ())) if client is not None else 0

    def admit(self, connection: "Connection") -> tuple[int, str, str] | None:
        """
        Register C{connection}, making room if it must; or say why it is
        refused: C{(status, code, sentence)}.
        """
        client, limits = connection.client, self.limits
        if client is not None and limits.per_client is not None:
            mine = self._by_client.get(client, {})
            if len(mine) >= limits.per_client:
                victim = _oldest_idle(mine)
                if victim is None:
                    self.refused += 1
                    self._note(client, f"at its cap of {limits.per_client} connections, all"
                                       " busy: refused a new one with 429")
                    return (429, "too_many_connections",
                            f"too many connections from this address (at most"
                            f" {limits.per_client} at once)")
                self._evict(victim)
                self._note(client, f"at its cap of {limits.per_client} connections: closed its"
                                   " oldest idle one for a new one")
        if len(self._all) >= limits.total:
            victim = self._global_victim()
            if victim is None:
                self.refused += 1
                self._note(client or "unknown", f"capsule holds {len(self._all)} connections,"
                           " its most, all busy: refused a new one with 503")
                return (503, "server_busy",
                        "capsule holds as many connections as it can: try again shortly")
            self._evict(victim)
            self._note(victim.client or "unknown",
                       f"capsule holds {limits.total} connections, its most: closed the"
                       " oldest idle one of the address holding the most")
        self._all[connection] = None
        if client is not None:
            self._by_client.setdefault(client, {})[connection] = None
        return None

    def closed(self, connection: "Connection") -> None:
        self._all.pop(connection, None)
        mine = self._by_client.get(connection.client)
        if mine is not None:
            mine.pop(connection, None)
            if not mine:
                del self._by_client[connection.client]

    def note_deadline(self, connection: "Connection", message: str) -> None:
        self._note(connection.client or "unknown", message)

    def _evict(self, victim: "Connection") -> None:
        self.evicted += 1
        self.closed(victim)
        victim.evict()

    def _global_victim(self) -> "Connection | None":
        if self._by_client:
            biggest = max(self._by_client.values(), key=len)
            victim = _oldest_idle(biggest)
            if victim is not None:
                return victim
        return _oldest_idle(self._all)

    def _note(self, client: str, message: str) -> None:
        """
        Log C{message} about C{client}, once per L{LOG_EVERY} seconds; the
        next line says how many were not logged.
        """
        now = self.clock.seconds()
        last, unsaid = self._said.get(client, (None, 0))
        if last is not None and now - last < LOG_EVERY:
            self._said[client] = (last, unsaid + 1)
            return
        if len(self._said) > 1000:
            self._said = {k: v for k, v in self._said.items() if now - v[0] < LOG_EVERY}
        self._said[client] = (now, 0)
        more = f" ({unsaid} more since the last line)" if unsaid else ""
        _log.warn("connections from {client}: {message}{more}", client=client,
                  message=message, more=more)


def _oldest_idle(connections: Iterable["Connection"]) -> "Connection | None":
    for connection in connections:
        if connection.idle:
            return connection
    return None


def refusal_bytes(status: int, code: str, message: str) -> bytes:
    """
    A whole HTTP answer refusing a connection: JSON, and C{Connection: close}.
    """
    phrase = {408: b"Request Timeout", 429: b"Too Many Requests",
              503: b"Service Unavailable"}[status]
    body = json.dumps({"error": message, "code": code}).encode("utf-8")
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nCache-Control: no-store\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (status, phrase, len(body))
            + body)


class Connection(ProtocolWrapper):
    """
    One client connection of a site: counted by its L{Connections}, timed
    while it sends a request's headers or waits between requests.

    A WebSocket that takes the connection over replaces the HTTP channel as
    the wrapped protocol (Autobahn does so for a L{ProtocolWrapper}): the
    connection is then busy for good, and still counted until it closes.
    """

    def __init__(self, connections: Connections, wrapped: IProtocol) -> None:
        super().__init__(connections, wrapped)
        self._http = wrapped
        self.client: str | None = None
        self.phase = HEADERS
        self.admitted = False
        self._deadline = None
        self._closing = None

    @property
    def connections(self) -> Connections:
        return self.factory

    @property
    def idle(self) -> bool:
        """
        Whether it may be closed for another: it waits for a request (or its
        headers), and is not a WebSocket.
        """
        return self.phase != BUSY and self.wrappedProtocol is self._http

    def makeConnection(self, transport) -> None:
        # Not ProtocolWrapper's: the connections decide whether it stays
        # before its channel hears of it.
        self.client = client_key(getattr(transport.getPeer(), "host", None),
                                 self.connections.limits.exempt)
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        refusal = self.connections.admit(self)
        if refusal is not None:
            transport.write(refusal_bytes(*refusal))
            transport.loseConnection()
            return
        self.admitted = True
        self._enter(HEADERS)
        self.wrappedProtocol.makeConnection(self)

    def dataReceived(self, data: bytes) -> None:
        if not self.admitted:
            return
        if self.phase == IDLE and self.wrappedProtocol is self._http:
            self._enter(HEADERS)
        self.wrappedProtocol.dataReceived(data)

    def connectionLost(self, reason) -> None:
        self._cancel()
        if self._closing is not None and self._closing.active():
            self._closing.cancel()
        self.connections.closed(self)
        if self.admitted and self.wrappedProtocol is not None:
            self.wrappedProtocol.connectionLost(reason)
        self.wrappedProtocol = None
        self._http = None

    # -- what the channel says ---------------------------------------------

    def headers_received(self) -> None:
        self._enter(BUSY)

    def between_requests(self) -> None:
        self._enter(IDLE)

    def request_started(self) -> None:
        if self.phase == IDLE:
            self._enter(HEADERS)

    # -- deadlines ---------------------------------------------------------

    def _enter(self, phase: str) -> None:
        self.phase = phase
        self._cancel()
        limits = self.connections.limits
        delay = {HEADERS: limits.header_timeout, IDLE: limits.idle_timeout}.get(phase)
        if delay is not None and self.transport is not None:
            self._deadline = self.connections.clock.callLater(delay, self._expired, phase)

    def _cancel(self) -> None:
        call, self._deadline = self._deadline, None
        if call is not None and call.active():
            call.cancel()

    def _expired(self, phase: str) -> None:
        self._deadline = None
        if self.transport is None or self.wrappedProtocol is not self._http:
            return
        if phase == HEADERS:
            limit = self.connections.limits.header_timeout
            self.connections.note_deadline(
                self, f"dropped a connection whose request's headers were not complete"
                      f" within {limit:g} s")
            self.transport.write(refusal_bytes(
                408, "request_timeout",
                f"a request's headers must be complete within {limit:g} s"))
        self.transport.loseConnection()
        # One that does not let go (its buffer full) is cut.
        self._closing = self.connections.clock.callLater(CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        self._closing = None
        if self.transport is not None:
            self.transport.abortConnection()

    def evict(self) -> None:
        """
        Close it now, for another connection.
        """
        self._cancel()
        if self.transport is not None:
            self.transport.abortConnection()


class CountedChannel(HTTPChannel):
    """
    An HTTP channel that tells its L{Connection} (its transport, when it
    has one) when a request's headers are in, and when an answer is done.
    """

    def _connection(self) -> Connection | None:
        transport = self.transport
        return transport if isinstance(transport, Connection) else None

    # Where the bytes of a request taken out of the site go (see divert).
    _diverted = None

    def allHeadersReceived(self) -> None:
        connection = self._connection()
        if connection is not None:
            connection.headers_received()
            # A site may take a request whose headers are in out of
            # twisted.web (a preview: capsule.web.preview): its body and
            # whatever follows are then the diversion's, raw, and the
            # request never reaches a resource.
            divert = getattr(getattr(self, "site", None), "divert", None)
            taken = divert(self, self.requests[-1]) if divert is not None else None
            if taken is not None:
                self._diverted = taken
                # Not a request without a body: the channel goes raw.
                self.length = None
                return
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if self._diverted is not None:
            self._diverted(data)
            return
        super().rawDataReceived(data)

    def requestDone(self, request) -> None:
        connection = self._connection()
        if connection is not None and self.persistent:
            connection.between_requests()
        super().requestDone(request)
        if connection is not None and self.persistent and self.requests:
            # The next request (pipelined) has begun.
            connection.request_started()


class CountedWebSocketResource(WebSocketResource):
    """
    Autobahn's C{/ws} resource, for a site whose connections are
    L{Connection}s: the WebSocket gets the connection's own transport
    (Autobahn reads TLS details from a TLS transport only), and the
    L{Connection} stays between the transport and the WebSocket, so that it
    is counted until it closes.
    """

    def render(self, request):
        connection = request.channel.transport
        if not isinstance(connection, Connection) or connection.transport is None:
            return super().render(request)
        request.channel.transport = real = connection.transport
        try:
            return super().render(request)
        finally:
            if request.channel.transport is real:
                # Not taken over (refused before): the channel answers.
                request.channel.transport = connection
            elif isinstance(real, ProtocolWrapper) and real.wrappedProtocol is not connection:
                # A TLS transport (a ProtocolWrapper) was given the WebSocket
                # in the Connection's place: put the Connection back.
                connection.wrappedProtocol = real.wrappedProtocol
                real.wrappedProtocol = connection
