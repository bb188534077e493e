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

import base64
import os
import re
import stat
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS, trustRootFromCertificates
from twisted.logger import Logger
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, FileBodyProducer, \
    HTTPConnectionPool, ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss, Request as HTTPRequest
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IPolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from capsule.core.ratelog import RateLimitedLog
from capsule.web.site import LimitedRequest

_log = Logger()

GITHUB = "github"
GITHUB_HOST = "github.com"
DEFAULT_GITHUB_UPSTREAM = "https://github.com"
# The request header that carries a session's placeholder.
PLACEHOLDER_HEADER = "X-Capsule-Session"
# The token's environment variable (capsule's environment or its secrets
# file).
TOKEN_VARIABLE = "GITHUB_TOKEN"

SERVICES = ("git-upload-pack", "git-receive-pack")
# GitHub's names: an owner is 1 to 39 of letters, digits and inner hyphens;
# a repository 1 to 100 of letters, digits, '.', '_' and '-'.
_OWNER = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,38}\Z")
_REPO = re.compile(r"[A-Za-z0-9._-]{1,100}\Z")
MAX_PLACEHOLDER = 256
MAX_TOKEN = 1024

# What of git's request goes on to the upstream, and what of the upstream's
# answer comes back; nothing else (no cookie, no authorization of the
# session's, no Set-Cookie or WWW-Authenticate of the upstream's).
_REQUEST_HEADERS = (b"content-type", b"content-encoding", b"accept", b"accept-encoding",
                    b"accept-language", b"git-protocol", b"user-agent", b"pragma")
_RESPONSE_HEADERS = (b"content-type", b"content-encoding", b"cache-control", b"expires",
                     b"pragma", b"last-modified", b"etag")


@dataclass(frozen=True)
class GitLimits:
    """
    @ivar max_body: the most a request's body (a push's pack) may be, in
        bytes.
    @ivar per_session: requests of one session under way at once.
    @ivar connect_timeout: seconds to connect to the upstream.
    @ivar stall: seconds without a byte either way after which a request is
        given up (the upstream answers nothing, or the session reads
        nothing).
    @ivar max_time: seconds a request may last at all.
    """

    max_body: int = 2 * 1024 ** 3
    per_session: int = 8
    connect_timeout: float = 15.0
    stall: float = 300.0
    max_time: float = 3600.0


