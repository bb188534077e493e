"""
The HTTP side: the terminal page, C{/ws}, C{/health}, C{/metrics} and the
export.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, _GenericHTTPChannelProtocol, combinedLogFormatter
from twisted.web.server import Request, Site

from capsule.sessions.call_gate import CallGate
from capsule.sessions.drain import Drain
from capsule.sessions.service import SessionService
from capsule.web.admin import AdminAccess, AdminMount, AdminResource
from capsule.web.bodies import BodyBudget, BodyRefused, RefusalLog, default_spool, \
    BODIES_PER_ADDRESS
from capsule.web.connections import (Connection, ConnectionLimits, Connections, CountedChannel,
                                     CountedWebSocketResource)
from capsule.web.api import (DOCKER_CALLS_PER_CALLER, ApiResource, ProfilesResource, SessionApi,
                             SessionsResource)
from capsule.web.exec import EXEC_WRITE_TIMEOUT
from capsule.web.keep_api import SnapshotsResource, body_limit as keep_body_limit
from capsule.web.upload import UPLOAD_MAX_BYTES
from capsule.auth.gate import Authenticator
from capsule.web.export import ExportLimits, ExportResource
from capsule.web.headers import GuardResource, HostPolicy
from capsule.web.http import peer_address
from capsule.web.login import AuthGate, LoginResource, LogoutResource
from capsule.ops.logformat import short_ids
from capsule.ops.metrics import Metrics, MetricsResource
from capsule.web.openapi import OpenApiResource
from capsule.web.ports import PortAddresses
from capsule.sessions.manager import SessionManager
from capsule.web.static import StaticFiles
from capsule.web.preview import PreviewLimits, PreviewRouter
from capsule.core.preview_access import PreviewAccess
from capsule.core.keeper import DIRECT_PORT
from capsule.web.health import HealthResource
from capsule.web.websocket_factory import CapsuleServerFactory

_log = Logger()



def default_www() -> str:
    """
    The web page's directory: the source tree's C{www/} when capsule runs
    from a checkout, else the one installed under C{sys.prefix}.
    """
    here = Path(__file__).resolve().parents[2] / "www"
    if (here / "index.html").exists():
        return str(here)
    import sys
    return os.path.join(sys.prefix, "share", "capsule", "www")


# Bytes of request body a path accepts unless its site says otherwise:
# none, since every resource of capsule answers GET only.
MAX_BODY = 0

# Seconds a refused client may go on sending (discarded) before its
# connection is cut, so that it can read the 413 rather than a reset.
REFUSED_LINGER = 2.0

# Bodies up to this size are held in memory, larger ones in a temporary file.
IN_MEMORY_BODY = 100_000

_PHRASES = {413: b"Content Too Large"}


class LimitedRequest(Request):
    """
    A request whose body is decided from its headers, before any of it is
    read (L{CapsuleSite.body_decision}): how large it may be, and whether
    it may come at all.  The decision may take a while (a password checked
    on a thread): reading stops meanwhile, and C{Expect: 100-continue}
    waits for it.  A refused body (413 for one over its path's limit, as
    soon as a chunked one passes it; or whatever the decision said: 401,
    404, 429, 503...) is answered at once, nothing of it is kept, in memory
    or in a temporary file, and the request never reaches a resource.

    @ivar declared_method, declared_length: the method and the body's
        length (C{None}: chunked) as the headers say, for the decision.
    """

    refused = False
    declared_method = b""
    declared_length: int | None = 0
    _deciding = None
    _stashed = None
    _expected = None
    _reserved = 0
    _body_size = 0
    _body_limit = MAX_BODY

    def on_done(self, release) -> None:
        """
        Call C{release()} once, when the request ends: answered, refused,
        or its connection lost.
        """
        releases = self.__dict__.setdefault("_releases", [])
        if not releases:
            self.notifyFinish().addBoth(lambda _: self._release())
        releases.append(release)

    def _release(self) -> None:
        releases = self.__dict__.get("_releases", [])
        while releases:
            try:
                releases.pop()()
            except Exception:
                _log.failure("releasing what a request held failed")

    def gotLength(self, length):
        site = getattr(self.channel, "site", None)
        self.declared_method = getattr(self.channel, "_command", b"")
        self.declared_length = length
        self._body_size = 0
        if site is None:
            self._accept(MAX_BODY, ())
            return
        # The path is known to the channel only, until the body is in.
        path = getattr(self.channel, "_path", b"")
        try:
            decision = site.body_decision(path, self, length)
        except BodyRefused as e:
            self._refuse(e)
            return
        if not isinstance(decision, Deferred):
            self._accept(decision, ())
            return
        box: list = []
        decision.addBoth(box.append)
        if box:
            self._decided(box[0], ())
            return
        # Not decided yet: read nothing more until it is, keeping what was
        # read already, and say "100 Continue" (if asked) only then.
        self._deciding = []
        self._expected = self.requestHeaders.getRawHeaders(b"expect")
        self.requestHeaders.removeHeader(b"expect")
        self.channel.transport.pauseProducing()

        def decided(_):
            held, self._deciding = self._deciding, None
            channel = self.channel
            if channel is not None and not getattr(channel, "_waitingForTransport", False):
                channel.transport.resumeProducing()
            self._decided(box[0], held)
        decision.addCallback(decided)

    def _decided(self, result, held) -> None:
        if self.channel is None or getattr(self, "_disconnected", False):
            # The client went away meanwhile.
            self._release()
            return
        if isinstance(result, Failure):
            if result.check(BodyRefused):
                self._refuse(result.value)
                return
            _log.failure("deciding on a request's body failed", result)
            self._refuse(BodyRefused(500, "capsule could not decide on this request: see its"
                                          " log", "internal_error"))
            return
        self._accept(result, held)

    def _accept(self, limit: int, held) -> None:
        self._body_limit = limit
        length = self.declared_length
        if length is not None and length > limit:
            self._refuse(self._too_large(length))
            return
        site = getattr(self.channel, "site", None)
        budget = getattr(site, "bodies", None)
        if length and budget is not None:
            try:
                budget.reserve(length)
            except BodyRefused as e:
                self._refuse(e)
                return
            self._held_by(budget, length)
        if length is None and limit > IN_MEMORY_BODY:
            # A chunked body that may be large goes to disk, as a large
            # declared one does.
            self.content = tempfile.TemporaryFile()
        elif length is None or limit <= IN_MEMORY_BODY:
            self.content = io.BytesIO()
        else:
            super().gotLength(length)
        if self._expected and self._expected[0].lower() == b"100-continue" \
                and getattr(self.channel, "_version", None) == b"HTTP/1.1":
            self.channel.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        for data in held:
            self._take(data)
            if self.refused:
                return
        stashed, self._stashed = self._stashed, None
        if stashed is not None:
            self._received()
            super().requestReceived(*stashed)

    def _held_by(self, budget: BodyBudget, size: int) -> None:
        """
        C{size} more bytes of this body are held in C{budget}, until the
        request ends.
        """
        if not self._reserved:
            def unreserve():
                reserved, self._reserved = self._reserved, 0
                budget.release(reserved)
            self.on_done(unreserve)
        self._reserved += size

    def handleContentChunk(self, data):
        if self.refused:
            return
        if self._deciding is not None:
            self._deciding.append(data)
            return
        self._take(data)

    def _take(self, data: bytes) -> None:
        self._body_size += len(data)
        if self._body_size > self._body_limit:
            self._refuse(self._too_large(None))
            return
        if self.declared_length is None:
            budget = getattr(getattr(self.channel, "site", None), "bodies", None)
            if budget is not None:
                try:
                    budget.reserve(len(data))
                except BodyRefused as e:
                    self._refuse(e)
                    return
                self._held_by(budget, len(data))
        self.content.write(data)

    def requestReceived(self, command, path, version):
        if self.refused:
            return
        if self._deciding is not None:
            self._stashed = (command, path, version)
            return
        self._received()
        super().requestReceived(command, path, version)

    def _received(self) -> None:
        """
        The body is in: it is no longer one being received.
        """
        done = self.__dict__.pop("_receiving_done", None)
        if done is not None:
            done()

    def receiving(self, done) -> None:
        """
        Call C{done()} once, when the body is in or the request ends.
        """
        once = []

        def call():
            if not once:
                once.append(True)
                done()
        self._receiving_done = call
        self.on_done(call)

    def _too_large(self, length) -> BodyRefused:
        limit = self._body_limit
        return BodyRefused(413, f"this request may have a body of at most {limit} bytes",
                           "body_too_large", limit=limit)

    def _refuse(self, refusal: BodyRefused) -> None:
        self.refused = True
        self._deciding = None
        self.content = io.BytesIO()
        # No "100 Continue" after the refusal.
        self.requestHeaders.removeHeader(b"expect")
        channel = self.channel
        site = getattr(channel, "site", None)
        path = getattr(channel, "_path", b"").decode("ascii", "replace")[:200]
        log = getattr(site, "refusal_log", None) or RefusalLog(log=_log)
        length = self.declared_length
        if refusal.code == "body_too_large":
            said = "a body" if length is None else f"a body of {length} bytes"
            log("refused {said} for {path} (limit {limit} bytes) from {peer}", said=said,
                path=short_ids(path), limit=self._body_limit, peer=peer_address(self))
        else:
            log("refused a body for {path} from {peer}: {status} {code}: {message}",
                path=short_ids(path), peer=peer_address(self), status=refusal.status,
                code=refusal.code, message=short_ids(refusal.message[:200]))
        self._release()
        body = json.dumps({"error": refusal.message, "code": refusal.code,
                           **refusal.extra}).encode("utf-8")
        head = [b"HTTP/1.1 %d %s" % (refusal.status, _PHRASES.get(refusal.status)
                                     or RESPONSES.get(refusal.status, b"Error")),
                b"Content-Type: application/json", b"Cache-Control: no-store",
                b"Content-Length: %d" % len(body), b"Connection: close"]
        if refusal.retry_after is not None:
            head.append(b"Retry-After: %d" % refusal.retry_after)
        head += [name + b": " + value for name, value in refusal.headers.items()]
        transport = channel.transport
        transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        channel.persistent = False
        half_close = getattr(transport, "loseWriteConnection", None)
        reactor = getattr(site, "reactor", None)
        if half_close is None or reactor is None:
            transport.loseConnection()
            return
        # Answer, then read and drop what the client still sends for a
        # moment: closing with its data unread would reset the connection,
        # and the client could lose the answer.
        half_close()
        reactor.callLater(REFUSED_LINGER, transport.abortConnection)


def _counted_channel(site):
    # As Twisted's own factory of channels, with a channel that tells its
    # Connection where its requests are.
    return _GenericHTTPChannelProtocol(CountedChannel())


class CapsuleSite(Site):
    """
    capsule's L{Site}: its requests are L{LimitedRequest}s, and its
    connections are counted and timed (L{capsule.web.connections}).

    @ivar body_limits: bytes of body accepted by path; any other path
        accepts L{MAX_BODY}.
    @ivar body_rules: callables C{(path, request)} giving the limit of a
        path they know, else C{None} (the API's is one), asked first; a
        rule may answer with a L{Deferred} of the limit, or fail with
        L{BodyRefused} (the headers are in: C{request.declared_method},
        C{request.declared_length}; the body is not).
    @ivar bodies: what request bodies may hold at once (L{BodyBudget}), or
        C{None}: no bounds but the paths' limits.
    @ivar client_address: the address a request's body counts against.
    """

    requestFactory = LimitedRequest
    protocol = _counted_channel
    displayTracebacks = False
    # No "Starting factory" / "Stopping factory" lines.
    noisy = False

    def __init__(self, resource, *args, body_limits: dict[bytes, int] | None = None,
                 body_rules=(), websocket_factory=None, exports=None, session_api=None,
                 drain=None, metrics=None, bodies: BodyBudget | None = None,
                 client_address=peer_address,
                 connection_limits: ConnectionLimits = ConnectionLimits(),
                 access_log: bool = False, previews=None, **kwargs) -> None:
        super().__init__(resource, *args, **kwargs)
        # What takes preview requests out of the site as their headers come
        # (capsule.web.preview.PreviewRouter), or None: no previews.
        self.previews = previews
        # Every request's access line, else only L{logged_by_default}'s.
        self.access_log = access_log
        # The open connections, by client address.
        self.connections = Connections(connection_limits, self.reactor)
        self.body_limits: dict[bytes, int] = dict(body_limits or {})
        # Callables giving the limit of a path they know (else None).
        self.body_rules: list = list(body_rules)
        self.bodies = bodies
        self.client_address = client_address
        self.refusal_log = RefusalLog(self.reactor, _log)
        # The parts of the site that its server (and tests) reach.
        self.websocket_factory = websocket_factory
        self.exports = exports
        self.session_api = session_api
        self.drain = drain
        self.metrics = metrics

    def buildProtocol(self, addr):
        channel = super().buildProtocol(addr)
        if channel is None or addr is None:
            # A channel made by hand (no address: in tests) is not counted.
            return channel
        return Connection(self.connections, channel)

    def log(self, request) -> None:
        if self.access_log or logged_by_default(request):
            super().log(request)

    def divert(self, channel, request):
        """
        Whether C{request}, whose headers are in, leaves the site (a
        preview's): the callable its channel's further bytes go to, else
        C{None}.
        """
        if self.previews is None:
            return None
        return self.previews.divert(channel, request)

    def body_limit(self, path: bytes, request=None):
        """
        The limit of C{path}'s body: bytes, or a L{Deferred} of them.
        """
        # A rule may look at the request's headers (they are in).
        for rule in self.body_rules:
            limit = rule(path, request)
            if limit is not None:
                return limit
        return self.body_limits.get(path.split(b"?", 1)[0], MAX_BODY)

    def body_decision(self, path: bytes, request, length: int | None):
        """
        Whether C{request}, whose headers are in, may send its body of
        C{length} bytes (C{None}: chunked), and how large it may be: its
        limit, or a L{Deferred} of it.

        @raise BodyRefused: when its client sends too many bodies already.
        """
        if length != 0 and self.bodies is not None:
            address = self.client_address(request)
            self.bodies.enter(address)
            request.receiving(lambda: self.bodies.leave(address))
        return self.body_limit(path, request)


# The first path segments of what the access log tells by default: the
# session API, the WebSocket, logins. Other paths (the page's files,
# /health, /metrics) get a line only when they fail, or with --access-log.
LOGGED_PATHS = {b"api", b"ws", b"login", b"logout"}


def logged_by_default(request) -> bool:
    """
    Whether C{request} gets an access line without C{--access-log}: one
    that is not a C{GET} or C{HEAD}, failed (4xx, 5xx), or is about
    sessions, users or the admin API rather than a file of the page.
    """
    if request.method not in (b"GET", b"HEAD") or (request.code or 200) >= 400:
        return True
    first = (request.path or b"/").lstrip(b"/").split(b"/", 1)[0].split(b"?", 1)[0]
    return first in LOGGED_PATHS


def access_log_line(timestamp, request) -> str:
    """
    The access log's line of C{request} (the combined log format), with
    session ids in paths and referrers cut to their first 8 characters and
    watch tokens left out.
    """
    return _WATCH_TOKEN.sub(r"\1...", short_ids(combinedLogFormatter(timestamp, request)))


# A watch link's token in a URL (/ws?watch=...): it is a credential, never logged.
_WATCH_TOKEN = re.compile(r"([?&]watch=)[^&\s\"]+")


# Paths served to anyone: the health check, the login page and its assets,
# and logout (whose cookie may have expired already). /ws checks its user
# itself, at the upgrade (a spectator's token instead); /metrics its peer or
# token; /watch/ is the page for spectators, whose token is its credential.
OPEN_PATHS = {b"health", b"login", b"logout", b"login.css", b"favicon.svg", b"ws",
              b"metrics", b"watch"}
# Bytes of body the login form may have.
LOGIN_MAX_BODY = 8192


def make_site(manager: SessionManager, docker, reactor, www: str, *,
              export_limits: ExportLimits = ExportLimits(), client_address=peer_address,
              authenticator: Authenticator | None = None, host_policy: HostPolicy | None = None,
              admission=None, drain: Drain | None = None, start_at_open: bool = False,
              metrics: Metrics | None = None, metrics_token: str | None = None,
              admin_token: str | None = None, admin_users=(), admin_loopback: bool | None = None,
              public_url: str | None = None,
              upload_max_bytes: int = UPLOAD_MAX_BYTES, spool_max_bytes: int | None = None,
              bodies_per_address: int = BODIES_PER_ADDRESS,
              answer_write_timeout: float = EXEC_WRITE_TIMEOUT,
              docker_calls_per_caller: int = DOCKER_CALLS_PER_CALLER, access_log: bool = False,
              connection_limits: ConnectionLimits = ConnectionLimits(),
              spectators=None, firewall=None, admin_usage=None, admin_session_facts=None,
              preview_domain: str | None = None,
              preview_limits: PreviewLimits = PreviewLimits(), preview_access=None,
              own_ports=(), preview_no_network=None, keeping=None,
              **websocket_options) -> CapsuleSite:
    """
    @param export_limits: how many exports run, and what one may cost.
    @param authenticator: who may use what (L{capsule.auth.gate}); C{None}: anyone
        who reaches the port (loopback only, or C{--insecure-no-auth}).
    @param client_address: the address a request counts against, for the
        per-client limits (by default the socket's peer).
    @param host_policy: the names and origins capsule answers to; without
        one, C{Host} is not checked (a site built bare, in tests).
    @param admission: what decides on new sessions
        (L{capsule.core.admission.AdmissionControl}); C{None}: no limits.
    @param drain: the server's L{Drain} (by default a new one).
    @param start_at_open: make a new session as its WebSocket opens, rather
        than at its first frame.
    @param metrics: what C{/metrics} serves, already watching C{manager}
        (by default new ones, made to watch it).
    @param metrics_token: the bearer token that reads C{/metrics} from
        anywhere (C{--metrics-token}); loopback peers need none.
    @param admin_token, admin_users: who may use C{/api/admin/} besides
        loopback (L{capsule.web.admin}).
    @param admin_loopback: whether loopback may use C{/api/admin/} without
        the token (by default: without users only).
    @param public_url: the address users open (C{--public-url}): the API's
        session URLs are absolute under it.
    @param upload_max_bytes: bytes of archive an upload may send.
    @param spool_max_bytes: bytes of request bodies capsule holds at once
        (by default L{default_spool} of C{upload_max_bytes}).
    @param bodies_per_address: bodies one client address may be sending at
        once.
    @param answer_write_timeout: seconds an exec's answer waits for a client
        that reads none of it, before it is dropped.
    @param docker_calls_per_caller: Docker calls one user (without users: one
        client address) may have under way at once for its execs and
        uploads; four times as many more wait, the rest get 429.
    @param connection_limits: connections per client address and in all,
        and how long a request's headers may take.
    @param spectators: the share links and who watches through them
        (L{capsule.sessions.spectators}, an observer of C{manager});
        C{None}: sessions cannot be shared.
    @param firewall: what fences the session networks
        (L{capsule.engine.firewall.Firewall}): C{/health} says its state.
    @param preview_domain: C{--preview-domain} (previews at
        C{<port>-<id>.<domain>}), or C{None}: previews at C{/preview/<id>/<port>/}.
    @param preview_limits: what previews may hold (L{PreviewLimits}).
    @param preview_access: who may open previews (L{PreviewAccess}; by
        default a new one).
    @param own_ports: capsule's ports in a session (its door's), which
        have no preview, besides the keeper's.
    @param preview_no_network: how a session without a network's ports are
        reached (L{PreviewRouter}'s C{no_network}), or C{None}.
    @param keeping: the kept sessions and snapshots
        (L{capsule.sessions.keeping.Keeping}; by default the manager's, if it
        has one; C{None}: sessions are never kept).
    @param access_log: an access line for every request (C{--access-log});
        else only for those L{logged_by_default}.
    @param websocket_options: passed on to L{CapsuleServerFactory}.
    """
    root = StaticFiles(www)
    root.indexNames = ["index.html"]
    if host_policy is None:
        host_policy = HostPolicy(allowed_origins=websocket_options.get("allowed_origins", ()),
                                 check_hosts=False)
    if drain is None:
        drain = Drain(manager, reactor)
    if metrics is None:
        # The manager's, which it tells what happens to sessions; a manager
        # that counts nothing gets metrics of the site's alone.
        metrics = manager.metrics if isinstance(manager.metrics, Metrics) else Metrics()
        metrics.watch(manager)
    if keeping is None:
        keeping = getattr(manager, "keeping", None)
    sessions = SessionService(manager, admission, drain, keeping)
    previews = PreviewRouter(reactor, manager, docker,
                             preview_access or PreviewAccess(reactor),
                             authenticator=authenticator, client_address=client_address,
                             domain=preview_domain, public_url=public_url,
                             host_policy=host_policy, limits=preview_limits,
                             own_ports=(DIRECT_PORT, *own_ports),
                             no_network=preview_no_network)
    port_addresses = PortAddresses(public_url, preview_domain,
                                   is_public=previews.access.is_public)
    factory = CapsuleServerFactory(manager, reactor, host_policy=host_policy,
                                   sessions=sessions, authenticator=authenticator,
                                   start_at_open=start_at_open, spectators=spectators,
                                   port_addresses=port_addresses, **websocket_options)
    root.putChild(b"ws", CountedWebSocketResource(factory))
    root.putChild(b"health", HealthResource(manager, docker, reactor, drain,
                                                 firewall))
    root.putChild(b"metrics", MetricsResource(metrics, metrics_token))
    api = ApiResource()
    exports = ExportResource(manager, docker, reactor, limits=export_limits,
                             client_address=client_address, keeping=keeping)
    api.putChild(b"export", exports)
    session_api = SessionApi(manager, docker, reactor, sessions, authenticator=authenticator,
                             public_url=public_url,
                             upload_max_bytes=upload_max_bytes,
                             answer_timeout=answer_write_timeout,
                             exporting=exports.exporting, client_address=client_address,
                             docker_calls=CallGate(docker_calls_per_caller,
                                                   4 * docker_calls_per_caller),
                             spectators=spectators, previews=previews,
                             port_addresses=port_addresses)
    api.putChild(b"sessions", SessionsResource(session_api))
    api.putChild(b"profiles", ProfilesResource(session_api))
    api.putChild(b"snapshots", SnapshotsResource(session_api.keep))
    api.putChild(b"openapi.json", OpenApiResource())
    root.putChild(b"api", api)
    if spectators is not None:
        # The page again, for spectators, who need no login: its files hold
        # no secret (the token is in the URL's fragment, read by the page).
        root.putChild(b"watch", StaticFiles(www, cache=root.cache))
    top = root
    body_limits = {}
    if authenticator is not None:
        root.putChild(b"login", LoginResource(authenticator, os.path.join(www, "login.html")))
        root.putChild(b"logout", LogoutResource(authenticator))
        top = AuthGate(root, authenticator, OPEN_PATHS)
        body_limits[b"/login"] = LOGIN_MAX_BODY
    top = AdminMount(top, AdminResource(manager, drain, AdminAccess(
        admin_token, admin_users, authenticator, admin_loopback), reactor,
        usage=admin_usage, session_facts=admin_session_facts, keeping=keeping))
    return CapsuleSite(GuardResource(top, host_policy), reactor=reactor,
                       logFormatter=access_log_line, body_limits=body_limits,
                       body_rules=[session_api.body_limit, keep_body_limit],
                       websocket_factory=factory,
                       exports=exports, session_api=session_api, drain=drain,
                       metrics=metrics, client_address=client_address,
                       bodies=BodyBudget(default_spool(upload_max_bytes)
                                         if spool_max_bytes is None else spool_max_bytes,
                                         bodies_per_address),
                       connection_limits=connection_limits, access_log=access_log,
                       previews=previews)
