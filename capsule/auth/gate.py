"""
Who is asking: L{Authenticator} turns a request (a C{twisted.web} request
or Autobahn's C{ConnectionRequest} of a WebSocket upgrade) into
credentials and asks Twisted's L{Portal}, whose realm's avatars are users
(L{capsule.auth.users}) and whose checkers (L{capsule.auth.checkers}) know
passwords, API tokens and a trusted proxy's word.  A browser's session
cookie names a login of L{capsule.auth.logins.LoginSessions}.

Logins cost a token of two buckets, one per client address and one per
user name, taken as the attempt starts and given back if it was right; and
only a few attempts of an address, a user, or in all are checked at once
(L{capsule.auth.throttle.LoginLimiter}).  An empty bucket or a full cap
refuses before any password is checked.  Nothing here logs a password, a
token or a cookie.

Where a request comes from (the client behind a trusted proxy, and whether
the socket's peer is one) is told by the C{addresses} the authenticator is
given: the web front's L{capsule.web.http.ClientAddresses}.
"""

from __future__ import annotations

import base64
import hmac
import secrets
from typing import Protocol
from urllib.parse import urlsplit

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from capsule.auth.checkers import HtpasswdChecker, ProxyUserChecker, TokenChecker
from capsule.auth.logins import COOKIE_NAME, LOGIN_TTL, LoginSessions
from capsule.auth.throttle import LoginLimiter, LoginThrottled, Quiet
from capsule.auth.users import BearerToken, CapsuleRealm, IUser, ProxyUser, printable

_log = Logger()


