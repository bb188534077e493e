"""
Previews: a TCP port listening in a session, reached through capsule's
site, at C{/preview/<session id>/<port>/...} or, under C{--preview-domain},
at C{<port>-<session id>.<domain>} (L{capsule.core.preview}).

A preview's request is taken out of twisted.web once its headers are in
(L{PreviewRouter.divert}, called by the site's channel,
L{capsule.web.connections.CountedChannel}): its body is never read into
capsule's spool. Who asks is decided from the headers alone
(L{capsule.core.preview_access}); then either capsule answers (a refusal,
a redirect that sets a preview's cookie) and closes the connection, or the
connection is spliced to a new TCP connection to the port in the session:
the request's head, rewritten (L{forward_head}), goes first, then every
byte the client sends, raw (its body, whatever its framing; after a
WebSocket's 101, its frames), and the answer comes back raw but for its
head (L{answer_head}: C{Connection: close}, capsule's cookies never set).
Each side is the other's producer: a slow reader pauses the other side.
One request per connection: the answer says C{Connection: close}, so that
the next request of the browser, maybe for capsule's own API, comes through
a new connection and is routed again.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from urllib.parse import parse_qs, quote

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError, TimeoutError as ConnectTimeout
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.web.http import RESPONSES

from capsule.auth.gate import AuthRefused
from capsule.auth.logins import COOKIE_NAME
from capsule.core.keeper import DIRECT_PORT
from capsule.core.preview import parse_preview_host, preview_host, preview_url, valid_port
from capsule.core.preview_access import PreviewAccess
from capsule.core.protocol import ProtocolError, parse_session_id
from capsule.ops.logformat import short_ids
from capsule.web.splice import SPLICE_BUFFER, Bucket, Splicer, Valve, can_splice

_log = Logger()

# The path under a preview's root that sets its cookie (from a link's
# token or a ticket of capsule's origin) and sends the browser on.
AUTH_PATH = "__capsule_preview_auth"
# The preview's own cookie (a grant: capsule.core.preview_access).
GRANT_COOKIE = "capsule_preview"
# Cookies of capsule's that never reach a previewed app, nor are set by one.
CAPSULE_COOKIES = frozenset({COOKIE_NAME, GRANT_COOKIE})
# Request headers never passed on: hop-by-hop ones, credentials, and what
# capsule itself writes (the forwarded ones).
_DROPPED = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization",
                      b"authorization", b"forwarded", b"x-forwarded-for", b"x-forwarded-host",
                      b"x-forwarded-proto", b"x-forwarded-prefix", b"x-forwarded-port",
                      b"x-real-ip"})
# Response headers dropped: capsule says whether the connection stays.
_DROPPED_ANSWER = frozenset({b"connection", b"keep-alive"})
# Bytes a head (request or answer) may have.
MAX_HEAD = 64 * 1024


@dataclass(frozen=True)
class PreviewLimits:
    """
    @ivar per_session: proxied connections one session's previews may have
        open at once (C{--preview-connections-per-session}).
    @ivar bytes_per_second: what one preview (a port of a session) may
        carry each way, all its connections together; C{None}: no cap
        (C{--preview-bytes-per-second}).
    @ivar connect_timeout: seconds to connect to the port in the session.
    """

    per_session: int = 64
    bytes_per_second: int | None = None
    connect_timeout: float = 5.0


class PreviewRefused(Exception):
    def __init__(self, status: int, message: str, code: str, headers=()) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = list(headers)


@dataclass(frozen=True)
class Target:
    """
    What a request names: C{port} of C{session_id}, by its C{form}
    (C{"path"} or C{"host"}); C{prefix} is the path of its root (without a
    trailing slash; empty for a host), C{rest} the path and query the app
    sees.
    """

    session_id: str
    port: int
    form: str
    prefix: str
    rest: bytes


def target_of(host: str | None, path: bytes, domain: str | None) -> Target | PreviewRefused | None:
    """
    The preview a request is for, from its C{Host} and its path: C{None}
    when it is none (the site answers), a L{PreviewRefused} for a malformed
    preview path.
    """
    if domain and host:
        found = parse_preview_host(host, domain_name(domain))
        if found is not None:
            return Target(found[0], found[1], "host", "", path if path.startswith(b"/")
                          else b"/" + path)
    if not (path == b"/preview" or path.startswith((b"/preview/", b"/preview?"))):
        return None
    parts = path.split(b"?", 1)[0].split(b"/", 4)
    try:
        session_id = parse_session_id(parts[2].decode("ascii"))
        if session_id != parts[2].decode("ascii"):
            # Only the id as capsule writes it: the prefix is the cookie's path.
            raise ValueError
        port = int(parts[3].decode("ascii"))
        if not valid_port(port) or parts[3] != b"%d" % port:
            raise ValueError
    except (IndexError, ValueError, UnicodeDecodeError, ProtocolError):
        return PreviewRefused(404, "not a preview's path: /preview/<session id>/<port>/...",
                              "not_found")
    prefix = f"/preview/{session_id}/{port}"
    rest = path[len(prefix):]
    return Target(session_id, port, "path", prefix, rest)


def domain_name(domain: str) -> str:
    """
    The name of a preview domain given as C{name[:port]}.
    """
    return domain.rsplit(":", 1)[0] if domain.count(":") == 1 else domain


def _cookies_without(value: bytes, names) -> bytes:
    kept = []
    for part in value.split(b";"):
        name = part.split(b"=", 1)[0].strip()
        if part.strip() and name.decode("latin-1") not in names:
            kept.append(part.strip())
    return b"; ".join(kept)


def forward_head(method: bytes, target: bytes, version: bytes, headers, *, prefix: str,
                 client: str, proto: str, host: str | None, upgrade: bool,
                 dropped=()) -> bytes:
    """
    The head of a request as the previewed app gets it: the same method,
    path (C{target}, without the preview's prefix), version and headers,
    less capsule's cookies, credentials and hop-by-hop headers (and any
    header named in C{dropped}, such as the trusted proxy's user header),
    with C{X-Forwarded-For/Proto/Host} (and C{-Prefix} for the path form)
    of capsule's own, and C{Connection: close} (C{Connection: Upgrade} for
    a WebSocket's upgrade).

    @param headers: C{(name, value)} pairs, as the client sent them.
    """
    drop = _DROPPED | {d.lower() for d in dropped}
    lines = [b"%s %s %s" % (method, target or b"/", version)]
    for name, value in headers:
        low = name.lower()
        if low in drop:
            continue
        if low == b"cookie":
            value = _cookies_without(value, CAPSULE_COOKIES)
            if not value:
                continue
        if b"\r" in value or b"\n" in value:
            continue
        lines.append(name + b": " + value)
    lines.append(b"X-Forwarded-For: " + client.encode("latin-1"))
    lines.append(b"X-Forwarded-Proto: " + proto.encode("latin-1"))
    if host:
        lines.append(b"X-Forwarded-Host: " + host.encode("latin-1"))
    if prefix:
        lines.append(b"X-Forwarded-Prefix: " + prefix.encode("latin-1"))
    lines.append(b"Connection: upgrade" if upgrade else b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def answer_head(head: bytes, *, path_form: bool) -> bytes:
    """
    An answer's head as the client gets it: C{Connection: close} (but for a
    101), no C{Set-Cookie} of capsule's cookies, and under a path no
    C{Service-Worker-Allowed} (a worker of the app stays under its path).
    """
    lines = head.split(b"\r\n")
    status = lines[0]
    switching = status[9:12] == b"101"
    out = [status]
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(b":")
        low = name.strip().lower()
        if low in _DROPPED_ANSWER and not switching:
            continue
        if low == b"set-cookie":
            cookie = value.strip().split(b"=", 1)[0].strip().decode("latin-1")
            if cookie in CAPSULE_COOKIES:
                continue
        if path_form and low == b"service-worker-allowed":
            continue
        out.append(line)
    if not switching:
        out.append(b"Connection: close")
    return b"\r\n".join(out) + b"\r\n\r\n"


def answer_bytes(status: int, body: dict | None, headers=()) -> bytes:
    """
    A whole answer of capsule's own, JSON, closing the connection.
    """
    data = json.dumps(body).encode("utf-8") if body is not None else b""
    head = [b"HTTP/1.1 %d %s" % (status, RESPONSES.get(status, b"Error")),
            b"Cache-Control: no-store", b"Content-Length: %d" % len(data),
            b"Connection: close", b"Referrer-Policy: no-referrer"]
    if body is not None:
        head.append(b"Content-Type: application/json")
    head += [n + b": " + v for n, v in headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + data


def _going_on(location: str) -> bytes:
    """
    A page that sends its browser on to C{location} at once.
    """
    where = html.escape(location, quote=True)
    page = (f'<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" content="0;url='
            f'{where}"><title>Opening the preview</title><p>Opening the preview: <a href='
            f'"{where}">continue</a>.</p>').encode("utf-8")
    head = [b"HTTP/1.1 200 OK", b"Content-Type: text/html; charset=utf-8",
            b"Cache-Control: no-store", b"Referrer-Policy: no-referrer",
            b"Content-Security-Policy: default-src 'none'", b"X-Frame-Options: DENY",
            b"Content-Length: %d" % len(page), b"Connection: close"]
    return b"\r\n".join(head) + b"\r\n\r\n" + page


def _wants_page(method: bytes, accept: bytes | None) -> bool:
    return method in (b"GET", b"HEAD") and b"text/html" in (accept or b"")


def _cookie(raw: bytes | None, name: str) -> str | None:
    for part in (raw or b"").split(b";"):
        key, sep, value = part.strip().partition(b"=")
        if sep and key.decode("latin-1") == name:
            return value.decode("latin-1")
    return None


def safe_rest(value: str | None) -> str:
    """
    A path under a preview's root to go on to: an absolute path of
    printable ASCII, never another site; anything else is C{/}.
    """
    if not value or not value.startswith("/") or value.startswith("//") or any(
            not 0x21 <= ord(c) <= 0x7e or c == "\\" for c in value):
        return "/"
    return value


class _QuietLog:
    """
    At most C{lines} lines a minute; the rest are counted in the next.
    """

    def __init__(self, clock, lines: int = 20) -> None:
        self.clock, self.lines = clock, lines
        self._start, self._said, self._dropped = None, 0, 0

    def __call__(self, format: str, **fields) -> None:
        now = self.clock.seconds()
        if self._start is None or now - self._start >= 60:
            self._start, self._said = now, 0
        if self._said >= self.lines:
            self._dropped += 1
            return
        self._said += 1
        dropped, self._dropped = self._dropped, 0
        if dropped:
            format += " ({dropped} more preview lines were not logged)"
        _log.info(format, dropped=dropped, **fields)


class PreviewRouter:
    """
    Routes the site's preview requests (see the module), and keeps what
    previews have open.

    @param manager: the sessions (L{capsule.sessions.manager.SessionManager}).
    @param docker: asked once per session for its container's address.
    @param access: who may open what (L{PreviewAccess}).
    @param authenticator: who a request is (None: anyone may, as for the
        whole site).
    @param client_address: the client's address of a request.
    @param domain: C{--preview-domain}, or C{None}.
    @param public_url: capsule's own address (C{--public-url}).
    @param host_policy: the names capsule's own site answers to (the path
        form is on it).
    @param no_network: C{(session, port)} -> a Deferred of an
        C{IStreamClientEndpoint} to the port of a session without a network
        (the keeper's channel), or C{None}: such sessions have no previews.
    """

    def __init__(self, reactor, manager, docker, access: PreviewAccess, *, authenticator=None,
                 client_address=None, domain: str | None = None, public_url: str | None = None,
                 host_policy=None, limits: PreviewLimits = PreviewLimits(),
                 own_ports=(DIRECT_PORT,), no_network=None) -> None:
        self.reactor, self.manager, self.docker = reactor, manager, docker
        self.access, self.authenticator = access, authenticator
        self.client_address = client_address
        self.domain = domain.strip(".").lower() if domain else None
        self.public_url = public_url.rstrip("/") if public_url else None
        self.host_policy = host_policy
        self.limits = limits
        self.own_ports = frozenset(p for p in own_ports if p)
        self.no_network = no_network
        # Refusals, and (apart, so that they never crowd refusals out) the
        # previews opened: each at most 20 lines a minute.
        self.log = _QuietLog(reactor)
        self.opened = _QuietLog(reactor)
        # Open (or opening) proxied connections, by session id.
        self.open: dict[str, set[_Diversion]] = {}
        self._addresses: dict[str, str | None] = {}
        self._buckets: dict[tuple[str, int], tuple[Bucket, Bucket]] = {}
        # The sessions whose end is awaited (their previews end with them).
        self._watched: set[str] = set()

    # -- what sessions do --------------------------------------------------------

    def watch(self, session) -> None:
        """
        End C{session}'s previews when it ends (once asked for each).
        """
        if session.id not in self._watched:
            self._watched.add(session.id)
            session.ended().addCallback(self.session_ended)

    def session_ended(self, session) -> None:
        """
        Its previews end: their connections are closed, their links and
        grants forgotten.
        """
        self._watched.discard(session.id)
        for diversion in list(self.open.pop(session.id, ())):
            diversion.close()
        self._addresses.pop(session.id, None)
        for key in [k for k in self._buckets if k[0] == session.id]:
            del self._buckets[key]
        self.access.drop_session(session.id)

    def revoked(self, session_id: str, port: int, share_id: str) -> None:
        """
        A link was revoked: what was opened through it is closed.
        """
        for diversion in list(self.open.get(session_id, ())):
            if diversion.port == port and diversion.share_id == share_id:
                diversion.close()

    def url(self, session_id: str, port: int) -> str:
        """
        The address of a port's preview.
        """
        return preview_url(session_id, port, base=self.public_url or "", domain=self.domain,
                           scheme=self.scheme())

    def scheme(self) -> str:
        if self.public_url and self.public_url.lower().startswith("https:"):
            return "https"
        return "http"

    def port_refusal(self, port: int) -> str | None:
        """
        Why a port has no preview (one of capsule's own in the container),
        or C{None}.
        """
        if port in self.own_ports:
            return (f"port {port} is capsule's own in the session (its keeper or door): it"
                    " has no preview")
        return None

    # -- the channel's side ----------------------------------------------------

    def divert(self, channel, request):
        """
        Take C{request} (whose headers are in) out of the site if it is a
        preview's: return the callable the channel gives every byte it
        reads from now on, else C{None}.
        """
        host = request.getHeader(b"host")
        path = getattr(channel, "_path", b"") or b"/"
        target = target_of(host.decode("latin-1") if host else None, path, self.domain)
        if target is None:
            return None
        diversion = _Diversion(self, channel, request, target)
        diversion.start()
        return diversion.client_data

    def bucket(self, session_id: str, port: int):
        rate = self.limits.bytes_per_second
        if not rate:
            return None
        key = (session_id, port)
        if key not in self._buckets:
            self._buckets[key] = (Bucket(self.reactor, rate), Bucket(self.reactor, rate))
        return self._buckets[key]

    async def address(self, session) -> str | None:
        if session.id not in self._addresses:
            address, _secret = await self.docker.keeper_address(session.container_id)
            if session.over:
                return None
            self._addresses[session.id] = address
        return self._addresses[session.id]


class _ClientSide(Protocol):
    """
    The client's connection once spliced: what it sends goes on to the
    port in the session.
    """

    def __init__(self, diversion: "_Diversion") -> None:
        self.diversion = diversion

    def dataReceived(self, data: bytes) -> None:
        self.diversion.client_data(data)

    def connectionLost(self, reason) -> None:
        self.diversion.client_lost()


class _Upstream(Protocol):
    def __init__(self, diversion: "_Diversion") -> None:
        self.diversion = diversion

    def connectionMade(self) -> None:
        self.diversion.upstream_made(self)

    def dataReceived(self, data: bytes) -> None:
        self.diversion.upstream_data(data)

    def connectionLost(self, reason) -> None:
        self.diversion.upstream_lost()


class _Diversion:
    """
    One preview request, from its headers to its connection's end.
    """

    def __init__(self, router: PreviewRouter, channel, request, target: Target) -> None:
        self.router, self.channel, self.request, self.target = router, channel, request, target
        self.connection = channel.transport
        self.session_id = getattr(target, "session_id", None) or "-"
        self.port = getattr(target, "port", None)
        self.share_id: str | None = None
        self._held: list[bytes] = []
        self._upstream = None
        self._answer_head = b""
        self._head_done = False
        self._ended = False
        self._counted = False
        self._upgrade = False
        self._client_valve = self._upstream_valve = None
        self._buckets = None
        self._splicers: list[Splicer] = []

    # -- the decision ------------------------------------------------------------

    def start(self) -> None:
        self.channel.setTimeout(None)
        self.connection.pauseProducing()
        # A client that leaves before the splice: its channel hears it.
        self.request.notifyFinish().addErrback(lambda _: self._client_gone())
        d = Deferred.fromCoroutine(self._decide())
        d.addErrback(self._failed)

    def _client_gone(self) -> None:
        if self._upstream is None:
            self._ended = True
            self._uncount()

    def _failed(self, failure) -> None:
        if failure.check(PreviewRefused):
            self._refuse(failure.value)
            return
        _log.failure("a preview failed", failure)
        self._refuse(PreviewRefused(500, "capsule could not open this preview: see its log",
                                    "internal_error"))

    def _header(self, name: bytes) -> bytes | None:
        return self.request.getHeader(name)

    async def _decide(self) -> None:
        router, target = self.router, self.target
        if isinstance(target, PreviewRefused):
            raise target
        if target.form == "path" and (target.rest == b"" or target.rest.startswith(b"?")):
            # The root without its slash: relative links would miss it.
            self._answer(answer_bytes(308, None, [(b"Location", (target.prefix + "/").encode(
                "ascii") + target.rest)]))
            return
        if target.form == "path" and router.host_policy is not None:
            host = self._header(b"host")
            local = self.connection.getHost()
            if not router.host_policy.host_allowed(host.decode("latin-1") if host else None,
                                                   local, self._secure()):
                raise PreviewRefused(421, "this host name is not capsule's", "misdirected")
        session = router.manager.sessions.get(target.session_id)
        missing = PreviewRefused(404, f"no live session {target.session_id}",
                                 "session_not_found")
        if session is None or session.over:
            raise missing
        why = router.port_refusal(target.port)
        if why is not None:
            raise PreviewRefused(400, why, "port_not_allowed")
        path, _, query = target.rest.partition(b"?")
        if path == b"/" + AUTH_PATH.encode():
            self._authorize(parse_qs(query.decode("latin-1")))
            return
        await self._admit(session, missing)
        await self._connect(session)

    def _secure(self) -> bool:
        authenticator = self.router.authenticator
        if authenticator is not None:
            return authenticator.secure(self.request)
        return bool(self.request.isSecure())

    async def _admit(self, session, missing: PreviewRefused) -> None:
        router, target, request = self.router, self.target, self.request
        access = router.access
        if access.is_public(target.session_id, target.port):
            return
        grant = access.granted(target.session_id, target.port,
                               _cookie(self._header(b"cookie"), GRANT_COOKIE))
        if grant is not None:
            self.share_id = grant.share_id
            return
        authenticator = router.authenticator
        if authenticator is None:
            user = None
        else:
            headers = request.requestHeaders
            carries = headers.hasHeader(b"authorization") or (
                authenticator.user_header is not None
                and headers.hasHeader(authenticator.user_header.encode("latin-1")))
            if target.form == "host" and not carries:
                raise self._to_login()
            try:
                user = await authenticator.user_of(request)
            except AuthRefused as e:
                if e.status == 401 and _wants_page(self.channel._command,
                                                   self._header(b"accept")):
                    raise self._to_login() from None
                raise PreviewRefused(e.status, e.message, "throttled" if e.status == 429
                                     else "unauthenticated",
                                     [(b"WWW-Authenticate", b'Bearer realm="capsule"')]
                                     if e.status == 401 else ()) from None
        if session.core.user != user or session.over:
            raise missing
        if target.form == "path" and router.domain:
            # Under a preview domain, the app is at its own host: this
            # login is traded there for the host's cookie.
            ticket = access.ticket(target.session_id, target.port, user)
            host = preview_host(target.session_id, target.port, router.domain)
            rest = target.rest.decode("latin-1")
            location = (f"{router.scheme()}://{host}/{AUTH_PATH}?ticket={ticket}"
                        f"&next={quote(safe_rest(rest), safe='')}")
            if _wants_page(self.channel._command, self._header(b"accept")):
                # A page of its own that goes on, not a redirect: a browser
                # that came here from the login form's redirect would hold
                # a redirect to another origin against capsule's
                # Content-Security-Policy (form-action 'self').
                self._answer(_going_on(location))
                return
            raise PreviewRefused(303, "", "", [(b"Location", location.encode("ascii"))])

    def _to_login(self) -> PreviewRefused:
        """
        No credentials: a browser's page is sent to log in (under a preview
        domain, to capsule's origin, which sends it back with a ticket),
        anything else gets 401.
        """
        router, target = self.router, self.target
        method = self.channel._command
        if _wants_page(method, self._header(b"accept")):
            rest = target.rest.decode("latin-1")
            if target.form == "host" and router.public_url:
                location = (router.public_url + f"/preview/{target.session_id}/{target.port}"
                            + safe_rest(rest))
                return PreviewRefused(303, "", "", [(b"Location", location.encode("ascii"))])
            if target.form == "path":
                where = (router.public_url or "") + "/login?next=" + quote(
                    target.prefix + safe_rest(rest), safe="")
                return PreviewRefused(303, "", "", [(b"Location", where.encode("ascii"))])
        return PreviewRefused(401, "log in first (capsule's login, or Authorization: Bearer"
                                   " with an API token)", "unauthenticated",
                              [(b"WWW-Authenticate", b'Bearer realm="capsule"')])

    def _authorize(self, query: dict) -> None:
        """
        C{<root>/__capsule_preview_auth?share=...} (a link) or C{?ticket=...}
        (from capsule's origin): set the preview's cookie, go on to the app.
        """
        router, target = self.router, self.target
        access = router.access
        token = None
        share = (query.get("share") or [None])[0]
        ticket = (query.get("ticket") or [None])[0]
        if share:
            found = access.link(target.session_id, target.port, share)
            if found is not None:
                token = access.grant(target.session_id, target.port, share=found)
        elif ticket and target.form == "host":
            token = access.redeem(target.session_id, target.port, ticket)
        if token is None:
            router.log("preview of {session}:{port}: refused an unknown, expired or revoked"
                       " link from {client}", session=target.session_id[:8], port=target.port,
                       client=self._client())
            raise PreviewRefused(403, "this preview link is not valid: it expired, was"
                                      " revoked, or its session ended", "invalid_link")
        parts = [f"{GRANT_COOKIE}={token}", f"Path={target.prefix or '/'}", "HttpOnly",
                 "SameSite=Lax"]
        if self._secure() or router.scheme() == "https":
            parts.append("Secure")
        after = target.prefix + safe_rest((query.get("next") or ["/"])[0])
        self._answer(answer_bytes(303, None, [
            (b"Set-Cookie", "; ".join(parts).encode("ascii")),
            (b"Location", after.encode("ascii"))]))

    def _client(self) -> str:
        address = self.router.client_address
        if address is not None:
            try:
                return address(self.request)
            except Exception:
                pass
        peer = self.connection.getPeer()
        return getattr(peer, "host", "?")

    # -- answering without the app --------------------------------------------------

    def _refuse(self, refusal: PreviewRefused) -> None:
        if refusal.status >= 400:
            self.router.log("preview of {session}:{port} refused {method} from {client}:"
                            " {status} {code}: {message}",
                            session=str(self.session_id)[:8], port=self.port,
                            method=(self.channel._command or b"").decode("latin-1")[:10],
                            client=self._client(), status=refusal.status, code=refusal.code,
                            message=short_ids(refusal.message[:200]))
            body = {"error": refusal.message, "code": refusal.code}
        else:
            body = None
        self._answer(answer_bytes(refusal.status, body, refusal.headers))

    def _answer(self, data: bytes) -> None:
        """
        Answer with C{data} and close: what the client still sends is read
        and dropped for a moment (closing with it unread would reset the
        connection, and the client could lose the answer).
        """
        self._ended = True
        self._held = []
        transport = self.connection
        if transport is None or transport.transport is None:
            return
        transport.write(data)
        transport.resumeProducing()
        half_close = getattr(transport.transport, "loseWriteConnection", None)
        if half_close is None:
            transport.loseConnection()
            return
        half_close()
        self.router.reactor.callLater(2.0, self._abort)

    def _abort(self) -> None:
        connection = self.connection
        if connection is not None and connection.transport is not None:
            connection.transport.abortConnection()

    # -- the splice -------------------------------------------------------------------

    async def _connect(self, session) -> None:
        router, target = self.router, self.target
        if not session.ready:
            raise PreviewRefused(503, f"session {session.id} is still starting: try again"
                                      " shortly", "starting", [(b"Retry-After", b"2")])
        mine = router.open.setdefault(target.session_id, set())
        if len(mine) >= router.limits.per_session:
            raise PreviewRefused(429, f"session {target.session_id}'s previews have"
                                      f" {len(mine)} connections open, the most they may",
                                 "too_many_preview_connections")
        mine.add(self)
        self._counted = True
        router.watch(session)
        try:
            address = await router.address(session)
        except Exception as e:
            self._uncount()
            raise PreviewRefused(502, f"capsule could not find session {session.id}'s"
                                      f" address: {e}", "upstream_failed") from None
        if self._ended or self.connection.transport is None:
            self._uncount()
            return
        factory = Factory.forProtocol(lambda: _Upstream(self))
        factory.noisy = False
        if address is None:
            if router.no_network is None:
                self._uncount()
                raise PreviewRefused(502, f"session {session.id} has no network: previews"
                                          " need one (or the keeper's channel, which this"
                                          " capsule does not have)", "no_network")
            endpoint = await router.no_network(session, target.port)
        else:
            endpoint = TCP4ClientEndpoint(router.reactor, address, target.port,
                                          timeout=router.limits.connect_timeout)
        try:
            await endpoint.connect(factory)
        except ConnectionRefusedError:
            self._uncount()
            raise PreviewRefused(502, f"nothing listens on port {target.port} in this"
                                      " session", "nothing_listening") from None
        except ConnectTimeout:
            self._uncount()
            raise PreviewRefused(504, f"port {target.port} of this session did not answer"
                                      f" within {router.limits.connect_timeout:g} s",
                                 "upstream_timeout") from None
        except Exception as e:
            self._uncount()
            raise PreviewRefused(502, f"no connection to port {target.port} in this session:"
                                      f" {e}", "upstream_failed") from None

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            mine = self.router.open.get(self.session_id)
            if mine is not None:
                mine.discard(self)
                if not mine:
                    self.router.open.pop(self.session_id, None)

    def _head(self) -> bytes:
        request, router, target = self.request, self.router, self.target
        headers = [(name, value) for name, values in request.requestHeaders.getAllRawHeaders()
                   for value in values]
        upgrade = bool(request.getHeader(b"upgrade")) and b"upgrade" in (
            request.getHeader(b"connection") or b"").lower()
        self._upgrade = upgrade
        dropped = []
        authenticator = router.authenticator
        if authenticator is not None and authenticator.user_header:
            dropped.append(authenticator.user_header.encode("latin-1"))
        if not upgrade:
            # Without "Connection: upgrade", an Upgrade header means nothing.
            dropped.append(b"upgrade")
        host = request.getHeader(b"host")
        return forward_head(self.channel._command, target.rest or b"/", self.channel._version,
                            headers, prefix=target.prefix, client=self._client(),
                            proto="https" if self._secure() else "http",
                            host=host.decode("latin-1") if host else None, upgrade=upgrade,
                            dropped=dropped)

    def upstream_made(self, upstream: _Upstream) -> None:
        if self._ended or self.connection.transport is None:
            upstream.transport.loseConnection()
            return
        self._upstream = upstream
        connection = self.connection
        # Larger reads and writes than Twisted's 64 KiB: fewer calls and
        # pauses per byte; what a splice holds stays bounded by them.
        for transport in (connection.transport, upstream.transport):
            if hasattr(transport, "bufferSize"):
                transport.bufferSize = SPLICE_BUFFER
        # The client's connection is the splice's from now on.
        connection.wrappedProtocol = _ClientSide(self)
        connection.unregisterProducer()
        self._upstream_valve = Valve(upstream.transport)
        self._client_valve = Valve(connection)
        connection.registerProducer(self._upstream_valve, True)
        upstream.transport.registerProducer(self._client_valve, True)
        self._buckets = self.router.bucket(self.session_id, self.port)
        upstream.transport.write(self._head())
        held, self._held = self._held, []
        for data in held:
            self._to_upstream(data)
        self._splice(connection.transport, upstream.transport)
        connection.resumeProducing()
        self.router.opened("preview of {session}:{port}: {method} from {client}",
                        session=self.session_id[:8], port=self.port,
                        method=(self.channel._command or b"").decode("latin-1")[:10],
                        client=self._client())

    def client_data(self, data: bytes) -> None:
        if self._ended:
            return
        if self._upstream is None:
            self._held.append(data)
            return
        self._to_upstream(data)

    def _to_upstream(self, data: bytes) -> None:
        self._upstream.transport.write(data)
        if self._buckets is not None:
            self._throttle(self._buckets[0], len(data), self._client_valve)

    def _throttle(self, bucket: Bucket, size: int, valve: Valve) -> None:
        wait = bucket.take(size)
        if wait > 0 and "rate" not in valve.reasons:
            valve._set("rate", True)
            self.router.reactor.callLater(wait, valve._set, "rate", False)

    def upstream_data(self, data: bytes) -> None:
        if self._ended:
            return
        if not self._head_done:
            self._answer_head += data
            while not self._head_done:
                end = self._answer_head.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._answer_head) > MAX_HEAD:
                        self._answer_head = b""
                        self.close()
                    return
                head, rest = self._answer_head[:end], self._answer_head[end + 4:]
                status = head[9:12]
                if status.startswith(b"1") and status != b"101":
                    # An interim answer (100 Continue): the real one follows.
                    self.connection.write(head + b"\r\n\r\n")
                    self._answer_head = rest
                    continue
                self._head_done = True
                self._answer_head = b""
                data = answer_head(head, path_form=self.target.form == "path") + rest
                self._splice(self._upstream.transport, self.connection.transport)
        if data:
            self.connection.write(data)
            if self._buckets is not None:
                self._throttle(self._buckets[1], len(data), self._upstream_valve)

    def _splice(self, src, dst) -> None:
        """
        From now on, what C{src} reads goes to C{dst} in the kernel, when
        both are TCP sockets and no rate caps the preview.
        """
        if self._buckets is None and can_splice(src) and can_splice(dst):
            self._splicers.append(Splicer(src, dst))

    def _unsplice(self) -> None:
        for splicer in self._splicers:
            splicer.close()

    def upstream_lost(self) -> None:
        self._unsplice()
        self._uncount()
        if not self._ended:
            self._ended = True
            if self.connection.transport is not None:
                self.connection.loseConnection()

    def client_lost(self) -> None:
        self._unsplice()
        self._uncount()
        self._ended = True
        if self._upstream is not None and self._upstream.transport is not None:
            self._upstream.transport.loseConnection()

    def close(self) -> None:
        """
        End it now (its session ended, its link was revoked).
        """
        self._uncount()
        self._ended = True
        if self._upstream is not None and self._upstream.transport is not None:
            self._upstream.transport.abortConnection()
        if self.connection is not None and self.connection.transport is not None:
            self.connection.abortConnection()


__all__ = ["PreviewRouter", "PreviewLimits", "forward_head", "answer_head", "target_of"]
