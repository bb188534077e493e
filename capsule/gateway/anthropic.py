"""
The Anthropic gateway: C{<door>/anthropic/v1/...}, what a session's
C{ANTHROPIC_BASE_URL} points at.

A request carries its session's placeholder (C{Authorization: Bearer}, as
Claude Code sends C{ANTHROPIC_AUTH_TOKEN}, or C{x-api-key}); the gateway
finds the live session it belongs to (L{capsule.gateway.credentials}),
checks that the session's profile names the C{anthropic} credential, its
limits (requests at once per session, the user's budget), takes the
placeholder and the hop-by-hop headers off, puts the real key on
(C{x-api-key}), and forwards the request to the upstream (C{--anthropic-upstream},
TLS verified).  The answer streams back as it comes, each piece as it
arrives (server-sent events), with backpressure both ways; its C{usage}
fields are read on the way (L{capsule.gateway.usage}).

The request's body is in before a resource sees it (twisted.web spools it:
in memory, or a temporary file past a size, never more than the gateway's
limit: a larger one is answered 413 as soon as it is seen to be) and is
streamed from there to the upstream.

Errors are Anthropic's shape (C{{"type": "error", "error": {"type": ...,
"message": ...}}}, which Claude Code shows), plus capsule's C{code}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError, succeed
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.web.client import (Agent, BrowserLikePolicyForHTTPS, FileBodyProducer,
                                HTTPConnectionPool, PotentialDataLoss, ResponseDone,
                                ResponseFailed)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from capsule.gateway.usage import UsageReader
from capsule.web.bodies import RefusalLog
from capsule.web.http import peer_address

_log = Logger()

CREDENTIAL = "anthropic"
DEFAULT_UPSTREAM = "https://api.anthropic.com"

# Headers of one connection only (RFC 9110 7.6.1), never forwarded, with
# those that carry the placeholder and what the gateway sets itself.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection",
                        b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade"})
_NOT_FORWARDED = HOP_BY_HOP | {b"host", b"content-length", b"authorization", b"x-api-key",
                               b"accept-encoding", b"cookie", b"forwarded",
                               b"x-forwarded-for", b"x-forwarded-host",
                               b"x-forwarded-proto", b"x-real-ip"}
# Of the upstream's answer: what twisted.web sets itself, and cookies (a
# session has no business with the upstream's).
_NOT_RETURNED = HOP_BY_HOP | {b"content-length", b"set-cookie", b"date", b"server"}
METHODS = (b"GET", b"POST", b"HEAD", b"DELETE")
# The body a request without a live placeholder may send (it is refused).
SMALL_BODY = 64 * 1024


@dataclass(frozen=True)
class GatewayLimits:
    """
    @ivar per_session: requests one session may have under way at once.
    @ivar body_bytes: the most a request's body may be.
    @ivar connect_timeout: seconds to connect to the upstream.
    @ivar answer_timeout: seconds the upstream may take to begin its answer.
    @ivar idle_timeout: seconds an answer may stall between two pieces.
    """

    per_session: int = 8
    body_bytes: int = 32 * 1024 * 1024
    connect_timeout: float = 10.0
    answer_timeout: float = 600.0
    idle_timeout: float = 300.0


def anthropic_error(request, status: int, kind: str, message: str, code: str) -> bytes:
    """
    Answer C{request} with an error in Anthropic's shape (plus capsule's
    C{code}).
    """
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps({"type": "error", "error": {"type": kind, "message": message},
                       "code": code}).encode("utf-8") + b"\n"


def forwarded_headers(incoming: Headers, key: str) -> Headers:
    """
    What goes to the upstream of a session's request's headers C{incoming}:
    everything but the hop-by-hop ones (and those C{Connection} names), the
    placeholder's and the proxies'; the real key as C{x-api-key}; answers
    not compressed (their usage is read on the way).
    """
    named = set()
    for value in incoming.getRawHeaders(b"connection", []):
        named.update(part.strip().lower() for part in value.split(b","))
    out = Headers()
    for name, values in incoming.getAllRawHeaders():
        lower = name.lower()
        if lower in _NOT_FORWARDED or lower in named:
            continue
        out.setRawHeaders(name, values)
    out.setRawHeaders(b"x-api-key", [key.encode("utf-8")])
    out.setRawHeaders(b"accept-encoding", [b"identity"])
    return out


def placeholder_of(request) -> str | None:
    """
    The placeholder C{request} carries: C{Authorization: Bearer ...} or
    C{x-api-key}.
    """
    for value in request.requestHeaders.getRawHeaders(b"authorization", []):
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            return token.strip().decode("ascii", "replace")
    values = request.requestHeaders.getRawHeaders(b"x-api-key", [])
    if values and values[0].strip():
        return values[0].strip().decode("ascii", "replace")
    return None


def no_delay(transport) -> None:
    """
    Send each write at once (TCP_NODELAY) on C{transport}, or the TCP
    transport under it (TLS): an event of a stream must not wait for the
    acknowledgement of the one before.
    """
    for _ in range(3):
        if transport is None:
            return
        set_no_delay = getattr(transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:
                pass
            return
        transport = getattr(transport, "transport", None)


class _NoDelayEndpoint:
    def __init__(self, endpoint) -> None:
        self._endpoint = endpoint

    def connect(self, factory):
        def connected(protocol):
            no_delay(protocol.transport)
            return protocol
        return self._endpoint.connect(factory).addCallback(connected)


class _Endpoints:
    """
    The Agent's connections to the upstream: TCP (TLS for https, the
    certificate verified against the system's roots), without Nagle's delay.
    """

    def __init__(self, reactor, connect_timeout: float) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._tls = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri):
        endpoint = HostnameEndpoint(self._reactor, uri.host, uri.port, timeout=self._timeout)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
        return _NoDelayEndpoint(endpoint)


@implementer(IBodyProducer)
class _BytesProducer:
    """
    A small body, written at once.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer):
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


