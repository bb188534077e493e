"""
The WebSocket endpoint's factory: the options every connection shares
(sizes, pings, flow window, coalescing), the session service that opens
sessions, who connections act for, which origins may connect, and the
connections open now (a stopping server waits for them).  The connection
itself is L{capsule.web.websocket.CapsuleServerProtocol}.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.internet.defer import Deferred, succeed

from capsule.sessions.manager import SessionManager
from capsule.sessions.service import SessionService
from capsule.web.headers import HostPolicy, is_secure
from capsule.web.ports import PortAddresses
from capsule.web.websocket import CapsuleServerProtocol


class CapsuleServerFactory(WebSocketServerFactory):
    """
    @param allowed_origins: origins (C{scheme://host[:port]}) allowed besides
        the page's own; C{"*"} allows any.
    @param host_policy: the names and origins capsule answers to
        (L{capsule.web.headers}); the site gives its own.
    @param sessions: opens new sessions (L{capsule.sessions.service}): its
        admission control and drain; by default one with neither.
    @param authenticator: says who a connection acts for
        (L{capsule.auth.gate.Authenticator}); C{None}: anyone.
    @param start_at_open: make a new session as its connection opens (its
        container made while the client sends its first frame) rather than
        at that first frame.
    @param stall_timeout: seconds a client may read nothing while its
        outgoing buffer is full (it is read from no more meanwhile) before
        it is dropped.
    @param spectators: the share links and who watches through them
        (L{capsule.sessions.spectators}); C{None}: nobody may watch.
    @param watch_backlog: bytes of output a spectator that does not keep up
        may have waiting before it is closed.
    @param port_addresses: where the ports of a session are opened
        (L{capsule.web.ports.PortAddresses}), for the C{ports} message.
    """

    protocol = CapsuleServerProtocol
    # Seconds a new connection has to send its first frame (the terminal's
    # size), and the output of its session held for it until then.
    first_frame_timeout = 30.0
    max_held_output = 1024 * 1024

    def __init__(self, manager: SessionManager, clock, max_message_size: int = 256 * 1024,
                 allowed_origins: tuple[str, ...] = (), ping_interval: float = 20.0,
                 ping_timeout: float = 20.0, flow_window: int = 1024 * 1024,
                 coalesce_delay: float = 0.002, coalesce_bytes: int = 256 * 1024,
                 host_policy: HostPolicy | None = None,
                 sessions: SessionService | None = None, authenticator=None,
                 start_at_open: bool = False, stall_timeout: float = 30.0,
                 spectators=None, watch_backlog: int = 1024 * 1024,
                 port_addresses: PortAddresses | None = None,
                 recording: bool = False) -> None:
        super().__init__()
        # Whether sessions' output is recorded (--record): a page that comes
        # back to a session that printed meanwhile may then play it.
        self.recording = recording
        self.port_addresses = port_addresses if port_addresses is not None else PortAddresses()
        self.spectators = spectators
        self.watch_backlog = watch_backlog
        # Seconds a client may leave its outgoing buffer full before it is
        # dropped.
        self.stall_timeout = stall_timeout
        self.host_policy = host_policy
        self.authenticator = authenticator
        self.start_at_open = start_at_open
        self.manager = manager
        # How new sessions are opened (drain, admission): the server's one
        # session service.
        self.sessions = sessions if sessions is not None else SessionService(manager)
        self.clock = clock
        self.max_message_size = max_message_size
        self.flow_window = flow_window
        self.coalesce_delay = coalesce_delay
        self.coalesce_bytes = coalesce_bytes
        self.connections: set[CapsuleServerProtocol] = set()
        self._all_closed: list[Deferred] = []
        self.allowed_origins = frozenset(o.rstrip("/").lower() for o in allowed_origins)
        self.setProtocolOptions(
            maxMessagePayloadSize=max_message_size,
            maxFramePayloadSize=max_message_size,
            # Close with 1009 on an oversized message instead of dropping TCP.
            failByDrop=False,
            autoPingInterval=ping_interval,
            autoPingTimeout=ping_timeout,
            openHandshakeTimeout=15,
            closeHandshakeTimeout=5,
        )

    def connection_closed(self, protocol: CapsuleServerProtocol) -> None:
        self.connections.discard(protocol)
        if not self.connections:
            waiting, self._all_closed = self._all_closed, []
            for d in waiting:
                d.callback(None)

    def wait_closed(self, timeout: float) -> Deferred:
        """
        Fire when every connection has closed, or after C{timeout} seconds.
        """
        if not self.connections:
            return succeed(None)
        d = Deferred()
        self._all_closed.append(d)
        d.addTimeout(timeout, self.clock, onTimeoutCancel=lambda *_: None)
        return d

    def handshake_refusal(self, origin: str | None, host: str | None,
                          transport=None) -> str | None:
        """
        Why a handshake with these C{Origin} and C{Host} headers, over
        C{transport}, is refused; C{None} when it is not.
        """
        if self.host_policy is not None and transport is not None and \
                not self.host_policy.host_allowed(host, transport.getHost(),
                                                  is_secure(transport)):
            return f"host {host[:200]} is not allowed"
        if not self.origin_allowed(origin, host, transport):
            return f"origin {origin[:200]} is not allowed"
        return None

    def origin_allowed(self, origin: str | None, host: str | None, transport=None) -> bool:
        """
        Browsers send an Origin; a page from another site must not open
        terminals here (cross-site WebSocket hijacking): only the page's own
        origin (scheme, host and port) and those allowed may.  Clients that
        are not browsers send none and are allowed.

        Without a L{HostPolicy} (a factory built bare, in tests) the Origin's
        host and port are compared with C{Host} alone.
        """
        if self.host_policy is not None:
            return self.host_policy.origin_allowed(origin, host, is_secure(transport))
        if origin is None:
            return True
        origin = origin.rstrip("/").lower()
        if "*" in self.allowed_origins or origin in self.allowed_origins:
            return True
        return host is not None and urlsplit(origin).netloc == host.lower()