class Addresses(Protocol):
    """
    Where requests come from.
    """

    def __call__(self, request) -> str:
        """
        The client's address: the socket's peer, or the client a trusted
        proxy names.
        """

    def peer(self, request) -> str:
        """
        The socket's peer.
        """

    def from_trusted_proxy(self, request) -> bool:
        """
        Whether the socket's peer is a trusted proxy (never a session).
        """

    def from_session(self, request) -> bool:
        """
        Whether the socket's peer is on the sessions' network.
        """


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

    @param addresses: where requests come from (L{Addresses}).
    @param public_url: capsule's address as its users see it (C{https://...}
        makes cookies C{Secure}); C{None}: not known.
    """

    def __init__(self, clock, *, addresses: Addresses, htpasswd: str | None = None,
                 tokens: str | None = None, user_header: str | None = None,
                 public_url: str | None = None, run_blocking=None,
                 limiter: LoginLimiter | None = None, login_ttl: float = LOGIN_TTL) -> None:
        self.logins = LoginSessions(clock, login_ttl)
        self.limiter = limiter or LoginLimiter(clock)
        # Passwords being checked (see _counted): what names them -> the
        # Deferreds of the attempts waiting for the same answer.
        self._checking: dict[tuple, list[Deferred]] = {}
        self._key = secrets.token_bytes(32)
        self._quiet = Quiet(clock)
        self.addresses = addresses
        self.user_header = user_header.lower() if user_header else None
        self.public_url = public_url
        self.portal = Portal(CapsuleRealm())
        self.passwords = None
        if htpasswd is not None:
            self.passwords = HtpasswdChecker(htpasswd, run_blocking)
            self.portal.registerChecker(self.passwords)
        if tokens is not None:
            self.portal.registerChecker(TokenChecker(tokens))
        if self.user_header is not None:
            self.portal.registerChecker(ProxyUserChecker())

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
        return self.addresses(request)

    def login_cookie(self, request) -> str | None:
        """
        The value of C{request}'s session cookie, if it has one.
        """
        return _cookie(_headers(request), COOKIE_NAME)

    def has_credentials_for(self, request, user: str | None) -> bool:
        """
        Whether C{request} carries credentials that may be C{user}'s, before
        they are checked: an C{Authorization} header, the proxy's user
        header, or the cookie of a login of C{user}.
        """
        headers = _headers(request)
        if "authorization" in headers or (self.user_header is not None
                                          and self.user_header in headers):
            return True
        cookie = _cookie(headers, COOKIE_NAME)
        return cookie is not None and self.logins.user(cookie) == user

    def _login(self, credentials) -> Deferred:
        d = self.portal.login(credentials, None, IUser)
        return d.addCallback(lambda result: result[1].name)

    def _credential(self, user: str) -> bytes | None:
        """
        What names C{user}'s password as the htpasswd file says it now (a
        keyed hash of its hash), or C{None}: no such user.
        """
        hashed = self.passwords.file.reload().get(user) if self.passwords else None
        return None if hashed is None else hmac.digest(self._key, hashed, "sha256")

    def _login_holds(self, cookie: str, login) -> bool:
        """
        A login lasts while the credential it was made with does: a user
        removed from the htpasswd file, or whose password changed there,
        loses the logins made before.
        """
        if self.passwords is None:
            return True
        now = self._credential(login.user)
        if now is not None and login.credential in (None, now):
            return True
        self.logins.end(cookie)
        _log.info("ended a login of {user}: {why} {path}", user=login.user,
                  why="the user is no longer in" if now is None
                  else "the password it was made with changed in",
                  path=self.passwords.file.path)
        return False

    def user_of(self, request) -> Deferred:
        """
        Fire with the user C{request} is, or fail with L{AuthRefused}.
        """
        headers = _headers(request)
        if self.user_header is not None and self.user_header in headers:
            if self.addresses.from_trusted_proxy(request):
                d = self._login(ProxyUser(headers[self.user_header].strip()))
                return d.addErrback(self._refused, "the proxy named no valid user")
            peer = self.addresses.peer(request)
            self._quiet.warn(peer, "ignored {header} from {peer}, which is {what}",
                             header=self.user_header, peer=peer,
                             what="on the sessions' network" if
                             self.addresses.from_session(request)
                             else "not a --trusted-proxy")
        cookie = _cookie(headers, COOKIE_NAME)
        if cookie:
            login = self.logins.get(cookie)
            if login is not None and self._login_holds(cookie, login):
                return succeed(login.user)
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
            return self._password(name, password, address)
        return fail(AuthRefused(401, "log in first"))

    def _refused(self, failure, message: str):
        failure.trap(UnauthorizedLogin, UnhandledCredentials)
        raise AuthRefused(401, message)

    def _counted(self, credentials, address: str, user: str | None,
                 same: tuple | None = None) -> Deferred:
        """
        Log in with C{credentials}, which attempts are counted for: a token
        of the buckets of C{address} and C{user} is taken as the attempt
        starts (L{LoginLimiter.begin}), and given back if it was right.

        @param same: what names these very credentials (the user and a keyed
            hash of the password): an attempt with the same ones while one
            is being checked waits for its answer rather than checking (and
            counting) them again, as a browser sending Basic on several
            requests at once does.
        """
        if same is not None and same in self._checking:
            waiting: Deferred = Deferred()
            self._checking[same].append(waiting)
            return waiting
        try:
            attempt = self.limiter.begin(address, user)
        except LoginThrottled as e:
            return fail(AuthRefused(429, str(e), e.retry_after))
        if same is not None:
            self._checking[same] = []
        d = self._login(credentials)

        def right(name):
            self.limiter.done(attempt, right=True)
            return name

        def wrong(failure):
            failure.trap(UnauthorizedLogin, UnhandledCredentials)
            self.limiter.done(attempt, right=False)
            _log.info("failed login of {user} from {address}", user=printable(user)
                      if user else "(token)", address=address)
            raise AuthRefused(401, "wrong user name, password or token")

        def broken(failure):
            # Not an answer about the credentials (a checker failed): the
            # attempt is over all the same.
            self.limiter.done(attempt, right=False)
            return failure

        d.addCallbacks(right, wrong).addErrback(broken)
        if same is not None:
            def answer(result):
                for waiting in self._checking.pop(same, ()):
                    if isinstance(result, Failure):
                        waiting.errback(result.value if result.check(AuthRefused)
                                        else result)
                    else:
                        waiting.callback(result)
                return result
            d.addBoth(answer)
        return d

    def _password(self, name: str, password: str, address: str) -> Deferred:
        """
        Check a user name and password (Basic, or the login form).
        """
        return self._counted(UsernamePassword(name, password), address, name,
                             self._same(name, password))

    def _same(self, name: str, password: str) -> tuple:
        """
        What names a check of C{password} for C{name} against the user's
        password as it is now (see L{_counted}).
        """
        return ("password", name, hmac.digest(self._key, password.encode("utf-8", "replace"),
                                              "sha256"), self._credential(name))

    def log_in(self, request, name: str, password: str) -> Deferred:
        """
        Check a login form's user name and password: fire with the new
        login's cookie value, or fail with L{AuthRefused}.
        """
        # The password the check is against: the login is tied to it.
        credential = self._credential(name)
        d = self._password(name, password, self.address(request))

        def made(user):
            old = self.login_cookie(request)
            if old:
                # Rotated: the cookie from before the login is worthless now.
                self.logins.end(old)
            _log.info("{user} logged in from {address}", user=user,
                      address=self.address(request))
            return self.logins.new(user, credential)
        return d.addCallback(made)

    def log_out(self, request) -> None:
        """
        End the login C{request}'s cookie names, if it names one.
        """
        value = self.login_cookie(request)
        if value:
            user = self.logins.user(value)
            self.logins.end(value)
            if user is not None:
                _log.info("{user} logged out", user=user)

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