class _Discard(Protocol):
    """
    An answer nobody takes (its session went away): stop it.
    """

    def connectionMade(self) -> None:
        self.transport.stopProducing()


class _StreamBack(Protocol):
    """
    Passes the upstream's answer to the session's request piece by piece:
    the upstream is paused while the session's connection is full (the
    request's producer), the usage read on the way.
    """

    def __init__(self, request, reader, done, clock, idle_timeout: float) -> None:
        self._request = request
        self._reader = reader
        self._done = done
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._idle = None
        self._stopped = False

    def connectionMade(self) -> None:
        self._request.registerProducer(self.transport, True)
        self._arm()

    def _arm(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._idle_timeout)
        else:
            self._idle = self._clock.callLater(self._idle_timeout, self._stalled)

    def _stalled(self) -> None:
        _log.warn("an answer of Anthropic's API to {peer} stalled for {seconds:g} s: cut off",
                  peer=peer_address(self._request), seconds=self._idle_timeout)
        self.stop()

    def stop(self) -> None:
        """
        The session went away (or the answer stalled): stop reading it.
        """
        if not self._stopped:
            self._stopped = True
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        self._arm()
        self._reader.feed(data)
        if not self._stopped:
            self._request.write(data)

    def connectionLost(self, reason) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._done(reason.check(ResponseDone, PotentialDataLoss) is not None and not self._stopped)


