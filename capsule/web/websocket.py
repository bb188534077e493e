"""
The WebSocket endpoint: frames in, calls on the session manager; session
events out, frames.
"""

from __future__ import annotations

from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.interfaces import IPushProducer, ITCPTransport
from twisted.logger import Logger
from zope.interface import implementer

from capsule.core import protocol as wire
from capsule.sessions.drain import DRAINING
from capsule.core.admission import QUOTA_EXCEEDED, AdmissionRefused
from capsule.auth.gate import AuthRefused
from capsule.ops.logformat import short_ids
from capsule.core.coalesce import Coalescer
from capsule.core.errors import CapsuleError, SessionNotFound
from capsule.web.headers import is_secure
from capsule.core.kept import SESSION_KEPT
from capsule.web.keep_ws import KeptSessions
from capsule.web.replica_ws import ReplicaSessions
from capsule.web.http import client_address
from capsule.web.watch import CLOSE_QUOTA_EXCEEDED, Watching, _Phase
from capsule.web.wire import BinaryWire, FlowGate, JsonWire, close_reason, url_size
from capsule.core.interfaces import ISessionClient
from capsule.core.session_core import InputOverrun
from capsule.core.profiles import UnknownProfile, parse_profile_name
from capsule.sessions.manager import SessionManager
from capsule.sessions.service import OpenRequest
from capsule.sessions.session import WARM_SIZE

# Autobahn's protocols own a .log of their own: capsule logs through this one.
_log = Logger()

# Close codes (4000-4999 are the application's); README documents them.
# The server restarts; the session lives on: reconnect (1001 itself cannot be
# sent by an application through Autobahn).
# Input sent on long after the client was asked to wait.  Not 1008: Autobahn
# lets an application close only with 1000 or 3000-4999.
CLOSE_INPUT_OVERRUN = 4008
# The size a new session opens with until its client says its own: that of
# the warm sessions, so that taking one resizes its terminal once at most.
OPENING_SIZE = WARM_SIZE
CLOSE_RESTARTING = 4001
CLOSE_INVALID_SESSION = 4400
CLOSE_SESSION_NOT_FOUND = 4404
CLOSE_TAKEN_OVER = 4409
CLOSE_UNAVAILABLE = 4503


