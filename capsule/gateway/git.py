"""
The git gateway: C{git clone}/C{fetch}/C{push} of C{https://github.com}
from a session, with a GitHub token that never enters its container.

A session of a profile that names the C{github} credential gets git's
configuration through its environment only (L{git_environment}: no file in
the container): C{url.<door>/git/github.com/.insteadOf https://github.com/}
(and C{git@github.com:}), so that git asks capsule's session door instead
of GitHub, and C{http.<door>/git/.extraHeader} carrying the session's
placeholder in C{X-Capsule-Session} (the credential gateway's:
L{capsule.gateway.credentials.PlaceholderStore}, the same one as its
C{ANTHROPIC_AUTH_TOKEN}).  A clone's C{.git/config} keeps the
original C{https://github.com/...} URL: git rewrites it on each use, and
writes nothing of the door or the placeholder into the workspace.

The gateway (L{GitGateway}, at C{/git/} of the door's site) checks the
placeholder, allows git's smart-HTTP requests only (C{info/refs?service=}
C{git-upload-pack}/C{git-receive-pack}, C{POST git-upload-pack},
C{POST git-receive-pack}) of C{github.com/<owner>/<repo>}, puts
C{Authorization: Basic base64(x-access-token:<token>)} on them (GitHub's
form for a token) and forwards them to the upstream over TLS; the answer
streams back as it comes, the upstream read no faster than the session
takes it.

A refusal is a C{text/plain} sentence with status 403 (or 404, 413, 429,
502, 504): git prints such a body as C{remote: ...}.  Never 401: git would
then ask the terminal for a user name and password, which cannot help.

The token is the operator's (C{GITHUB_TOKEN} in capsule's environment or
its secrets file) or, with C{--github-tokens DIR}, the user's own: a file
named by the user's name in that directory (L{GitTokens}).  Neither is
ever logged, answered or put into a container.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, \
    ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from capsule.core.ratelog import RateLimitedLog
from capsule.gateway.git_rules import (DEFAULT_GITHUB_UPSTREAM, GITHUB_HOST, MAX_PLACEHOLDER,
                                       PLACEHOLDER_HEADER, GitLimits, GitRefused, GitRoute,
                                       answer_headers, check_upstream, parse_git_request,
                                       rewrite_location, tls_policy, upstream_headers)
from capsule.gateway.git_stream import GitBodyStream, close_after, finish_request

_log = Logger()


# -- the resource ------------------------------------------------------------------

@dataclass(frozen=True)
class GitCaller:
    """
    Whose a placeholder is: what L{GitGateway}'s C{session_for} answers.
    """

    session_id: str
    user: str | None = None


class GitGateway(Resource):
    """
    C{/git/} of the door's site.

    @param session_for: C{session_for(placeholder)}: whose it is (an object
        with C{session_id} and C{user}), or C{None} (forged, or its session
        ended).
    @param token_for: C{token_for(user)}: the GitHub token to use, or
        C{None} (requests go on without one).
    @param upstream: where C{github.com} is (C{--github-upstream}).
    @param agent: the HTTP client (default: an C{Agent} checking the
        upstream's certificate by C{ca_file}).
    """

    isLeaf = True

    def __init__(self, reactor, session_for: Callable, token_for: Callable, *,
                 upstream: str = DEFAULT_GITHUB_UPSTREAM, ca_file: str | None = None,
                 limits: GitLimits = GitLimits(), agent=None) -> None:
        super().__init__()
        check_upstream(upstream)
        self._reactor = reactor
        self._session_for = session_for
        self._token_for = token_for
        self.upstream = upstream.rstrip("/")
        self.limits = limits
        if agent is None:
            pool = HTTPConnectionPool(reactor, persistent=True)
            pool.maxPersistentPerHost = 4
            agent = Agent(reactor, contextFactory=tls_policy(ca_file), pool=pool,
                          connectTimeout=limits.connect_timeout)
        self._agent = agent
        self._under_way: dict[str, int] = {}
        self._ratelog = RateLimitedLog(_log)

    # -- answers

    def _refuse(self, request, refusal: GitRefused, who: str = "") -> bytes:
        self._ratelog.error(self._reactor.seconds(), who or _peer(request), refusal.code,
                            "git gateway refused {method} {path} from {peer}: {reason}",
                            method=request.method.decode("latin-1"), peer=_peer(request),
                            path=_shown_path(request), reason=refusal.message)
        body = getattr(request, "content", None)
        if isinstance(body, GitBodyStream) and not body.done:
            _plain(request, refusal.status, refusal.code, refusal.message, write=True)
            close_after(request, self._reactor)
            return NOT_DONE_YET
        return _plain(request, refusal.status, refusal.code, refusal.message)

    def render(self, request):
        try:
            route = parse_git_request(request.method, _path_under(request),
                                      request.uri.partition(b"?")[2])
        except GitRefused as refusal:
            return self._refuse(request, refusal)
        placeholder = request.getHeader(PLACEHOLDER_HEADER.lower().encode("ascii"))
        caller = None
        if placeholder and len(placeholder) <= MAX_PLACEHOLDER:
            try:
                caller = self._session_for(placeholder.decode("ascii"))
            except UnicodeDecodeError:
                caller = None
        if caller is None:
            return self._refuse(request, GitRefused(
                403, "bad_placeholder", "capsule: this session's git gateway placeholder is not"
                " known (forged, or its session ended): open a new session"))
        session_id = caller.session_id
        if route.kind == "rpc":
            length = request.getHeader(b"content-length")
            if length is not None and (not length.isdigit()
                                       or int(length) > self.limits.max_body):
                return self._refuse(request, GitRefused(
                    413, "too_large", f"capsule: this request is larger than the git gateway"
                    f" takes ({self.limits.max_body} bytes)"), session_id)
            if isinstance(request.content, GitBodyStream):
                request.content.limit = self.limits.max_body
            elif _body_size(request) > self.limits.max_body:
                return self._refuse(request, GitRefused(
                    413, "too_large", f"capsule: this request is larger than the git gateway"
                    f" takes ({self.limits.max_body} bytes)"), session_id)
            expected = f"application/x-{route.service}-request".encode()
            if (request.getHeader(b"content-type") or b"").split(b";")[0].strip() != expected:
                return self._refuse(request, GitRefused(
                    415, "bad_content_type", f"capsule's git gateway: {route.service} takes"
                    f" {expected.decode()}"), session_id)
        if self._under_way.get(session_id, 0) >= self.limits.per_session:
            return self._refuse(request, GitRefused(
                429, "too_many", f"capsule: this session has {self.limits.per_session} git"
                " requests under way already: wait for them"), session_id)
        token = self._token_for(caller.user)
        self._under_way[session_id] = self._under_way.get(session_id, 0) + 1
        exchange = _Exchange(self, request, route, caller, token)
        exchange.finished.addBoth(lambda _: self._done(session_id))
        exchange.start()
        return NOT_DONE_YET

    def _done(self, session_id: str) -> None:
        left = self._under_way.get(session_id, 1) - 1
        if left > 0:
            self._under_way[session_id] = left
        else:
            self._under_way.pop(session_id, None)


class _Exchange:
    """
    One request forwarded and its answer streamed back.
    """

    def __init__(self, gateway: GitGateway, request, route: GitRoute, caller: GitCaller,
                 token: str | None) -> None:
        self.gateway = gateway
        self.request = request
        self.route = route
        self.caller = caller
        self.token = token
        self.finished = Deferred()
        self._over = False
        self._answer = None
        self._body = None
        self._bytes_out = 0
        self._last = gateway._reactor.seconds()
        self._timer = None
        self._deadline = None
        self._response = None
        self._protocol = None

    def start(self) -> None:
        gateway, request, route = self.gateway, self.request, self.route
        reactor = gateway._reactor
        request.notifyFinish().addErrback(lambda _: self._gone())
        body = None
        if route.kind == "rpc" and isinstance(request.content, GitBodyStream):
            body = self._body = request.content
            body.on_progress = self._touch
        elif route.kind == "rpc":
            request.content.seek(0)
            body = self._body = FileBodyProducer(request.content, readSize=64 * 1024)
        url = (gateway.upstream + route.upstream_path()).encode("ascii")
        self._timer = reactor.callLater(min(gateway.limits.stall, 30.0), self._check_stall)
        self._deadline = reactor.callLater(gateway.limits.max_time, self._expired)
        self._answer = gateway._agent.request(
            request.method if route.kind == "rpc" else b"GET", url,
            upstream_headers(request.requestHeaders, self.token), body)
        self._answer.addCallbacks(self._responded, self._failed)

    # -- timers

    def _touch(self) -> None:
        self._last = self.gateway._reactor.seconds()

    def _check_stall(self) -> None:
        self._timer = None
        if self._over:
            return
        limits = self.gateway.limits
        idle = self.gateway._reactor.seconds() - self._last
        if idle >= limits.stall:
            self._give_up(504, "stalled", f"capsule: nothing came or went for {limits.stall:g} s"
                          " through the git gateway: given up")
            return
        self._timer = self.gateway._reactor.callLater(
            min(limits.stall - idle, 30.0), self._check_stall)

    def _expired(self) -> None:
        self._deadline = None
        if not self._over:
            self._give_up(504, "too_long", f"capsule: a git request may last"
                          f" {self.gateway.limits.max_time:g} s through the gateway: given up")

    def _give_up(self, status: int, code: str, message: str) -> None:
        _log.warn("git gateway: {method} {repository} of session {session_id} given up: {reason}",
                  method=self.route.service, repository=self.route.repository,
                  session_id=self.caller.session_id[:8], reason=message)
        if not self.request.startedWriting:
            _plain(self.request, status, code, message, write=True)
            self._end(cancel=True)
            finish_request(self.request, self.gateway._reactor)
        else:
            self._end(cancel=True)
            self.request.loseConnection()

    # -- the upstream's answer

    def _responded(self, response) -> None:
        self._touch()
        if self._over:
            response.deliverBody(_Discard())
            return
        request, route = self.request, self.route
        self._response = response
        status = response.code
        if status == 401:
            response.deliverBody(_Discard())
            self._finish_plain(403, "token_refused", (
                f"capsule: GitHub refused the token capsule holds for you for"
                f" {route.repository} (wrong or expired): ask capsule's operator"
                if self.token else
                f"capsule: {route.repository} needs a GitHub token and capsule has none for"
                " you: capsule's operator sets GITHUB_TOKEN"))
            return
        if 300 <= status < 400:
            location = response.headers.getRawHeaders(b"location", [b""])[0]
            moved = rewrite_location(location, self.gateway.upstream, f"/git/{GITHUB_HOST}")
            response.deliverBody(_Discard())
            if moved is None:
                self._finish_plain(502, "bad_redirect", f"capsule: GitHub sent {route.repository}"
                                   " elsewhere than GitHub: not followed")
                return
            request.setResponseCode(status)
            request.setHeader(b"location", moved)
            request.setHeader(b"content-length", b"0")
            self._log_done(status)
            self._end()
            finish_request(request, self.gateway._reactor)
            return
        request.setResponseCode(status)
        for name, values in answer_headers(response.headers):
            request.responseHeaders.setRawHeaders(name, values)
        request.setHeader(b"cache-control", b"no-store")
        self._protocol = _Relay(self)
        response.deliverBody(self._protocol)

    def _failed(self, failure) -> None:
        if self._over:
            return
        if failure.check(CancelledError):
            return
        refusal = getattr(self._body, "refusal", None)
        if refusal is not None:
            self._finish_plain(refusal.status, refusal.code, refusal.message)
            return
        reason = _reason(failure)
        self.gateway._ratelog.error(
            self.gateway._reactor.seconds(), self.caller.session_id, "upstream",
            "git gateway: {upstream} not reached for session {session_id}: {reason}",
            upstream=self.gateway.upstream, reason=reason)
        timeout = failure.check(net_error.TimeoutError, net_error.ConnectingCancelledError)
        self._finish_plain(504 if timeout else 502, "upstream_unreachable",
                           f"capsule could not reach GitHub ({self.gateway.upstream}): {reason}")

    def _finish_plain(self, status: int, code: str, message: str) -> None:
        if self._over:
            return
        if not self.request.startedWriting:
            _plain(self.request, status, code, message, write=True)
        self._log_done(status)
        self._end()
        finish_request(self.request, self.gateway._reactor)

    def _log_done(self, status: int) -> None:
        if self.route.kind == "rpc":
            _log.info("git gateway: {service} of {repository} for session {session_id}{who}:"
                      " {status}, {bytes} bytes back", service=self.route.service,
                      repository=self.route.repository, session_id=self.caller.session_id[:8],
                      who=f" of {self.caller.user}" if self.caller.user else "",
                      user=self.caller.user, status=status, bytes=self._bytes_out)

    # -- the body's bytes

    def data(self, data: bytes) -> None:
        if self._over:
            return
        self._touch()
        self._bytes_out += len(data)
        self.request.write(data)

    def body_done(self, reason) -> None:
        if self._over:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._log_done(self._response.code)
            self.request.unregisterProducer()
            self._end()
            finish_request(self.request, self.gateway._reactor)
            return
        _log.warn("git gateway: the answer to {service} of {repository} for session"
                  " {session_id} broke off: {reason}", service=self.route.service,
                  repository=self.route.repository, session_id=self.caller.session_id[:8],
                  reason=_reason(reason))
        self.request.unregisterProducer()
        self._end()
        self.request.loseConnection()

    def _gone(self) -> None:
        """
        The session's connection went: stop everything.
        """
        if not self._over:
            self._end(cancel=True)

    def _end(self, cancel: bool = False) -> None:
        if self._over:
            return
        self._over = True
        for timer in (self._timer, self._deadline):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._deadline = None
        if cancel:
            if self._protocol is not None and self._protocol.transport is not None:
                self._protocol.transport.stopProducing()
            elif self._answer is not None:
                self._answer.cancel()
            if self._body is not None:
                try:
                    self._body.stopProducing()
                except Exception:
                    pass
        self.finished.callback(None)


class _Relay(Protocol):
    """
    The upstream's answer, passed on as it comes; the upstream is read no
    faster than the session takes it (the request's producer is the
    upstream's transport).
    """

    def __init__(self, exchange: _Exchange) -> None:
        self.exchange = exchange

    def connectionMade(self) -> None:
        self.exchange.request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        self.exchange.data(data)

    def connectionLost(self, reason) -> None:
        self.exchange.body_done(reason)


class _Discard(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass


def _plain(request, status: int, code: str, message: str, write: bool = False) -> bytes:
    """
    A refusal git prints: a C{text/plain} sentence (as C{remote: ...}), the
    machine code in C{X-Capsule-Error}.
    """
    body = (message + "\n").encode("utf-8")
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-capsule-error", code.encode("ascii"))
    request.setHeader(b"content-length", str(len(body)).encode())
    if write and request.method != b"HEAD":
        request.write(body)
    return body


def _path_under(request) -> bytes:
    """
    The raw path after C{/git/} (the prepath that led here is C{git}).
    """
    path = request.path
    prefix = b"/" + b"/".join(request.prepath) + b"/"
    return path[len(prefix):] if path.startswith(prefix) else b""


def _body_size(request) -> int:
    content = request.content
    if content is None:
        return 0
    here = content.tell()
    content.seek(0, 2)
    size = content.tell()
    content.seek(here)
    return size


def _peer(request) -> str:
    address = request.getClientAddress()
    return getattr(address, "host", None) or "unknown"


def _shown_path(request) -> str:
    # The path only (its query is a service name or nothing), cut short,
    # printable.
    text = request.path[:200].decode("latin-1")
    return "".join(c if c.isprintable() else "?" for c in text)


def _reason(failure) -> str:
    if failure.check(ResponseFailed):
        reasons = getattr(failure.value, "reasons", None) or []
        return "; ".join(r.getErrorMessage() for r in reasons) or "the answer broke off"
    return failure.getErrorMessage()


def session_callers(placeholders, sessions) -> Callable[[str], GitCaller | None]:
    """
    L{GitGateway}'s C{session_for}: whose a placeholder is, by the
    credential gateway's placeholders
    (L{capsule.gateway.credentials.PlaceholderStore}: the same one a
    session's Anthropic settings carry) and the live C{sessions} (by id:
    the user is its C{core.user}).
    """
    def session_for(placeholder: str) -> GitCaller | None:
        session_id = placeholders.session_for(placeholder)
        session = sessions.get(session_id) if session_id is not None else None
        if session is None:
            return None
        return GitCaller(session_id, getattr(session.core, "user", None))
    return session_for
