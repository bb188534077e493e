"""
The egress proxy, behind the session door: a fenced session's one way out.

Every connection to the door is read up to its first line (at most
L{EgressLimits.first_line} bytes, within L{EgressLimits.head_timeout}
seconds), then goes one of three ways:

 - C{CONNECT host:port HTTP/1.1}: a tunnel (TLS is not terminated: capsule
   sees the host name and the port, never what goes through);
 - a request with an absolute URI (C{GET http://host/path HTTP/1.1}): plain
   HTTP proxying, one request per connection (sent on with
   C{Connection: close}, its answer passed back as it comes);
 - anything else: the door's own site (the credential gateway), handed the
   bytes read so far, unchanged.

The session a connection comes from is found by C{identify(transport)}
(by default, its source address: L{capsule.sessions.by_address}; a
connection the keeper carries for a session with no network is identified
by its session), and its profile's L{EgressPolicy} decides: the host name
must be allowed, and the port one of the allowed ports (80, 443 and those
the operator adds) unless the policy is open.  capsule resolves the name
itself, checks every address it resolves to (L{refused_address}: link-local
and metadata, private, loopback, multicast, the host's own... are refused
whatever the policy unless the operator allowed them) and connects to a
checked address, never resolving the name again (no DNS rebinding).

A refusal is answered 403 with a sentence naming the host and the profile
setting that would allow it (in the body and in the C{X-Capsule-Egress}
header, which C{curl -v} shows for a refused CONNECT), logged at a bounded
rate, and counted per session and in C{/metrics}.  Bytes flow both ways
with backpressure (each side's transport is the other's producer); once
the heads are through (the CONNECT's 200, a plain request's head sent on)
and both ends are TCP sockets, they move between the two in the kernel
(L{capsule.web.splice.Splicer}: splice(2), never copied through capsule),
with the same backpressure, half-closes and limits; a connection the
keeper carries (a session with no network) is copied the ordinary way.  A
tunnel idle for L{EgressLimits.idle_timeout} seconds is closed; a session
holds at most L{EgressLimits.tunnels} connections through the proxy.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from capsule.core.egress import (DEFAULT_PORTS, OPEN, EgressRefused, normalise_host,
                                 refused_address)
from capsule.core.ratelog import RateLimitedLog
from capsule.gateway.door import door_url
from capsule.sessions.observers import SessionObserver
from capsule.web.splice import SPLICE_BUFFER, Splicer, can_splice

_log = Logger()


@dataclass(frozen=True)
class EgressLimits:
    """
    @ivar first_line: the most bytes of a connection's first line.
    @ivar header: the most bytes of a proxy request's head.
    @ivar head_timeout: seconds a connection has to send its request head.
    @ivar connect_timeout: seconds to connect to the upstream.
    @ivar idle_timeout: seconds a tunnel may pass with no byte either way.
    @ivar tunnels: connections through the proxy one session may hold.
    @ivar early: bytes a client may send before its tunnel is up.
    @ivar splice: bytes one way of a spliced tunnel reads at once and holds
        in capsule while its reader takes no more (its pipe, in the
        kernel): a session's L{tunnels}, both ways, hold at most
        C{2 * tunnels * splice} (256 MiB by default; the copied path about
        an eighth of that).  256 KiB measured slower on this host's loaded
        cores (a median of 71 % of a direct fetch against 80 %) and used
        more CPU.
    """

    first_line: int = 8192
    header: int = 32 * 1024
    head_timeout: float = 15.0
    connect_timeout: float = 15.0
    idle_timeout: float = 600.0
    tunnels: int = 128
    early: int = 256 * 1024
    splice: int = SPLICE_BUFFER


def host_addresses() -> set[str]:
    """
    The addresses of this host's network interfaces (IPv4 from
    C{/proc/net/fib_trie}, IPv6 from C{/proc/net/if_inet6}); empty where
    they cannot be read.
    """
    found: set[str] = set()
    try:
        with open("/proc/net/fib_trie") as f:
            previous = ""
            for line in f:
                if "/32 host LOCAL" in line:
                    found.add(previous.split()[-1])
                previous = line
    except OSError:
        pass
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                text = line.split()[0]
                found.add(str(ipaddress.ip_address(int(text, 16))))
    except (OSError, ValueError, IndexError):
        pass
    return found


def resolve(host: str, port: int) -> Deferred:
    """
    The addresses C{host} resolves to (on a thread): fires with a list of
    strings.
    """
    def _thd():
        return list(dict.fromkeys(
            info[4][0] for info in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)))
    return deferToThread(_thd)


def refusal(status: int, reason: str, message: str) -> bytes:
    """
    The proxy's answer to a request it does not carry out.
    """
    body = (message + "\n").encode("utf-8")
    phrase = {400: "Bad Request", 403: "Forbidden", 408: "Request Timeout",
              429: "Too Many Requests", 431: "Request Header Fields Too Large",
              502: "Bad Gateway", 504: "Gateway Timeout"}.get(status, "Error")
    header = message.encode("ascii", "replace")[:300]
    return (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n"
            f"X-Capsule-Refused: {reason}\r\n").encode("ascii") + (
            b"X-Capsule-Egress: " + header + b"\r\n\r\n" + body)


class EgressProxy(SessionObserver):
    """
    What the proxy decides, and what it counts: shared by every connection.
    Told of sessions' ends (a L{SessionObserver}), when their counts go.

    @param resolve: C{resolve(host, port)} fires with the addresses of a
        name (tests give their own).
    @param allowed: networks (C{ipaddress}) the operator allows although
        L{refused_address} refuses them.
    @param ports: the ports fenced sessions may reach.
    @param own: the host's own addresses (default: L{host_addresses}).
    @param metrics: told of refusals (C{egress_refused(reason)}), if given.
    @param connect: C{connect(address, port, factory)} fires with the
        upstream protocol (tests give their own).
    """

    def __init__(self, reactor, *, resolve=resolve, allowed=(), ports=DEFAULT_PORTS,
                 own=None, metrics=None, limits: EgressLimits = EgressLimits(),
                 connect=None) -> None:
        self.reactor = reactor
        self._resolve = resolve
        self.allowed = tuple(allowed)
        self.ports = frozenset(ports)
        self.own = frozenset(host_addresses() if own is None else own)
        self.metrics = metrics
        self.limits = limits
        self.connect = connect or self._tcp_connect
        self._log = RateLimitedLog(_log)
        # Per session id: connections held through the proxy, refusals.
        self.tunnels: dict[str, int] = {}
        self.refusals: dict[str, int] = {}

    def _tcp_connect(self, address: str, port: int, factory) -> Deferred:
        endpoint = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
        return endpoint(self.reactor, address, port,
                        timeout=self.limits.connect_timeout).connect(factory)

    def refuse(self, reason: str, message: str, status: int = 403) -> EgressRefused:
        error = EgressRefused(reason, message)
        error.status = status
        return error

    async def check(self, profile, host: str, port: int) -> list[str]:
        """
        The addresses a session of C{profile} may connect to for
        C{host}:C{port} (all checked, in the resolver's order).

        @raise EgressRefused: saying why not (its C{status}: the HTTP
            status to answer).
        """
        policy = profile.egress
        name = profile.name
        try:
            host = normalise_host(host)
        except (TypeError, ValueError):
            raise self.refuse("bad_host", f"capsule: egress refused: {host[:100]!r} is not a"
                               f" host name", 400) from None
        if not policy.allows(host):
            if policy.mode == "none":
                raise self.refuse("policy", f"capsule: egress to {host} refused: profile"
                                   f" {name} allows no egress (egress = \"none\"); give it"
                                   f" an egress list naming {host} in the profiles file")
            raise self.refuse("policy", f"capsule: egress to {host} refused: profile {name}"
                               f" allows only its egress list; add {host} to egress in the"
                               f" profiles file ([profiles.{name}] egress = [..., \"{host}\"])")
        if policy.mode != OPEN and port not in self.ports:
            raise self.refuse("port", f"capsule: egress to {host} port {port} refused: fenced"
                               f" sessions reach ports {', '.join(map(str, sorted(self.ports)))}"
                               f" only (an operator adds one with --egress-port {port})")
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            try:
                addresses = await self._resolve(host, port)
            except Exception as e:
                raise self.refuse("unresolved", f"capsule: egress to {host} failed: the name"
                                   f" does not resolve ({str(e)[:100] or type(e).__name__})",
                                   502) from None
            if not addresses:
                raise self.refuse("unresolved", f"capsule: egress to {host} failed: the name"
                                   f" does not resolve", 502)
        for address in addresses:
            why = refused_address(address, self.allowed, self.own)
            if why is not None:
                shown = host if host == address else f"{host} ({address})"
                raise self.refuse("address", f"capsule: egress to {shown} refused: {address} is"
                                   f" {why}, never reachable from a session whatever its"
                                   f" profile allows (an operator may allow it with"
                                   f" --egress-allow-address {address})")
        return addresses

    def refused(self, session, error: EgressRefused) -> None:
        """
        Count and log (at a bounded rate) a refusal; with the log line, the
        session's client (if one is attached) is told it as a notice,
        which its terminal shows: a tool's own error ("403 Forbidden")
        seldom says why.
        """
        session_id, profile = session.id, session.settings.name
        self.refusals[session_id] = self.refusals.get(session_id, 0) + 1
        if self.metrics is not None:
            self.metrics.egress_refused(error.reason)
        logged = self._log.warn(self.reactor.seconds(), session_id, "egress-" + error.reason,
                                "session {session_id} (profile {profile}): {message}",
                                profile=profile, message=error.message)
        client = getattr(session, "client", None)
        if logged and client is not None:
            try:
                client.session_notice("egress_refused", error.message)
            except Exception:
                _log.failure("telling session {session_id} of a refusal failed",
                             session_id=session_id[:8])

    def session_ended(self, session) -> None:
        """
        The session ended: its counts go.
        """
        self.refusals.pop(session.id, None)
        self._log.forget(session.id)


class DoorFactory(Factory):
    """
    The door's protocol factory: each connection is a L{DoorConnection}.

    @param site: the factory of what is not proxying (the gateway site).
    @param identify: C{identify(transport)} fires with the session a
        connection comes from (its C{id} and C{settings}: its profile), or
        C{None}.
    """

    # One line per session connection would drown the log: the door's
    # listening is said by capsule.gateway.door.
    noisy = False

    def __init__(self, proxy: EgressProxy, site, identify) -> None:
        self.proxy = proxy
        self.site = site
        self.identify = identify

    def buildProtocol(self, addr):
        protocol = DoorConnection(self.proxy, self.site, self.identify, addr)
        protocol.factory = self
        return protocol

    def for_session(self, session, addr=None) -> "DoorConnection":
        """
        A connection carried for C{session} by other means than its own
        address (a keeper's forwarded port).
        """
        protocol = DoorConnection(self.proxy, self.site, lambda _: session, addr)
        protocol.factory = self
        return protocol


@implementer(IHalfCloseableProtocol)
class _Upstream(Protocol):
    def __init__(self, door: "DoorConnection") -> None:
        self.door = door

    def readConnectionLost(self) -> None:
        # The upstream has said all it will: the session hears the end of
        # it, and may still send.
        self.door.upstream_finished()

    def writeConnectionLost(self) -> None:
        pass

    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)

    def dataReceived(self, data: bytes) -> None:
        self.door.upstream_data(data)

    def connectionLost(self, reason=None) -> None:
        self.door.upstream_lost()


class _UpstreamFactory(Factory):
    def __init__(self, door: "DoorConnection") -> None:
        self.door = door

    def buildProtocol(self, addr):
        return _Upstream(self.door)


def _shut_write(transport) -> None:
    """
    Close the sending side of C{transport} (all of it, for one that cannot
    close half).
    """
    shut = getattr(transport, "loseWriteConnection", None)
    if shut is None:
        transport.loseConnection()
    else:
        shut()


_HEAD_END = (b"\r\n\r\n", b"\n\n")
_HOP_BY_HOP = frozenset((b"connection", b"proxy-connection", b"keep-alive",
                         b"proxy-authorization", b"proxy-authenticate", b"te", b"trailer",
                         b"upgrade"))


@implementer(IHalfCloseableProtocol)
class DoorConnection(Protocol):
    """
    One connection to the door: read its first line, then proxy it or hand
    it to the site (see the module's text).  A tunnel carries a half-close
    either way (a client that shuts its sending side still reads the
    answer).
    """

    def __init__(self, proxy: EgressProxy, site, identify, addr) -> None:
        self.proxy = proxy
        self.site = site
        self.identify = identify
        self.addr = addr
        self._buffer = b""
        self._kind: str | None = None
        self._next = None
        self._upstream: _Upstream | None = None
        self._timer = None
        self._active = False
        self._done = False
        self._session_id: str | None = None
        # Both ways, once spliced (empty while copied through capsule).
        self.splicers: list[Splicer] = []
        self._moved = 0

    # -- reading the head --------------------------------------------------

    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            # A keystroke through a tunnel (ssh over CONNECT) must not wait.
            self.transport.setTcpNoDelay(True)
        self._timer = self.proxy.reactor.callLater(self.proxy.limits.head_timeout,
                                                   self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._timer = None
        self._answer(408, "head_timeout", "capsule: the request did not arrive in"
                     f" {self.proxy.limits.head_timeout:g} s")

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def dataReceived(self, data: bytes) -> None:
        if self._next is not None:
            self._next.dataReceived(data)
            return
        if self._upstream is not None:
            self._active = True
            self._upstream.transport.write(data)
            return
        if self._done:
            return
        self._buffer += data
        if self._kind is None:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self.proxy.limits.first_line:
                    self._answer(400, "first_line", "capsule: the request's first line is"
                                 f" longer than {self.proxy.limits.first_line} bytes")
                return
            if end > self.proxy.limits.first_line:
                self._answer(400, "first_line", "capsule: the request's first line is"
                             f" longer than {self.proxy.limits.first_line} bytes")
                return
            self._kind = self._classify(self._buffer[:end].rstrip(b"\r"))
            if self._kind == "site":
                self._to_site()
                return
        if len(self._buffer) > self.proxy.limits.header + self.proxy.limits.early:
            self._answer(400, "early", "capsule: too many bytes before the connection is up")
            return
        if self._head is None:
            found = [(at, len(marker)) for marker in _HEAD_END
                     if (at := self._buffer.find(marker)) >= 0]
            if found:
                at, size = min(found)
                self._head = self._buffer[:at]
                self._buffer = self._buffer[at + size:]
            else:
                if len(self._buffer) > self.proxy.limits.header:
                    self._answer(431, "header", "capsule: the request's head is longer than"
                                 f" {self.proxy.limits.header} bytes")
                return
            self._cancel_timer()
            self.transport.pauseProducing()
            d = Deferred.fromCoroutine(self._open())
            d.addErrback(self._failed)

    _head: bytes | None = None

    def _classify(self, line: bytes) -> str:
        parts = line.split(b" ")
        if len(parts) == 3 and parts[0] == b"CONNECT":
            return "connect"
        if len(parts) == 3 and parts[1][:7].lower() == b"http://":
            return "http"
        return "site"

    def _to_site(self) -> None:
        """
        Not proxying: the site's protocol takes the connection, and the
        bytes read so far.
        """
        self._cancel_timer()
        buffered, self._buffer = self._buffer, b""
        self._next = self.site.buildProtocol(self.addr)
        if self._next is None:
            self.transport.loseConnection()
            return
        self._next.makeConnection(self.transport)
        if buffered:
            self._next.dataReceived(buffered)

    # -- proxying ----------------------------------------------------------

    def _target_of(self) -> tuple[str, int, bytes]:
        """
        The host, the port and the bytes to send upstream first.
        """
        lines = self._head.replace(b"\r\n", b"\n").split(b"\n")
        method, target, version = lines[0].split(b" ")
        try:
            text = target.decode("ascii")
        except UnicodeDecodeError:
            raise self.proxy.refuse("bad_target", "capsule: the request's target is not ASCII",
                                     400) from None
        if self._kind == "connect":
            host, sep, port = text.rpartition(":")
            if not sep or not port.isdigit() or not host or not 0 < int(port) < 65536:
                raise self.proxy.refuse("bad_target", f"capsule: CONNECT needs host:port, got"
                                         f" {text[:100]!r}", 400)
            return host.strip("[]"), int(port), b""
        try:
            parts = urlsplit(text)
            host, port = parts.hostname, 80 if parts.port is None else parts.port
        except ValueError:
            host = None
        if host is not None and not 0 < port < 65536:
            host = None
        if not host or parts.username is not None or parts.password is not None:
            raise self.proxy.refuse("bad_target", f"capsule: not a URL the proxy follows:"
                                     f" {text[:100]!r}", 400)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        out = [method + b" " + path.encode("ascii") + b" " + version]
        has_host = False
        for line in lines[1:]:
            name = line.split(b":", 1)[0].strip().lower()
            if name in _HOP_BY_HOP:
                continue
            has_host = has_host or name == b"host"
            out.append(line)
        if not has_host:
            out.append(b"Host: " + parts.netloc.encode("ascii"))
        out.append(b"Connection: close")
        return host, port, b"\r\n".join(out) + b"\r\n\r\n"

    async def _open(self) -> None:
        session = await maybeDeferred(self.identify, self.transport)
        if self._done:
            return
        if session is None:
            self._answer(403, "no_session", "capsule: the egress proxy serves capsule's"
                         " sessions only")
            return
        profile = session.settings
        self._session_id = session.id
        try:
            host, port, first = self._target_of()
            held = self.proxy.tunnels.get(session.id, 0)
            if held >= self.proxy.limits.tunnels:
                raise self.proxy.refuse("tunnels", "capsule: egress refused: this session holds"
                                         f" {held} connections through the proxy, the most"
                                         " it may", 429)
            addresses = await self.proxy.check(profile, host, port)
        except EgressRefused as e:
            if e.reason not in ("bad_target", "tunnels"):
                self.proxy.refused(session, e)
            self._answer(getattr(e, "status", 403), e.reason, e.message)
            return
        if self._done:
            return
        self.proxy.tunnels[session.id] = self.proxy.tunnels.get(session.id, 0) + 1
        self._counted = True
        error = None
        for address in addresses:
            try:
                upstream = await self.proxy.connect(address, port, _UpstreamFactory(self))
                break
            except Exception as e:
                error = e
                if self._done:
                    return
        else:
            self._answer(502, "connect", f"capsule: could not connect to {host} port {port}"
                         f" ({str(error)[:100] or type(error).__name__})")
            return
        if self._done:
            upstream.transport.loseConnection()
            return
        self._upstream = upstream
        if self._kind == "connect":
            self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        early, self._buffer = first + self._buffer, b""
        if early:
            upstream.transport.write(early)
        if self._client_finished:
            _shut_write(upstream.transport)
        # Each side reads only while the other takes what it sends (copied:
        # at most Twisted's 64 KiB a read and a buffer of about as much,
        # larger ones measured slower; spliced: the Splicer's pipe).
        upstream.transport.registerProducer(self.transport, True)
        self.transport.registerProducer(upstream.transport, True)
        if can_splice(self.transport) and can_splice(upstream.transport):
            # From now on, what either side sends goes on as it is (the
            # answer of a plain request too: it is passed back unread), so
            # the kernel moves it; what Twisted still holds (the 200, the
            # request's head, early bytes) goes first.
            for src, dst in ((self.transport, upstream.transport),
                             (upstream.transport, self.transport)):
                try:
                    self.splicers.append(Splicer(src, dst, self.proxy.limits.splice))
                except OSError as e:
                    # No pipe to be had (out of descriptors): this way is
                    # copied through capsule, as without the splice.
                    self.proxy._log.warn(self.proxy.reactor.seconds(), session.id,
                                         "egress-splice", "egress: a tunnel of session"
                                         " {session_id} is copied, not spliced: {error}",
                                         error=str(e)[:100])
        self.transport.resumeProducing()
        self._idle = self.proxy.reactor.callLater(self.proxy.limits.idle_timeout, self._idle_check)

    _counted = False
    _idle = None

    def _idle_check(self) -> None:
        self._idle = None
        moved = sum(splicer.moved for splicer in self.splicers)
        if self._active or moved != self._moved:
            self._active, self._moved = False, moved
            self._idle = self.proxy.reactor.callLater(self.proxy.limits.idle_timeout,
                                                      self._idle_check)
            return
        self._close()

    def _failed(self, failure: Failure) -> None:
        _log.failure("the egress proxy failed on a connection", failure)
        self._answer(502, "internal", "capsule: the egress proxy failed")

    def _answer(self, status: int, reason: str, message: str) -> None:
        self._cancel_timer()
        if self._done:
            return
        self._done = True
        self.transport.write(refusal(status, reason, message))
        self.transport.loseConnection()

    def upstream_data(self, data: bytes) -> None:
        self._active = True
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        if self._next is not None:
            if IHalfCloseableProtocol.providedBy(self._next):
                self._next.readConnectionLost()
            else:
                self.transport.loseConnection()
            return
        if self._upstream is not None:
            if not self._client_finished:
                self._client_finished = True
                if self._upstream_finished:
                    self._close()
                else:
                    _shut_write(self._upstream.transport)
            return
        if self._head is not None and not self._done:
            # Its request is whole and its tunnel is being made: the
            # upstream hears the end once it is connected.
            self._client_finished = True
            return
        # A request never finished: nothing more will come.
        self._close()

    def writeConnectionLost(self) -> None:
        if self._next is not None and IHalfCloseableProtocol.providedBy(self._next):
            self._next.writeConnectionLost()

    _client_finished = False
    _upstream_finished = False

    def upstream_finished(self) -> None:
        if self._upstream is not None and not self._upstream_finished:
            self._upstream_finished = True
            if self._client_finished:
                self._close()
            else:
                _shut_write(self.transport)

    def upstream_lost(self) -> None:
        if self._upstream is not None:
            self._upstream = None
            self._close()

    def _close(self) -> None:
        self._done = True
        if self._upstream is not None:
            upstream, self._upstream = self._upstream, None
            upstream.transport.loseConnection()
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self._cancel_timer()
        if self._next is not None:
            self._next.connectionLost(reason)
            return
        self._done = True
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        for splicer in self.splicers:
            splicer.close()
        if self._counted:
            self._counted = False
            left = self.proxy.tunnels.get(self._session_id, 1) - 1
            if left > 0:
                self.proxy.tunnels[self._session_id] = left
            else:
                self.proxy.tunnels.pop(self._session_id, None)
        if self._upstream is not None:
            upstream, self._upstream = self._upstream, None
            upstream.transport.loseConnection()


def proxy_environment(door_host, port: int):
    """
    The session environment hook (C{(session_id, profile) -> dict}) that
    points a fenced session's tools at the egress proxy: C{HTTPS_PROXY},
    C{HTTP_PROXY} (and their lower-case forms, which curl and others read)
    at the door, C{NO_PROXY} for the door itself and loopback.

    @param door_host: C{door_host(profile)}: the door's address as the
        profile's sessions reach it, or C{None} when unknown.
    """
    def environment(session_id: str, profile) -> dict[str, str]:
        if not profile.egress.fenced or not port:
            return {}
        host = door_host(profile)
        if host is None:
            return {}
        url = door_url(host, port)
        exempt = f"{host},localhost,127.0.0.1"
        return {"HTTPS_PROXY": url, "HTTP_PROXY": url, "https_proxy": url, "http_proxy": url,
                "NO_PROXY": exempt, "no_proxy": exempt}
    return environment