@implementer(ISessionClient)
class CapsuleServerProtocol(ReplicaSessions, KeptSessions, Watching, WebSocketServerProtocol):
    """
    One browser connection, in one L{_Phase} at a time.  What goes on the wire is its C{_wire}'s business: the JSON
    or the binary protocol, chosen at the handshake.  Kept sessions: L{KeptSessions}.
    """

    CLOSE_SESSION_NOT_FOUND = CLOSE_SESSION_NOT_FOUND
    CLOSE_UNAVAILABLE = CLOSE_UNAVAILABLE
    CLOSE_INVALID_SESSION = CLOSE_INVALID_SESSION

    def __init__(self) -> None:
        super().__init__()
        self._phase = _Phase.NEW
        self._requested_session: str | None = None
        self._requested_offset: str | None = None
        # The profile a new session is asked of (None: the default).
        self._requested_profile: str | None = None
        # The URL's cols and rows, as given (see url_size).
        self._requested_size: tuple = (None, None)
        self._session = None
        self._producer = None
        self._wire: JsonWire | BinaryWire | None = None
        # The offset of the next output byte this client will be sent, and
        # the offset it has acknowledged (binary protocol): the wire's
        # accounting for flow control; the session owns where output is.
        self._sent = 0
        self._acked = 0
        self._coalescer: Coalescer | None = None
        # Who asks, as admission control counts it (set at the handshake).
        self._client_address: str | None = None
        # Who this connection acts for (None: capsule runs without users).
        self._user: str | None = None
        # A new session is made as soon as the connection opens; what it
        # tells its client before the client's first size is held here (a
        # call and its arguments each), then delivered in order.
        self._held: list[tuple] = []
        self._held_bytes = 0
        self._first_frame = None
        # Whether the session was made here and its client has not sent its
        # first frame yet: if it goes now, nothing is kept.
        self._unseen = False
        # Why reading from the client is paused: "input" (its session's
        # shell does not read), "outgoing" (it does not read what it is
        # sent: its transport's buffer is full).
        self._not_reading: set[str] = set()
        self._reading_paused = False
        # The transport's producer for the connection's life (see onOpen).
        self._outgoing: _Outgoing | None = None
        self._stalled = None
        # A spectator's (the URL's watch=): its token, the output it could
        # not be sent yet (its window or its transport full), and whether it
        # was told once that it cannot type.
        self._watch_token: str | None = None
        self._backlog: list[bytes] = []
        self._backlog_bytes = 0
        self._told_read_only = False
        # The Host the client named and whether it came over TLS: where the
        # addresses of its session's ports are (capsule.web.ports).
        self._host: str | None = None
        self._secure = False
        # The ports this connection was last told of, and how many more.
        self._ports_told: tuple[list, int] = ([], 0)

    @property
    def _manager(self) -> SessionManager:
        return self.factory.manager

    # -- Autobahn hooks ----------------------------------------------------

    def onConnect(self, request):
        origin = request.headers.get("origin")
        refused = self.factory.handshake_refusal(origin, request.headers.get("host"),
                                                 self.transport)
        if refused is not None:
            _log.warn("refused a WebSocket: {why} (peer {peer})", why=refused,
                      peer=request.peer)
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, refused)
        self._host = request.headers.get("host")
        self._secure = is_secure(self.transport)
        admission = self.factory.sessions.admission
        if admission is not None:
            self._client_address = client_address(request, admission.trusted_proxies)
        values = request.params.get("watch")
        if values:
            # A spectator: the token is its credential, whoever it is.
            self._watch_token = values[0]
            kind = BinaryWire if wire.BINARY_SUBPROTOCOL in request.protocols else JsonWire
            self._wire = kind(self.factory.max_message_size)
            self._coalescer = Coalescer(self.factory.clock, self._emit,
                                        delay=self.factory.coalesce_delay,
                                        limit=min(self.factory.coalesce_bytes,
                                                  self._wire.max_chunk))
            return self._wire.subprotocol
        values = request.params.get("session_id")
        self._requested_session = values[0] if values else None
        values = request.params.get("offset")
        self._requested_offset = values[0] if values else None
        values = request.params.get("profile")
        self._requested_profile = values[0] if values else None
        self._wants_resume(request)
        # The terminal's size, if the URL gives it: then no resize need come
        # before the session's first output (checked once the connection is open).
        self._requested_size = (request.params.get("cols", [None])[0],
                                request.params.get("rows", [None])[0])
        kind = BinaryWire if wire.BINARY_SUBPROTOCOL in request.protocols else JsonWire
        self._wire = kind(self.factory.max_message_size)
        self._coalescer = Coalescer(self.factory.clock, self._emit,
                                    delay=self.factory.coalesce_delay,
                                    limit=min(self.factory.coalesce_bytes, self._wire.max_chunk))
        return self._authenticated(request, self._wire.subprotocol)

    def _authenticated(self, request, subprotocol):
        """
        Accept the upgrade once its user is known (C{self._user}); refuse it
        before, with 401 (no or wrong credentials) or 429 (too many failed
        logins), when there is none.
        """
        auth = self.factory.authenticator
        if auth is None:
            return subprotocol
        d = auth.user_of(request)

        def known(user):
            self._user = user
            return subprotocol

        def refused(failure):
            failure.trap(AuthRefused)
            _log.info("refused a WebSocket from {peer}: {message}", peer=request.peer,
                      message=failure.value.message)
            raise ConnectionDeny(failure.value.status, failure.value.message)
        return d.addCallbacks(known, refused)

    def onOpen(self) -> None:
        self.factory.connections.add(self)
        # The HTTP channel that carried the upgrade is still registered as
        # the transport's producer: let it go, so the session can register.
        if getattr(self.transport, "producer", None) is not None:
            self.transport.unregisterProducer()
        # Told by the transport when its outgoing buffer is full, and when
        # it has drained, for as long as the connection lasts.
        self._outgoing = _Outgoing(self)
        self.transport.registerProducer(self._outgoing, True)
        # Autobahn's own attempt at this fails silently (its options are not
        # set yet when it tries): without it, Nagle holds small frames such
        # as keystroke echoes back for up to 40 ms behind an unacked frame.
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        if self._watch_token is not None:
            self._start_watching()
            return
        try:
            size = url_size(*self._requested_size)
        except wire.ProtocolError as e:
            self._refuse(e.message, e.code, CLOSE_INVALID_SESSION)
            return
        if self._requested_session is None:
            if self._requested_profile is not None:
                # Refused before anything is made.
                try:
                    parse_profile_name(self._requested_profile, self._manager.profiles)
                except UnknownProfile as e:
                    self._refuse(e.message, e.code, CLOSE_INVALID_SESSION)
                    return
            self._phase = _Phase.AWAITING_SIZE
            if size is not None:
                # The size is known: the session is made at it, and what it
                # says goes out at once (a warm one's prompt with the 101).
                self._open_session(size)
                if self._phase is _Phase.AWAITING_SIZE and self._session is not None:
                    self._first_size(*size, resize=False)
            elif self.factory.start_at_open:
                self._open_session()
            return
        self._phase = _Phase.SESSION
        try:
            session_id = wire.parse_session_id(self._requested_session)
            self._reconnect(session_id, size)
        except wire.ProtocolError as e:
            self._refuse(e.message, e.code, CLOSE_INVALID_SESSION)
        except SessionNotFound as e:
            self._not_live(session_id, size, e)
        except CapsuleError as e:
            self._refuse(e.message, e.code, CLOSE_UNAVAILABLE)

    def _reconnect(self, session_id: str, size) -> None:
        """
        Attach to the live session C{session_id} from the offset the client
        asked for, and give it the client's C{size} if known; raise
        L{SessionNotFound}, or L{wire.ProtocolError} for a bad offset.
        """
        offset = None
        if self._wire.acks and self._requested_offset is not None:
            offset = wire.parse_offset(self._requested_offset)
        self._session = self._manager.reconnect(session_id, self, offset, user=self._user)
        if size is not None and self._session is not None and self._phase is _Phase.SESSION:
            self._manager.resize(self._session, *size)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        # Any exception escaping here would drop the connection: every
        # failure becomes an error frame instead.
        self._manager.metrics.received(len(payload))
        try:
            self._handle(self._wire.parse(payload, isBinary))
        except InputOverrun as e:
            _log.warn("closed {peer}: {message}", peer=self.peer, message=e.message)
            self._refuse(e.message, e.code, CLOSE_INPUT_OVERRUN)
        except wire.ProtocolError as e:
            self._manager.metrics.error_sent(e.code)
            self._send(wire.encode_error(e.message, e.code))
        except Exception:
            _log.failure("unexpected error handling a message from {peer}", peer=self.peer)
            self._manager.metrics.error_sent("internal_error")
            self._send(wire.encode_error("internal error: the message was not handled",
                                         "internal_error"))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.connection_closed(self)
        self._manager.metrics.closed(self.localCloseCode if self.closedByMe else code)
        session, self._session = self._session, None
        self._phase = _Phase.DONE
        before_first_frame, self._unseen = self._unseen, False
        self._cancel_first_frame()
        self._held, self._held_bytes = [], 0
        unsent = 0
        if self._coalescer is not None:
            unsent = self._coalescer.pending
            self._coalescer.discard()
        self.pause_output_producer(None)
        self._cancel_stall()
        self._backlog, self._backlog_bytes = [], 0
        if self._watch_token is not None:
            if session is not None:
                self.factory.spectators.leave(session, self)
        elif session is not None and before_first_frame:
            self._abandon(session)
        elif session is not None:
            self._manager.detach(session, self, unsent)

    # -- a new session, made as the connection opens -------------------------

    def _open_session(self, size: tuple[int, int] = OPENING_SIZE) -> None:
        """
        Make the new session now, at C{size}: as the connection opens (with
        C{start_at_open}), its container is made while the client sends its
        first frame, and what the session says is held until that frame
        (the terminal's size) arrives.  Admission decides first: nothing is
        made for a client refused.
        """
        self._first_frame = self.factory.clock.callLater(
            self.factory.first_frame_timeout, self._no_first_frame)
        try:
            session = self.factory.sessions.open(self, OpenRequest(
                user=self._user, address=self._client_address,
                profile=self._requested_profile, size=size))
        except AdmissionRefused as e:
            self._cancel_first_frame()
            self._refuse(e.message, e.code, CLOSE_QUOTA_EXCEEDED
                         if e.code == QUOTA_EXCEEDED else CLOSE_UNAVAILABLE)
            return
        except CapsuleError as e:
            self._cancel_first_frame()
            self._refuse(e.message, e.code, CLOSE_INVALID_SESSION)
            return
        if self._phase is _Phase.DONE:
            # Refused or ended at once (it could not be made): told already.
            return
        self._session, self._unseen = session, True

    def _abandon(self, session) -> None:
        """
        The session made for this connection was never seen by its client
        (it left, or was closed, before its first frame): it ends now, and
        its container goes (once made, if it is being made).
        """
        self._manager.end(session, "its client left before it sent its terminal size")

    def _first_size(self, cols: int, rows: int, resize: bool = True) -> None:
        """
        The client's first frame: its terminal's size.  The session gets
        it, and the client what the session said meanwhile.
        """
        self._cancel_first_frame()
        self._phase, self._unseen = _Phase.SESSION, False
        if resize:
            self._manager.resize(self._session, cols, rows)
        held, self._held, self._held_bytes = self._held, [], 0
        for method, args in held:
            if self._phase is not _Phase.SESSION:
                break
            method(*args)

    def _hold(self, method, *args) -> bool:
        """
        Whether the session's news must wait for the client's first frame
        (and is held), bounded: a client that lets too much wait is closed.
        """
        if self._phase is not _Phase.AWAITING_SIZE:
            return False
        if method == self.session_output:
            self._held_bytes += len(args[0])
            if self._held_bytes > self.factory.max_held_output:
                self._silent(f"the terminal size was not sent while the session's output grew"
                             f" past {self.factory.max_held_output} bytes")
                return True
        self._held.append((method, args))
        return True

    def _no_first_frame(self) -> None:
        self._first_frame = None
        if self._phase is _Phase.AWAITING_SIZE:
            self._silent(f"no terminal size within {self.factory.first_frame_timeout:g} s:"
                         ' send {"type": "resize", "cols": C, "rows": R} first')

    def _silent(self, message: str) -> None:
        """
        Close a client that did not send its first frame in time; its
        session goes with the connection (see L{onClose}).
        """
        _log.info("refused {peer}: {message}", peer=self.peer, message=message)
        self._held, self._held_bytes = [], 0
        self._manager.metrics.error_sent("not_started")
        self._send(wire.encode_error(message, "not_started"))
        self._close(CLOSE_INVALID_SESSION, message)

    def _cancel_first_frame(self) -> None:
        call, self._first_frame = self._first_frame, None
        if call is not None and call.active():
            call.cancel()

    # -- messages --------------------------------------------------------

    def _handle(self, message) -> None:
        if isinstance(message, wire.Ping):
            self._send(wire.encode_pong())
        elif self._watch_token is not None:
            self._handle_watching(message)
        elif self._resuming:
            self._while_resuming(message)
        elif isinstance(message, wire.Resize):
            if self._phase is _Phase.AWAITING_SIZE:
                # Made now at this size, unless it was made as the connection opened.
                made_now = self._session is None
                if made_now:
                    self._open_session((message.cols, message.rows))
                if self._phase is _Phase.AWAITING_SIZE and self._session is not None:
                    self._first_size(message.cols, message.rows, resize=not made_now)
            elif self._session is not None:
                self._manager.resize(self._session, message.cols, message.rows)
        elif isinstance(message, wire.Input):
            if self._session is None or self._phase is _Phase.AWAITING_SIZE:
                raise wire.ProtocolError(
                    'send {"type": "resize", "cols": C, "rows": R} first: the session'
                    " starts once the terminal size is known", "not_started")
            self._manager.write(self._session, message.data)
        elif isinstance(message, wire.Ack):
            if message.offset > self._sent:
                raise wire.ProtocolError(
                    f"ack of offset {message.offset}, beyond the {self._sent} bytes sent",
                    "bad_ack")
            self._acked = max(self._acked, message.offset)
            self._check_window()

    def session_watchers(self, count: int) -> None:
        """
        (The owner's connection.)  How many watch its session now.
        """
        if self._phase is _Phase.SESSION and self._watch_token is None:
            self._flush()
            self._send(wire.encode_watchers(count))

    def _check_window(self) -> None:
        if self._producer is not None and self._wire.acks:
            self._producer.hold(
                "window", self._sent - self._acked >= self.factory.flow_window)

    def _emit(self, data: bytes) -> None:
        # Called by the coalescer with a batch of output.  Autobahn refuses
        # to send messages over the size limit, so a large batch (a replay)
        # goes out in several frames.
        if self.state != WebSocketProtocol.STATE_OPEN:
            return
        piece = self._wire.max_chunk
        chunks = [data] if len(data) <= piece else [
            data[start : start + piece] for start in range(0, len(data), piece)]
        self._manager.metrics.sent(len(data))
        for chunk in chunks:
            self._sent += len(chunk)
            self.sendMessage(*self._wire.output(chunk))
        self._check_window()

    def _flush(self) -> None:
        if self._coalescer is not None:
            self._coalescer.flush()

    def _send(self, payload: bytes, is_binary: bool = False) -> None:
        if self.state == WebSocketProtocol.STATE_OPEN:
            self._manager.metrics.sent(len(payload))
            self.sendMessage(payload, isBinary=is_binary)

    def _refuse(self, message: str, code: str, close_code: int) -> None:
        _log.info("refused {peer}: {message}", peer=self.peer, message=short_ids(message))
        self._session = None
        self._manager.metrics.error_sent(code)
        self._send(wire.encode_error(message, code))
        self._close(close_code, message)

    def _close(self, code: int, reason: str) -> None:
        self._phase = _Phase.DONE
        if self.state == WebSocketProtocol.STATE_OPEN:
            self.sendClose(code, close_reason(reason))

    def _let_go(self) -> None:
        self._session = None
        self._flush()
        self.pause_output_producer(None)

    # -- ISessionClient ----------------------------------------------------

    def session_started(self, session, resumed: bool, offset: int, replay: int) -> None:
        if self._hold(self.session_started, session, resumed, offset, replay):
            return
        self._flush()
        self._sent = self._acked = offset
        if resumed:
            self._manager.metrics.resumed(replay)
        grace, kept = self._manager.after_last_client(session)
        self._send(*self._wire.connected(session.id, resumed, offset, replay,
                                         self.factory.flow_window, grace, kept,
                                         getattr(session, "profile", None),
                                         away=self._away(session),
                                         **self._keep_fields(session)))
        self._tell_resumed()
        drain = self.factory.sessions.drain
        if drain is not None and drain.active:
            self._send(wire.encode_notice(DRAINING, drain.notice()))
        if getattr(session, "ports_known", False):
            self._send_ports(session)
        self.pause_output_producer(session.output_producer())

    def _away(self, session) -> dict | None:
        """
        What C{session} printed while no client was attached (the
        C{connected} frame's C{away}), or C{None}.
        """
        away = session.core.away()
        if away is None:
            return None
        since, printed = away
        # How long, by capsule's clock: the page's may differ from it.
        seconds = max(0.0, self.factory.clock.seconds() - since)
        return {"since": round(since, 3), "seconds": round(seconds, 1), "printed": printed,
                "recorded": self.factory.recording}

    def session_ports(self, session) -> None:
        """
        (The owner's connection.)  The ports listening in its session changed.
        """
        if self._hold(self.session_ports, session):
            return
        if self._phase is _Phase.SESSION and self._watch_token is None:
            self._flush()
            self._send_ports(session)

    def _send_ports(self, session) -> None:
        """
        Send the session's ports when they differ from what this connection
        was last told: a connection starts knowing of none, so a session
        with none says nothing (clients of the protocol before ports never
        hear of them unless a port opens).
        """
        addresses = self.factory.port_addresses
        entries = addresses.entries(session, self._secure, self._host)
        told = (entries, session.ports_more)
        if told == self._ports_told:
            return
        self._ports_told = told
        self._send(wire.encode_ports(entries, session.ports_more))

    def session_output(self, data: bytes) -> None:
        if self._hold(self.session_output, data):
            return
        self._coalescer.push(data)

    def session_dropped(self, count: int, offset: int) -> None:
        if self._hold(self.session_dropped, count, offset):
            return
        self._flush()
        self._send(*self._wire.dropped(count, offset))

    def session_notice(self, code: str, message: str) -> None:
        if self._hold(self.session_notice, code, message):
            return
        self._flush()
        self._send(wire.encode_notice(code, message))

    def session_failed(self, message: str, code: str) -> None:
        self._let_go()
        self._manager.metrics.error_sent(code)
        self._send(wire.encode_error(message, code))
        self._close(CLOSE_SESSION_NOT_FOUND if code in ("session_not_found", SESSION_KEPT)
                    else CLOSE_UNAVAILABLE, message)

    def session_ended(self, exit_code: int | None, message: str) -> None:
        self._let_go()
        self._send(wire.encode_exit(exit_code, message))
        self._close(1000, message)

    def session_interrupted(self, message: str) -> None:
        self._let_go()
        self._send(wire.encode_error(message, "restarting"))
        self._close(CLOSE_RESTARTING, message)

    def pause_input(self, paused: bool) -> None:
        self._hold_reading("input", paused)

    def _hold_reading(self, reason: str, on: bool) -> None:
        """
        Read nothing from the client while any reason holds.
        """
        if on:
            self._not_reading.add(reason)
        else:
            self._not_reading.discard(reason)
        transport = self.transport
        if transport is None:
            return
        if self._not_reading and not self._reading_paused:
            if self.state == WebSocketProtocol.STATE_OPEN:
                self._reading_paused = True
                transport.pauseProducing()
        elif self._reading_paused and not self._not_reading:
            self._reading_paused = False
            transport.resumeProducing()

    def _outgoing_full(self, full: bool) -> None:
        """
        The transport's outgoing buffer is over its mark (C{full}), or has
        drained: the session's output waits, and so does everything the
        client sends (a ping is answered with a pong: a client that sends
        pings and reads nothing would otherwise grow the buffer without
        end).  A client that leaves it full for C{stall_timeout} is dropped.
        """
        if self._producer is not None:
            self._producer.hold("transport", full)
        self._hold_reading("outgoing", full)
        if not full and self._backlog:
            self._send_backlog()
        if not full:
            self._cancel_stall()
        elif self._stalled is None and self.state == WebSocketProtocol.STATE_OPEN:
            self._stalled = self.factory.clock.callLater(
                self.factory.stall_timeout, self._stall_expired)

    def _cancel_stall(self) -> None:
        call, self._stalled = self._stalled, None
        if call is not None and call.active():
            call.cancel()

    def _stall_expired(self) -> None:
        self._stalled = None
        if self.transport is None or self.state == WebSocketProtocol.STATE_CLOSED:
            return
        _log.warn("dropped {peer}: it did not read what it was sent for {timeout:g} s",
                  peer=self.peer, timeout=self.factory.stall_timeout)
        self._manager.metrics.error_sent("not_reading")
        # Nothing sent to it would be read: no close handshake.
        self.transport.abortConnection()

    def session_taken_over(self) -> None:
        self._let_go()
        self._refuse("this session was opened in another window", "taken_over",
                     CLOSE_TAKEN_OVER)

    def pause_output_producer(self, producer) -> None:
        # The session's output producer pauses while the transport's buffer
        # is full (told by _Outgoing, the transport's producer) or while the
        # client's window is (binary protocol).
        if self.transport is None:
            return
        if self._producer is not None:
            self._producer.release()
            self._producer = None
        if producer is not None and self.state == WebSocketProtocol.STATE_OPEN:
            self._producer = FlowGate(producer)
            if "outgoing" in self._not_reading:
                self._producer.hold("transport", True)


@implementer(IPushProducer)
class _Outgoing:
    """
    The producer a WebSocket's transport pauses when its outgoing buffer is
    full and resumes when it has drained: it tells its connection.
    """

    def __init__(self, protocol: CapsuleServerProtocol) -> None:
        self._protocol = protocol

    def pauseProducing(self) -> None:
        self._protocol._outgoing_full(True)

    def resumeProducing(self) -> None:
        self._protocol._outgoing_full(False)

    def stopProducing(self) -> None:
        # The connection is closing: the shell must go on (see FlowGate).
        protocol = self._protocol
        protocol._cancel_stall()
        if protocol._producer is not None:
            protocol._producer.stopProducing()