class AnthropicGateway(Resource):
    """
    C{/anthropic/}: see the module's docstring.

    @param store: the placeholders (L{capsule.gateway.credentials.PlaceholderStore}).
    @param keys: the real keys (L{capsule.gateway.credentials.Keys}).
    @param sessions: the live sessions by id (the manager's C{sessions}).
    @param usage: the counts and the budget (L{capsule.gateway.usage.Usage}).
    @param upstream: the API's base URL (C{https://api.anthropic.com}).
    @param agent: the HTTP client (default: a twisted Agent with a
        persistent pool, TLS verified).
    @param profile_of: C{profile_of(session)} is its profile (default: its
        C{settings}).
    """

    isLeaf = True

    def __init__(self, reactor, store, keys, sessions, usage, upstream: str = DEFAULT_UPSTREAM,
                 limits: GatewayLimits = GatewayLimits(), agent=None,
                 profile_of=None) -> None:
        super().__init__()
        self._profile_of = profile_of or (lambda session: session.settings)
        self._reactor = reactor
        self._store = store
        self._keys = keys
        self._sessions = sessions
        self._usage = usage
        self._upstream = upstream.rstrip("/").encode("ascii")
        self._upstream_shown = urlsplit(upstream).netloc or upstream
        self.limits = limits
        if agent is None:
            pool = HTTPConnectionPool(reactor, persistent=True)
            pool.maxPersistentPerHost = 16
            agent = Agent.usingEndpointFactory(
                reactor, _Endpoints(reactor, limits.connect_timeout), pool=pool)
        self._agent = agent
        self._under_way: dict[str, int] = {}
        self._refusal_log = RefusalLog(reactor, log=_log)

    def body_limit(self, request, length) -> int:
        """
        How large a request's body may be (asked before it is read): the
        limit for a live session's placeholder, else only what an error
        needs.
        """
        token = placeholder_of(request)
        if token is not None and self._store.session_for(token) is not None:
            return self.limits.body_bytes
        return SMALL_BODY

    def _refuse(self, request, status: int, kind: str, message: str, code: str) -> bytes:
        self._usage.refused(code)
        self._refusal_log("the Anthropic gateway refused {method} {path} from {peer}: {status}"
                          " {code}", method=request.method.decode("ascii", "replace")[:10],
                          path=request.path.decode("ascii", "replace")[:100],
                          peer=peer_address(request), status=status, code=code)
        return anthropic_error(request, status, kind, message, code)

    def render(self, request):
        if request.method not in METHODS:
            request.setHeader(b"allow", b", ".join(METHODS))
            return self._refuse(request, 405, "invalid_request_error",
                                "capsule's Anthropic gateway takes"
                                f" {b', '.join(METHODS).decode('ascii')}",
                                "method_not_allowed")
        token = placeholder_of(request)
        session_id = self._store.session_for(token) if token is not None else None
        session = self._sessions.get(session_id) if session_id is not None else None
        if session is None:
            said = ("no placeholder (Authorization: Bearer, or x-api-key)" if token is None
                    else "a placeholder of no live session")
            return self._refuse(
                request, 401, "authentication_error",
                f"capsule's Anthropic gateway got {said}: only a session of capsule, with the"
                " ANTHROPIC_AUTH_TOKEN capsule gave it, may use it; a session's placeholder"
                " ends with the session", "placeholder_refused")
        settings = self._profile_of(session)
        if settings is None or CREDENTIAL not in settings.credentials:
            return self._refuse(
                request, 403, "permission_error",
                f"this session's profile ({session.profile}) does not name the anthropic"
                " credential (credentials = [\"anthropic\"])", "credential_not_granted")
        key = self._keys.get(CREDENTIAL)
        if key is None:
            return self._refuse(
                request, 503, "api_error",
                "capsule has no Anthropic key: an operator sets ANTHROPIC_API_KEY in"
                " capsule's environment or its --secrets-file", "no_key")
        if not request.postpath or request.postpath[0] != b"v1":
            return self._refuse(request, 404, "not_found_error",
                                "capsule's Anthropic gateway serves /anthropic/v1/...",
                                "not_found")
        user = session.core.user
        refusal = self._usage.refusal(user)
        if refusal is not None:
            return self._refuse(request, 429, "rate_limit_error", refusal, "budget_spent")
        under_way = self._under_way.get(session_id, 0)
        if under_way >= self.limits.per_session:
            return self._refuse(
                request, 429, "rate_limit_error",
                f"this session has {under_way} requests to Anthropic's API under way, the most"
                " it may have at once: wait for one to end", "too_many_requests")
        self._under_way[session_id] = under_way + 1
        released = []

        def release(_=None):
            if not released:
                released.append(True)
                left = self._under_way.get(session_id, 1) - 1
                if left > 0:
                    self._under_way[session_id] = left
                else:
                    self._under_way.pop(session_id, None)
        request.notifyFinish().addBoth(release)
        self._usage.requested(user, session_id)
        self._forward(request, key, user, session_id)
        return NOT_DONE_YET

    def _forward(self, request, key: str, user, session_id: str) -> None:
        # The path after /anthropic, and the query as it came.
        rest = b"/" + b"/".join(request.postpath)
        query = request.uri.partition(b"?")[2]
        url = self._upstream + rest + (b"?" + query if query else b"")
        content = request.content
        content.seek(0, 2)
        length = content.tell()
        content.seek(0)
        if length <= SMALL_BODY and (length or request.method == b"POST"):
            # Written with the head, in the same turn: no wait for a
            # cooperator, and one segment on the wire.
            body = _BytesProducer(content.read())
        elif length:
            body = FileBodyProducer(content, readSize=65536)
        else:
            body = None
        d = self._agent.request(request.method, url,
                                forwarded_headers(request.requestHeaders, key), body)
        timeout = self._reactor.callLater(self.limits.answer_timeout, d.cancel)
        state = {"stream": None, "gone": False}

        def gone(_):
            state["gone"] = True
            if state["stream"] is not None:
                state["stream"].stop()
            elif not d.called:
                d.cancel()
        request.notifyFinish().addErrback(gone)

        def answered(response):
            if timeout.active():
                timeout.cancel()
            if state["gone"]:
                response.deliverBody(_Discard())
                return
            request.setResponseCode(response.code, response.phrase)
            for name, values in response.headers.getAllRawHeaders():
                if name.lower() not in _NOT_RETURNED:
                    request.responseHeaders.setRawHeaders(name, values)
            content_type = response.headers.getRawHeaders(b"content-type", [b""])[0]
            reader = UsageReader(content_type.decode("latin-1"))
            if request.method == b"HEAD" or response.code in (204, 304):
                response.deliverBody(Protocol())
                request.finish()
                return

            def done(complete: bool) -> None:
                self._usage.used(user, session_id, reader.finish())
                if state["gone"]:
                    return
                request.unregisterProducer()
                if complete:
                    request.finish()
                else:
                    # Cut off: the session must not take a truncated answer
                    # for a whole one.
                    request.loseConnection()
            # The head goes at once: the session sees the answer begin.
            request.write(b"")
            state["stream"] = stream = _StreamBack(request, reader, done, self._reactor,
                                                   self.limits.idle_timeout)
            response.deliverBody(stream)

        def failed(failure):
            if timeout.active():
                timeout.cancel()
            if state["gone"]:
                return
            if failure.check(CancelledError):
                status, message, code = (
                    504, f"Anthropic's API ({self._upstream_shown}) did not begin its answer"
                         f" within {self.limits.answer_timeout:g} s", "upstream_timeout")
            elif failure.check(TimeoutError):
                status, message, code = (
                    504, f"capsule could not connect to Anthropic's API"
                         f" ({self._upstream_shown}) within {self.limits.connect_timeout:g} s",
                    "upstream_timeout")
            elif failure.check(ConnectError, DNSLookupError, ResponseFailed):
                status, message, code = (
                    502, f"capsule could not reach Anthropic's API ({self._upstream_shown}):"
                         f" {_reason(failure)}", "upstream_unreachable")
            else:
                _log.failure("forwarding a request to Anthropic's API failed", failure)
                status, message, code = (502, "capsule's Anthropic gateway failed: see"
                                              " capsule's log", "gateway_failed")
            _log.warn("the Anthropic gateway could not forward a request of session"
                      " {session_id}: {message}", session_id=session_id[:8], message=message)
            self._usage.refused(code)
            request.write(anthropic_error(request, status, "api_error", message, code))
            request.finish()
        def broken(failure):
            _log.failure("the Anthropic gateway failed", failure)
            if not state["gone"] and not request.finished:
                if request.startedWriting:
                    request.loseConnection()
                else:
                    request.write(anthropic_error(
                        request, 502, "api_error", "capsule's Anthropic gateway failed: see"
                        " capsule's log", "gateway_failed"))
                    request.finish()
        d.addCallbacks(answered, failed)
        d.addErrback(broken)


def _reason(failure) -> str:
    if failure.check(ResponseFailed):
        reasons = getattr(failure.value, "reasons", None) or []
        return "; ".join(r.getErrorMessage() for r in reasons)[:300] or "the connection failed"
    return failure.getErrorMessage()[:300]
