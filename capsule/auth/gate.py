"""
Who is asking: users, their credentials, and a browser's login.

Twisted's own machinery decides: a L{Portal} with L{CapsuleRealm} (an
avatar is a L{User}, named) and one checker per kind of credential:

 - L{HtpasswdChecker}: user names and passwords from an htpasswd file of
   bcrypt hashes (what C{htpasswd -B} writes), read again when it changes;
 - L{TokenChecker}: C{Authorization: Bearer} API tokens from a tokens file
   (C{user:token} lines), read again when it changes;
 - L{LoginSessionChecker}: the browser's session cookie, against the
   server-side L{LoginSessions} (each with an expiry);
 - L{ProxyUserChecker}: a user named by an authenticating proxy's header
   (C{--user-header}), believed only from C{--trusted-proxy} addresses.

L{Authenticator} turns a request (a C{twisted.web} request or Autobahn's
C{ConnectionRequest} of a WebSocket upgrade) into those credentials and
asks the portal.  Failed logins cost a token of two buckets, one per client
address and one per user name (L{LoginLimiter}); an empty bucket refuses
before any password is checked.  Nothing here logs a password, a token or
a cookie.
"""

from __future__ import annotations

import base64
import hmac
import html
import json
import math
import os
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from twisted.application.service import Service
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import Attribute, Interface, implementer

from capsule.core.admission import Network, TokenBucket, _ip, _peer_host, _trusted, client_address

_log = Logger()

COOKIE_NAME = "capsule_session"
# Seconds a browser's login lasts.
LOGIN_TTL = 12 * 3600.0
# Failed logins: per client address, per user name (COUNT, SECONDS).
FAILURES_PER_ADDRESS = (10, 60.0)
FAILURES_PER_USER = (5, 60.0)
# What a user name may be: it goes into logs and the state file.
_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}\Z")


def valid_user_name(name: str) -> bool:
    return bool(_USER_NAME.match(name))