class GitRefused(Exception):
    """
    A request the gateway does not forward: its status, its machine code
    and the sentence git prints.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class GitRoute:
    """
    One smart-HTTP request of git: C{kind} is C{"refs"} (C{GET
    info/refs?service=}) or C{"rpc"} (C{POST <service>}).
    """

    host: str
    owner: str
    repo: str
    service: str
    kind: str

    @property
    def repository(self) -> str:
        return f"{self.owner}/{self.repo}"

    def upstream_path(self) -> str:
        """
        Its path (and query) at the upstream.
        """
        base = f"/{self.owner}/{self.repo}"
        if self.kind == "refs":
            return f"{base}/info/refs?service={self.service}"
        return f"{base}/{self.service}"


def parse_git_request(method: bytes, path: bytes, query: bytes) -> GitRoute:
    """
    The smart-HTTP request that C{method} of C{path} (under C{/git/}, e.g.
    C{github.com/owner/repo.git/info/refs}) with C{query} is.

    @raise GitRefused: for anything else (404 for a path, 405 for a method).
    """
    try:
        text = path.decode("ascii")
        query_text = query.decode("ascii")
    except UnicodeDecodeError:
        raise GitRefused(404, "not_git", "capsule's git gateway: not a git request") from None
    parts = text.split("/")
    if len(parts) < 4 or parts[0] != GITHUB_HOST:
        raise GitRefused(404, "not_git", "capsule's git gateway serves"
                         " github.com/<owner>/<repository> only")
    owner, repo, rest = parts[1], parts[2], parts[3:]
    if not _OWNER.match(owner) or not _REPO.match(repo) or repo in (".", "..", ".git") \
            or repo.startswith("."):
        raise GitRefused(404, "not_git", "capsule's git gateway: not a GitHub repository's"
                         " name (owner/repository)")
    if rest == ["info", "refs"]:
        service = query_text[len("service="):] if query_text.startswith("service=") else ""
        if service not in SERVICES:
            raise GitRefused(404, "not_git", "capsule's git gateway answers git's smart HTTP"
                             " only (info/refs?service=git-upload-pack or git-receive-pack)")
        if method not in (b"GET", b"HEAD"):
            raise GitRefused(405, "bad_method", "capsule's git gateway: info/refs is GET only")
        return GitRoute(GITHUB_HOST, owner, repo, service, "refs")
    if len(rest) == 1 and rest[0] in SERVICES:
        if query_text:
            raise GitRefused(404, "not_git", "capsule's git gateway: git's requests have no"
                             " query here")
        if method != b"POST":
            raise GitRefused(405, "bad_method", f"capsule's git gateway: {rest[0]} is POST only")
        return GitRoute(GITHUB_HOST, owner, repo, rest[0], "rpc")
    raise GitRefused(404, "not_git", "capsule's git gateway answers git's smart HTTP only"
                     " (info/refs, git-upload-pack, git-receive-pack); not dumb HTTP, not"
                     " the web pages or the API")


def basic_authorization(token: str) -> bytes:
    """
    GitHub's form for a token over HTTP: user C{x-access-token}, the token
    as the password.
    """
    return b"Basic " + base64.b64encode(f"x-access-token:{token}".encode())


def upstream_headers(incoming: Headers, token: str | None) -> Headers:
    """
    The headers of the request forwarded: those of git's that the upstream
    needs (L{_REQUEST_HEADERS}), and the token's C{Authorization} (none for
    no token: a public repository still clones).
    """
    headers = Headers()
    for name in _REQUEST_HEADERS:
        values = incoming.getRawHeaders(name)
        if values:
            headers.setRawHeaders(name, values)
    if token:
        headers.setRawHeaders(b"authorization", [basic_authorization(token)])
    return headers


def answer_headers(upstream: Headers) -> list[tuple[bytes, list[bytes]]]:
    """
    The headers of the upstream's answer that go on to git.
    """
    return [(name, upstream.getRawHeaders(name)) for name in _RESPONSE_HEADERS
            if upstream.getRawHeaders(name)]


def rewrite_location(location: bytes, upstream: str, prefix: str) -> bytes | None:
    """
    A redirect of the upstream's to a repository of its own (a renamed
    repository) made a path of the gateway's under C{prefix}
    (C{/git/github.com}); C{None} for one elsewhere, which is not followed.
    """
    try:
        text = location.decode("ascii")
    except UnicodeDecodeError:
        return None
    base = upstream.rstrip("/")
    if text.startswith(base + "/"):
        return (prefix + text[len(base):]).encode("ascii")
    if text.startswith("/") and not text.startswith("//"):
        return (prefix + text).encode("ascii")
    return None


# -- the environment of a session ----------------------------------------------

def git_environment(door: str, placeholder: str) -> dict[str, str]:
    """
    The environment that has git in a session go through the gateway at
    C{door} (the session door's URL) with C{placeholder}: git's
    configuration by C{GIT_CONFIG_COUNT}/C{GIT_CONFIG_KEY_n}/
    C{GIT_CONFIG_VALUE_n}, no file.
    """
    base = f"{door.rstrip('/')}/git/"
    pairs = [
        (f"url.{base}{GITHUB_HOST}/.insteadOf", f"https://{GITHUB_HOST}/"),
        (f"url.{base}{GITHUB_HOST}/.insteadOf", f"git@{GITHUB_HOST}:"),
        (f"url.{base}{GITHUB_HOST}/.insteadOf", f"ssh://git@{GITHUB_HOST}/"),
        (f"http.{base}.extraHeader", f"{PLACEHOLDER_HEADER}: {placeholder}"),
    ]
    environment = {"GIT_CONFIG_COUNT": str(len(pairs))}
    for n, (key, value) in enumerate(pairs):
        environment[f"GIT_CONFIG_KEY_{n}"] = key
        environment[f"GIT_CONFIG_VALUE_{n}"] = value
    return environment


def git_session_environment(door_for: Callable, placeholder_for: Callable[[str], str]):
    """
    The session manager's C{session_environment} hook of the git gateway:
    for a session of a profile naming the C{github} credential, whose
    network reaches the door (C{door_for(profile)}: the door's URL, or
    C{None}), git's configuration (L{git_environment}).
    """
    def environment(session_id: str, profile) -> dict[str, str]:
        if GITHUB not in getattr(profile, "credentials", ()):
            return {}
        door = door_for(profile)
        if door is None:
            return {}
        return git_environment(door, placeholder_for(session_id))
    return environment


# -- tokens --------------------------------------------------------------------

_USER_FILE = re.compile(r"[A-Za-z0-9_@+-][A-Za-z0-9._@+-]{0,127}\Z")


class GitTokens:
    """
    Which GitHub token a user's sessions use: the user's own file in
    C{directory} (named by the user's name; read at each use, so that a
    token can change without a restart; not readable by others), else the
    operator's C{token}.

    @ivar token: the operator's token, or C{None}.
    """

    def __init__(self, token: str | None = None, directory: str | None = None) -> None:
        self.token = token or None
        self.directory = directory

    def __repr__(self) -> str:
        return f"<GitTokens operator={'yes' if self.token else 'no'} directory={self.directory}>"

    def __call__(self, user: str | None) -> str | None:
        if self.directory is not None and user and _USER_FILE.match(user):
            own = self._read(os.path.join(self.directory, user))
            if own is not None:
                return own
        return self.token

    def _read(self, path: str) -> str | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode) or mode & (stat.S_IROTH | stat.S_IWOTH):
                _log.warn("the GitHub token file of a user is not used: it is not a regular"
                          " file, or others may read it (chmod 600)")
                return None
            data = f.read(MAX_TOKEN + 1)
        token = data.decode("utf-8", "replace").strip()
        if not token or len(data) > MAX_TOKEN or any(c.isspace() or ord(c) < 32 for c in token):
            _log.warn("the GitHub token file of a user is not used: not one token")
            return None
        return token


# -- TLS to the upstream -----------------------------------------------------------

@implementer(IPolicyForHTTPS)
class _TrustPolicy:
    def __init__(self, root) -> None:
        self._root = root

    def creatorForNetloc(self, hostname: bytes, port: int):
        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._root)


def tls_policy(ca_file: str | None):
    """
    How the upstream's certificate is checked: against the system's
    authorities, or against those of C{ca_file} (PEM; C{--gateway-ca}).
    """
    if ca_file is None:
        return BrowserLikePolicyForHTTPS()
    with open(ca_file, "rb") as f:
        pem = f.read()
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem,
                        re.DOTALL)
    if not blocks:
        raise ValueError(f"{ca_file}: no PEM certificate in it")
    return _TrustPolicy(trustRootFromCertificates([Certificate.loadPEM(b) for b in blocks]))


def check_upstream(upstream: str) -> str:
    """
    An upstream's base URL: C{https://host[:port]} (C{http} for a test).

    @raise ValueError: saying why not.
    """
    try:
        parts = urlsplit(upstream)
        parts.port
    except ValueError:
        raise ValueError(f"not a URL: {upstream[:100]!r}") from None
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.path not in (
            "", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"not an upstream's base URL (https://host[:port]): {upstream[:100]!r}")
    return upstream


# -- request bodies, passed on as they come --------------------------------------------

# Bytes of a body held while the upstream takes none (before it is
# connected, or while it is slow): past the first, the session's connection
# is read no more until they are passed on; past the second (the connection
# was read anyway), the request is given up.
BODY_HIGH_WATER = 256 * 1024
BODY_MOST_HELD = 16 * 1024 * 1024


def _streamed_path(method: bytes, path: bytes) -> bool:
    return method == b"POST" and path.startswith(b"/git/") and b"?" not in path and \
        path.endswith(tuple(b"/" + s.encode() for s in SERVICES))


@implementer(IBodyProducer)
class GitBodyStream:
    """
    The body of a git request (a push's pack), from the session's
    connection to the upstream's as it comes: the request's C{content}
    (written to) and the forwarded request's body producer.  The session's
    connection is paused while the upstream takes nothing.

    @ivar limit: the most it may be (set by the gateway); past it,
        L{refusal} says why, and the rest is dropped.
    @ivar done: all of it came.
    """

    def __init__(self, request, length: int | None) -> None:
        self._request = request
        self.length = UNKNOWN_LENGTH if length is None else length
        self.limit: int | None = None
        self.received = 0
        self.done = False
        self.refusal: GitRefused | None = None
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._consumer = None
        self._paused = False
        self._stopped = False
        self._finished: Deferred | None = None
        self._paused_reading = False
        # Told of each piece that comes (the gateway's stall timer).
        self.on_progress: Callable[[], None] = lambda: None

    # -- the request's side (a file, for twisted.web)

    def write(self, data: bytes) -> None:
        self.received += len(data)
        self.on_progress()
        if self._stopped or self.refusal is not None:
            return
        if self.limit is not None and self.received > self.limit:
            self._refuse(GitRefused(413, "too_large", f"capsule: this request is larger than"
                                    f" the git gateway takes ({self.limit} bytes)"))
            return
        if self._consumer is not None and not self._paused and not self._held:
            self._consumer.write(data)
            return
        self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes > BODY_MOST_HELD:
            self._refuse(GitRefused(502, "upstream_slow", "capsule: GitHub takes this push"
                                    " slower than it comes: given up"))
        elif self._held_bytes > BODY_HIGH_WATER:
            self._pause_reading()

    def finish(self) -> None:
        """
        All of the body came.
        """
        self.done = True
        self._resume_reading()
        self._flush()

    def seek(self, *args) -> None:
        pass

    def tell(self) -> int:
        # Nothing for twisted.web to parse as a form.
        return 0

    def read(self, *args) -> bytes:
        return b""

    def close(self) -> None:
        pass

    # -- the upstream's side (IBodyProducer)

    def startProducing(self, consumer) -> Deferred:
        self._consumer = consumer
        self._finished = Deferred()
        self._flush()
        return self._finished

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._flush()

    def stopProducing(self) -> None:
        """
        The upstream wants no more: the rest is dropped (and read, so that
        the connection's next bytes are understood).
        """
        self._stopped = True
        self._held, self._held_bytes = [], 0
        self._resume_reading()

    # --

    def _flush(self) -> None:
        while self._held and self._consumer is not None and not self._paused \
                and not self._stopped:
            data = self._held.pop(0)
            self._held_bytes -= len(data)
            self._consumer.write(data)
        if not self._held:
            self._resume_reading()
            if self.done and self._finished is not None and not self._stopped \
                    and self.refusal is None:
                finished, self._finished = self._finished, None
                finished.callback(None)

    def _refuse(self, refusal: GitRefused) -> None:
        self.refusal = refusal
        self._held, self._held_bytes = [], 0
        self._resume_reading()
        if self._finished is not None:
            finished, self._finished = self._finished, None
            finished.errback(refusal)

    def _pause_reading(self) -> None:
        channel = getattr(self._request, "channel", None)
        if not self._paused_reading and channel is not None:
            self._paused_reading = True
            channel.transport.pauseProducing()

    def _resume_reading(self) -> None:
        channel = getattr(self._request, "channel", None)
        if self._paused_reading:
            self._paused_reading = False
            if channel is not None and not getattr(channel, "_waitingForTransport", False):
                channel.transport.resumeProducing()


class GitStreamingRequest(LimitedRequest):
    """
    The gateway site's request (L{capsule.gateway.site.GatewaySite}): for
    git's C{POST}s under C{/git/}, the body is not read whole first: the
    request reaches the gateway as soon as its headers are in, its body
    passed on as it comes (L{GitBodyStream}; the gateway bounds it).  Any
    other request is a L{LimitedRequest}: its body limited by its path
    before any of it is read.
    """

    _streamed = False

    def gotLength(self, length):
        channel = self.channel
        method = getattr(channel, "_command", b"")
        path = getattr(channel, "_path", b"")
        if not _streamed_path(method, path):
            super().gotLength(length)
            return
        self._streamed = True
        self.content = GitBodyStream(self, length)
        # "100 Continue" only once the gateway took the request: never after
        # a refusal it already began to write.
        expect = self.requestHeaders.getRawHeaders(b"expect")
        self.requestHeaders.removeHeader(b"expect")
        version = getattr(channel, "_version", b"HTTP/1.1")
        HTTPRequest.requestReceived(self, method, path, version)
        if expect and expect[0].lower() == b"100-continue" and version == b"HTTP/1.1" \
                and not self.startedWriting and not self.finished:
            channel.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def handleContentChunk(self, data):
        if self._streamed:
            self.content.write(data)
            return
        super().handleContentChunk(data)

    def requestReceived(self, command, path, version):
        if self._streamed:
            self._received()
            self.content.finish()
            return
        super().requestReceived(command, path, version)


def _close_after(request, reactor) -> None:
    """
    Finish a request whose body is still coming: the connection then closes
    (whatever of the body follows is never read as a next request).
    """
    channel = getattr(request, "channel", None)
    if channel is not None:
        channel.persistent = False
    body = getattr(request, "content", None)
    if isinstance(body, GitBodyStream):
        body.stopProducing()

    def finish():
        if not request.finished and getattr(request, "channel", None) is not None:
            request.finish()
    reactor.callLater(0, finish)


def _finish(request, reactor) -> None:
    """
    Finish a request: at once if its body is in, else closing its
    connection (L{_close_after}).
    """
    body = getattr(request, "content", None)
    if isinstance(body, GitBodyStream) and not body.done:
        _close_after(request, reactor)
    elif not request.finished and getattr(request, "channel", None) is not None:
        request.finish()


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
            _close_after(request, self._reactor)
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
            _finish(self.request, self.gateway._reactor)
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
            _finish(request, self.gateway._reactor)
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
        _finish(self.request, self.gateway._reactor)

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
            _finish(self.request, self.gateway._reactor)
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
