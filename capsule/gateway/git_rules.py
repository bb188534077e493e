"""
The git gateway's rules (L{capsule.gateway.git}): which requests of a
session's git pass and what of them goes on, the environment that points a
session's git at the door, whose token is put on, and TLS to the upstream.
"""

from __future__ import annotations

import base64
import os
import re
import stat
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

from twisted.internet.ssl import Certificate, optionsForClientTLS, trustRootFromCertificates
from twisted.logger import Logger
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer


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