_UUID = re.compile(r"\b([0-9a-f]{8})-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I)


def short_ids(text: str) -> str:
    """
    C{text} with each session id cut to its first 8 characters: a full id
    lets whoever reads it into the session, so logs carry the prefix only.
    """
    return _UUID.sub(r"\1", text)


# -- the realm ---------------------------------------------------------------------


class IUser(Interface):
    name = Attribute("The user's name.")


@implementer(IUser)
@dataclass(frozen=True)
class User:
    name: str


@implementer(IRealm)
class CapsuleRealm:
    """
    Every authenticated avatar id is a user of that name.
    """

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IUser not in interfaces:
            raise NotImplementedError("capsule's realm only knows IUser")
        name = avatarId.decode("utf-8") if isinstance(avatarId, bytes) else avatarId
        return IUser, User(name), lambda: None


# -- credentials that are not a password -----------------------------------------


class IBearerToken(Interface):
    token = Attribute("The API token, as str.")


class ILoginSessionCookie(Interface):
    value = Attribute("The session cookie's value, as str.")


class IProxyUser(Interface):
    name = Attribute("The user a trusted proxy names.")


@implementer(IBearerToken)
@dataclass(frozen=True)
class BearerToken:
    token: str = field(repr=False)


@implementer(ILoginSessionCookie)
@dataclass(frozen=True)
class LoginSessionCookie:
    value: str = field(repr=False)


@implementer(IProxyUser)
@dataclass(frozen=True)
class ProxyUser:
    name: str


# -- files read again when they change ------------------------------------------


class WatchedFile:
    """
    A file parsed by C{parse} (text in, value out), parsed again on use when
    its modification time, size or inode changed.  A file that cannot be
    read or parsed keeps the last good value (logged once per change).
    """

    def __init__(self, path: str, parse) -> None:
        self.path = path
        self._parse = parse
        self._stamp = None
        self.value = None
        self.reload()
        if self.value is None:
            raise ValueError(f"cannot read {path}")

    def reload(self):
        try:
            st = os.stat(self.path)
        except OSError as e:
            if self._stamp != "missing":
                self._stamp = "missing"
                _log.error("cannot read {path}: {error}; keeping what it said before",
                           path=self.path, error=e.strerror)
            return self.value
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return self.value
        self._stamp = stamp
        try:
            text = Path(self.path).read_text(encoding="utf-8")
            value = self._parse(text, self.path)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            _log.error("cannot read {path}: {error}; keeping what it said before",
                       path=self.path, error=e)
            return self.value
        first = self.value is None
        self.value = value
        _log.info("{verb} {path}: {count} entries", verb="read" if first else "read again",
                  path=self.path, count=len(value))
        return value


def _entries(text: str, path: str, what: str):
    """
    The C{user:value} lines of a file (blank lines and C{#} comments
    skipped; a line without a valid user name skipped with a warning).
    """
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition(":")
        if not sep or not valid_user_name(name):
            _log.warn("{path} line {number}: not user:{what} with a valid user name; skipped",
                      path=path, number=number, what=what)
            continue
        yield name, value


def parse_htpasswd(text: str, path: str = "htpasswd") -> dict[str, bytes]:
    """
    C{user:hash} lines (bcrypt hashes only: C{$2y$}, C{$2b$}, C{$2a$}).
    Other hashes are skipped with a warning: they are too cheap to guess.
    """
    users = {}
    for name, hashed in _entries(text, path, "hash"):
        if not hashed.startswith(("$2y$", "$2b$", "$2a$")):
            _log.warn("{path}: the password of {user} is not a bcrypt hash (make it with"
                      " htpasswd -B); skipped", path=path, user=name)
            continue
        users[name] = hashed.encode("ascii")
    return users


def parse_tokens(text: str, path: str = "tokens") -> dict[str, str]:
    """
    C{user:token} lines; returns user by token.  A token shorter than 16
    characters is skipped with a warning.
    """
    tokens = {}
    for name, token in _entries(text, path, "token"):
        if len(token) < 16:
            _log.warn("{path}: a token of {user} is shorter than 16 characters; skipped",
                      path=path, user=name)
            continue
        tokens[token] = name
    return tokens


def _bcrypt_check(password: bytes, hashed: bytes) -> bool:
    import bcrypt
    # htpasswd writes $2y$, which bcrypt reads as $2b$ (the same algorithm).
    if hashed.startswith(b"$2y$"):
        hashed = b"$2b$" + hashed[4:]
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:
        return False


# -- checkers --------------------------------------------------------------------


@implementer(ICredentialsChecker)
class HtpasswdChecker:
    """
    Passwords from an htpasswd file of bcrypt hashes, checked on
    C{run_blocking} (a thread pool: bcrypt takes a while by design).
    """

    credentialInterfaces = (IUsernamePassword,)
    # Passwords found right lately, so that a program sending Basic with
    # every request does not pay bcrypt each time: (user, HMAC of the
    # password under a key of this process) to the hash it matched.
    CACHE_SIZE = 256

    def __init__(self, path: str, run_blocking=None) -> None:
        self.file = WatchedFile(path, parse_htpasswd)
        self._run = run_blocking or (lambda f, *a: succeed(f(*a)))
        self._key = secrets.token_bytes(32)
        self._verified: OrderedDict[tuple[str, bytes], bytes] = OrderedDict()

    def requestAvatarId(self, credentials) -> Deferred:
        users = self.file.reload()
        name = credentials.username
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        password = credentials.password
        if isinstance(password, str):
            password = password.encode("utf-8")
        hashed = users.get(name)
        key = (name, hmac.digest(self._key, password, "sha256"))
        if hashed is not None and self._verified.get(key) == hashed:
            self._verified.move_to_end(key)
            return succeed(name)
        # An unknown user's password is checked against a known user's hash
        # (it cannot match: the user is unknown), so that it takes as long
        # and the answer's time does not tell which names exist.
        against = hashed or next(iter(users.values()), None)
        if against is None:
            return fail(UnauthorizedLogin("wrong user name or password"))
        d = self._run(_bcrypt_check, password, against)

        def checked(ok):
            if ok and hashed is not None:
                self._verified[key] = hashed
                while len(self._verified) > self.CACHE_SIZE:
                    self._verified.popitem(last=False)
                return name
            raise UnauthorizedLogin("wrong user name or password")
        return d.addCallback(checked)


@implementer(ICredentialsChecker)
class TokenChecker:
    credentialInterfaces = (IBearerToken,)

    def __init__(self, path: str) -> None:
        self.file = WatchedFile(path, parse_tokens)

    def requestAvatarId(self, credentials) -> Deferred:
        given = credentials.token.encode("utf-8")
        found = None
        # Every token compared, in constant time each.
        for token, name in self.file.reload().items():
            if hmac.compare_digest(given, token.encode("utf-8")):
                found = name
        if found is None:
            return fail(UnauthorizedLogin("unknown token"))
        return succeed(found)


@dataclass
class LoginSession:
    user: str
    expires: float


class LoginSessions:
    """
    The browsers' logins, server-side: a cookie value names one, until it
    expires or its user logs out.  The value is random (256 bits) and is
    only ever compared, never logged.
    """

    def __init__(self, clock, ttl: float = LOGIN_TTL) -> None:
        self._clock = clock
        self.ttl = ttl
        self._sessions: dict[str, LoginSession] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def new(self, user: str) -> str:
        now = self._clock.seconds()
        for key in [k for k, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[key]
        value = secrets.token_urlsafe(32)
        self._sessions[value] = LoginSession(user, now + self.ttl)
        return value

    def user(self, value: str) -> str | None:
        session = self._sessions.get(value)
        if session is None:
            return None
        if session.expires <= self._clock.seconds():
            del self._sessions[value]
            return None
        return session.user

    def end(self, value: str) -> None:
        self._sessions.pop(value, None)


@implementer(ICredentialsChecker)
class LoginSessionChecker:
    credentialInterfaces = (ILoginSessionCookie,)

    def __init__(self, sessions: LoginSessions) -> None:
        self.sessions = sessions

    def requestAvatarId(self, credentials) -> Deferred:
        user = self.sessions.user(credentials.value)
        if user is None:
            return fail(UnauthorizedLogin("no such login"))
        return succeed(user)


@implementer(ICredentialsChecker)
class ProxyUserChecker:
    """
    The proxy said who it is: L{Authenticator} only makes a L{ProxyUser}
    for a request from a trusted proxy.
    """

    credentialInterfaces = (IProxyUser,)

    def requestAvatarId(self, credentials) -> Deferred:
        if not valid_user_name(credentials.name):
            return fail(UnauthorizedLogin("not a user name"))
        return succeed(credentials.name)


# -- failed logins ---------------------------------------------------------------


class LoginLimiter:
    """
    Token buckets of failed logins, per client address and per user name,
    on an injected clock.  A login is not even tried while either bucket
    is empty.
    """

    def __init__(self, clock, per_address=FAILURES_PER_ADDRESS,
                 per_user=FAILURES_PER_USER) -> None:
        self._clock = clock
        self._rates = {"address": per_address, "user": per_user}
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    def _prune(self, now: float) -> None:
        for key in [k for k, b in self._buckets.items() if b.full(now)]:
            del self._buckets[key]

    def retry_after(self, address: str, user: str | None) -> float:
        """
        Seconds until a login of C{user} from C{address} may be tried (0: now).
        """
        now = self._clock.seconds()
        wait = 0.0
        for key in self._keys(address, user):
            bucket = self._buckets.get(key)
            if bucket is not None and bucket.tokens(now) < 1.0:
                wait = max(wait, bucket.retry_after(now))
        return wait

    def failed(self, address: str, user: str | None) -> None:
        now = self._clock.seconds()
        self._prune(now)
        for key in self._keys(address, user):
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = TokenBucket(*self._rates[key[0]], now)
            bucket.take(now)

    def _keys(self, address, user):
        keys = [("address", address)]
        if user:
            keys.append(("user", user[:64]))
        return keys


class LoginThrottled(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many failed logins: try again in {math.ceil(retry_after)} s")
        self.retry_after = max(1, math.ceil(retry_after))


# -- the requests' side ----------------------------------------------------------


def _headers(request) -> dict[str, str]:
    """
    Header name (lower case) to value, of a twisted.web request or an
    Autobahn ConnectionRequest.
    """
    raw = getattr(request, "requestHeaders", None)
    if raw is not None:
        return {k.decode("latin-1").lower(): v[-1].decode("latin-1")
                for k, v in raw.getAllRawHeaders()}
    return {k.lower(): v for k, v in (getattr(request, "headers", None) or {}).items()}


def _cookie(headers: dict[str, str], name: str) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value
    return None


class AuthRefused(Exception):
    """
    No user: C{status} 401 (no or wrong credentials) or 429 (throttled).
    """

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


class Authenticator:
    """
    Who a request is, by the first of: the trusted proxy's user header, a
    session cookie, C{Authorization: Bearer}, C{Authorization: Basic}.

    @param public_url: capsule's address as its users see it (C{https://...}
        makes cookies C{Secure}); C{None}: not known.
    """

    def __init__(self, clock, *, htpasswd: str | None = None, tokens: str | None = None,
                 user_header: str | None = None, trusted_proxies: tuple[Network, ...] = (),
                 public_url: str | None = None, run_blocking=None,
                 limiter: LoginLimiter | None = None,
                 login_ttl: float = LOGIN_TTL) -> None:
        self.clock = clock
        self.logins = LoginSessions(clock, login_ttl)
        self.limiter = limiter or LoginLimiter(clock)
        self.user_header = user_header.lower() if user_header else None
        self.trusted_proxies = tuple(trusted_proxies)
        self.public_url = public_url
        self.portal = Portal(CapsuleRealm())
        self.passwords = None
        if htpasswd is not None:
            self.passwords = HtpasswdChecker(htpasswd, run_blocking)
            self.portal.registerChecker(self.passwords)
        if tokens is not None:
            self.portal.registerChecker(TokenChecker(tokens))
        self.portal.registerChecker(LoginSessionChecker(self.logins))
        if self.user_header is not None:
            self.portal.registerChecker(ProxyUserChecker())

    @property
    def has_login_page(self) -> bool:
        return self.passwords is not None

    def secure(self, request) -> bool:
        """
        Whether cookies must be C{Secure}: under TLS, or behind an https
        C{--public-url}.
        """
        if self.public_url and self.public_url.lower().startswith("https:"):
            return True
        is_secure = getattr(request, "isSecure", None)
        return bool(is_secure and is_secure())

    def address(self, request) -> str:
        return client_address(request, self.trusted_proxies)

    def _login(self, credentials) -> Deferred:
        d = self.portal.login(credentials, None, IUser)
        return d.addCallback(lambda result: result[1].name)

    def _still_a_user(self, cookie: str, user: str) -> bool:
        """
        A user removed from the htpasswd file loses the logins it had.
        """
        if self.passwords is None or user in self.passwords.file.reload():
            return True
        self.logins.end(cookie)
        _log.info("ended a login of {user}: the user is no longer in {path}",
                  user=user, path=self.passwords.file.path)
        return False

    def user_of(self, request) -> Deferred:
        """
        Fire with the user C{request} is, or fail with L{AuthRefused}.
        """
        headers = _headers(request)
        if self.user_header is not None and self.user_header in headers:
            peer = _ip(_peer_host(request) or "")
            if _trusted(peer, self.trusted_proxies):
                d = self._login(ProxyUser(headers[self.user_header].strip()))
                return d.addErrback(self._refused, "the proxy named no valid user")
            _log.warn("ignored {header} from {peer}, which is not a --trusted-proxy",
                      header=self.user_header, peer=str(peer))
        cookie = _cookie(headers, COOKIE_NAME)
        if cookie:
            user = self.logins.user(cookie)
            if user is not None and self._still_a_user(cookie, user):
                return succeed(user)
        scheme, _, value = headers.get("authorization", "").strip().partition(" ")
        scheme = scheme.lower()
        address = self.address(request)
        if scheme == "bearer":
            return self._counted(BearerToken(value.strip()), address, None)
        if scheme == "basic":
            try:
                name, sep, password = base64.b64decode(value.strip(), validate=True) \
                    .decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                return fail(AuthRefused(401, "malformed Basic credentials"))
            if not sep:
                return fail(AuthRefused(401, "malformed Basic credentials"))
            return self._counted(UsernamePassword(name, password), address, name)
        return fail(AuthRefused(401, "log in first"))

    def _refused(self, failure, message: str):
        failure.trap(UnauthorizedLogin, UnhandledCredentials)
        raise AuthRefused(401, message)

    def _counted(self, credentials, address: str, user: str | None) -> Deferred:
        """
        Log in with C{credentials}, which failed attempts are counted for.
        """
        wait = self.limiter.retry_after(address, user)
        if wait > 0:
            _log.info("refused a login of {user} from {address}: too many failed logins",
                      user=user or "(token)", address=address)
            e = LoginThrottled(wait)
            return fail(AuthRefused(429, str(e), e.retry_after))
        d = self._login(credentials)

        def failed(failure):
            failure.trap(UnauthorizedLogin, UnhandledCredentials)
            self.limiter.failed(address, user)
            _log.info("failed login of {user} from {address}", user=_printable(user)
                      if user else "(token)", address=address)
            raise AuthRefused(401, "wrong user name, password or token")
        return d.addErrback(failed)

    def log_in(self, request, name: str, password: str) -> Deferred:
        """
        Check a login form's user name and password: fire with the new
        login's cookie value, or fail with L{AuthRefused}.
        """
        d = self._counted(UsernamePassword(name, password), self.address(request), name)

        def made(user):
            old = _cookie(_headers(request), COOKIE_NAME)
            if old:
                # Rotated: the cookie from before the login is worthless now.
                self.logins.end(old)
            _log.info("{user} logged in from {address}", user=user,
                      address=self.address(request))
            return self.logins.new(user)
        return d.addCallback(made)

    def cookie_header(self, request, value: str, max_age: int | None = None) -> bytes:
        parts = [f"{COOKIE_NAME}={value}", "Path=/", "HttpOnly", "SameSite=Strict",
                 f"Max-Age={int(self.logins.ttl) if max_age is None else max_age}"]
        if self.secure(request):
            parts.append("Secure")
        return "; ".join(parts).encode("ascii")

    def own_origin(self, request) -> str | None:
        if self.public_url:
            return _origin(self.public_url)
        host = _headers(request).get("host")
        if not host:
            return None
        return _origin(f"{'https' if self.secure(request) else 'http'}://{host}")

    def same_origin(self, request) -> bool:
        """
        Whether a state-changing request may come from where it comes from
        (CSRF): an C{Origin} must be capsule's own, and a browser's
        C{Sec-Fetch-Site} must not say another site.  A client that is not
        a browser sends neither.
        """
        headers = _headers(request)
        origin = headers.get("origin")
        if origin is not None and _origin(origin) != self.own_origin(request):
            return False
        return headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")


def _origin(url: str) -> str:
    """
    C{scheme://host[:port]} of C{url}, lower case, without a default port.
    """
    parts = urlsplit(url.strip().lower())
    netloc = parts.netloc.rsplit("@", 1)[-1]
    default = {"http": ":80", "https": ":443"}.get(parts.scheme)
    if default and netloc.endswith(default):
        netloc = netloc[: -len(default)]
    return f"{parts.scheme}://{netloc}"


def _printable(text: str) -> str:
    return text if valid_user_name(text) else "(an invalid user name)"


class AuthThreadPool(Service):
    """
    A few threads for bcrypt, started and stopped with the server.
    """

    def __init__(self, reactor, threads: int = 2) -> None:
        self._reactor = reactor
        self.pool = ThreadPool(0, threads, "capsule-auth")

    def run(self, f, *args) -> Deferred:
        return deferToThreadPool(self._reactor, self.pool, f, *args)

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self):
        super().stopService()
        self.pool.stop()


# -- the web side ---------------------------------------------------------------


def json_refusal(request, status: int, message: str, code: str,
                 retry_after: int | None = None) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    if status == 401:
        request.setHeader(b"www-authenticate", b'Bearer realm="capsule"')
    if retry_after is not None:
        request.setHeader(b"retry-after", str(retry_after).encode("ascii"))
    return json.dumps({"error": message, "code": code}).encode("utf-8")


def _wants_page(request) -> bool:
    accept = (request.getHeader(b"accept") or b"").decode("latin-1")
    return request.method in (b"GET", b"HEAD") and "text/html" in accept


def safe_next(value: str | None) -> str:
    """
    A path on this server to go to after the login, never another site.
    """
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


class _Refusal(Resource):
    isLeaf = True

    def __init__(self, refused: AuthRefused) -> None:
        super().__init__()
        self._refused = refused

    def render(self, request):
        e = self._refused
        if e.status == 401 and _wants_page(request):
            request.setResponseCode(303)
            target = "/login?next=" + quote(request.uri.decode("latin-1"), safe="")
            request.setHeader(b"location", target.encode("ascii"))
            request.setHeader(b"cache-control", b"no-store")
            return b""
        return json_refusal(request, e.status, e.message,
                            "throttled" if e.status == 429 else "unauthenticated",
                            e.retry_after)


class _Authenticated(Resource):
    """
    Fires C{d} with the user, then renders C{inner}'s child of C{path}.
    """

    isLeaf = True

    def __init__(self, d: Deferred, inner: Resource, path: bytes) -> None:
        super().__init__()
        self._d, self._inner, self._path = d, inner, path

    def render(self, request):
        from twisted.web.resource import getChildForRequest

        def allowed(user):
            request.capsule_user = user
            child = self._inner.getChildWithDefault(self._path, request)
            return getChildForRequest(child, request)

        def refused(failure):
            failure.trap(AuthRefused)
            return _Refusal(failure.value)

        def render(resource):
            if not request.finished and not getattr(request, "_disconnected", False):
                request.render(resource)

        def failed(failure):
            _log.failure("authenticating a request failed", failure)
            if not request.finished:
                request.setResponseCode(500)
                request.finish()

        self._d.addCallbacks(allowed, refused).addCallback(render).addErrback(failed)
        return NOT_DONE_YET


class AuthGate(Resource):
    """
    Wraps the site's root: every path but the C{open} ones needs a user,
    which is then C{request.capsule_user}.  C{/ws} checks at its upgrade
    itself.
    """

    def __init__(self, inner: Resource, authenticator: Authenticator,
                 open_paths: set[bytes]) -> None:
        super().__init__()
        self._inner = inner
        self._auth = authenticator
        self._open = open_paths

    def getChildWithDefault(self, path: bytes, request):
        if path in self._open:
            return self._inner.getChildWithDefault(path, request)
        return _Authenticated(self._auth.user_of(request), self._inner, path)

    def render(self, request):
        return self._inner.render(request)


class LoginResource(Resource):
    """
    C{GET /login}: the login form; C{POST /login}: log in (a form with
    C{username}, C{password} and C{next}), then 303 to C{next} with a new
    session cookie, or the form again with what went wrong.
    """

    isLeaf = True

    def __init__(self, authenticator: Authenticator, page: str) -> None:
        super().__init__()
        self._auth = authenticator
        self._page = page

    def _form(self, request, status: int, error: str | None, next_path: str,
              username: str = "") -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        text = Path(self._page).read_text(encoding="utf-8")
        alert = "" if error is None else (
            f'<p class="error" id="login-error" role="alert">{html.escape(error)}</p>')
        text = (text.replace("<!-- capsule:error -->", alert)
                .replace("{{next}}", html.escape(next_path, quote=True))
                .replace("{{username}}", html.escape(username, quote=True)))
        # The first empty field has the focus: the user name, or after an
        # error, the password (the user name stays filled in).
        if error is None:
            text = text.replace('autocomplete="username"', 'autocomplete="username" autofocus')
        else:
            text = text.replace('autocomplete="current-password"',
                                'autocomplete="current-password" aria-invalid="true"'
                                ' aria-describedby="login-error" autofocus')
        return text.encode("utf-8")

    def render_GET(self, request):
        values = request.args.get(b"next", [b"/"])
        return self._form(request, 200, None,
                          safe_next(values[0].decode("utf-8", "replace")))

    def render_POST(self, request):
        if not self._auth.same_origin(request):
            return json_refusal(request, 403, "a login must come from capsule's own page",
                                "cross_origin")
        body = request.content.read().decode("utf-8", "replace")
        form = parse_qs(body, keep_blank_values=True)
        name = form.get("username", [""])[0]
        password = form.get("password", [""])[0]
        next_path = safe_next(form.get("next", ["/"])[0])
        d = self._auth.log_in(request, name, password)

        def logged_in(value):
            request.setHeader(b"set-cookie", self._auth.cookie_header(request, value))
            request.setResponseCode(303)
            request.setHeader(b"location", next_path.encode("utf-8"))
            request.setHeader(b"cache-control", b"no-store")
            request.finish()

        def refused(failure):
            failure.trap(AuthRefused)
            e = failure.value
            if e.retry_after is not None:
                request.setHeader(b"retry-after", str(e.retry_after).encode("ascii"))
            message = ("Wrong user name or password." if e.status == 401 else
                       f"Too many failed logins: try again in {e.retry_after} s.")
            request.write(self._form(request, e.status, message, next_path, name[:64]))
            request.finish()

        gone = []
        request.notifyFinish().addErrback(gone.append)

        def unless_gone(f):
            return lambda result: None if gone else f(result)

        d.addCallbacks(unless_gone(logged_in), unless_gone(refused))
        d.addErrback(lambda f: _log.failure("a login failed", f))
        return NOT_DONE_YET


class LogoutResource(Resource):
    """
    C{POST /logout}: end this browser's login, clear its cookie, 303 to the
    login page.
    """

    isLeaf = True

    def __init__(self, authenticator: Authenticator) -> None:
        super().__init__()
        self._auth = authenticator

    def render_POST(self, request):
        if not self._auth.same_origin(request):
            return json_refusal(request, 403, "a logout must come from capsule's own page",
                                "cross_origin")
        value = _cookie(_headers(request), COOKIE_NAME)
        if value:
            user = self._auth.logins.user(value)
            self._auth.logins.end(value)
            if user is not None:
                _log.info("{user} logged out", user=user)
        request.setHeader(b"set-cookie", self._auth.cookie_header(request, "", max_age=0))
        request.setResponseCode(303)
        request.setHeader(b"location", b"/login")
        request.setHeader(b"cache-control", b"no-store")
        return b""

