"""
The site's side of users (L{capsule.auth}): L{AuthGate} in front of every
path that needs one, and the login and logout pages.

A request without a user is refused with 401 (429 while its logins are
throttled) in JSON, or, when a browser asks for a page, sent to the login
page, which comes back to the page afterwards.
"""

from __future__ import annotations

import html
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.web.resource import Resource, getChildForRequest
from twisted.web.server import NOT_DONE_YET

from capsule.auth.gate import Authenticator, AuthRefused
from capsule.web.http import Refusal, json_error

_log = Logger()


def safe_next(value: str | None) -> str:
    """
    A path on this server to go to after the login, never another site: a
    plain absolute path (and query) of printable ASCII, without a space or
    a backslash, that does not start with C{//}; decoded (its C{%}
    escapes), it must not start with C{//} either, nor hold a control
    character or a backslash.  Anything else is C{/}.  (Browsers drop tabs
    and newlines from a URL and read a backslash as a slash: C{/%09/evil}
    would be C{//evil}, another site.)
    """
    if not value or not value.startswith("/") or value.startswith("//") or any(
            not 0x21 <= ord(c) <= 0x7e or c == "\\" for c in value):
        return "/"
    decoded = unquote(value)
    if decoded.startswith("//") or any(ord(c) < 0x20 or ord(c) == 0x7f or c == "\\"
                                       for c in decoded):
        return "/"
    return value


def _wants_page(request) -> bool:
    accept = (request.getHeader(b"accept") or b"").decode("latin-1")
    return request.method in (b"GET", b"HEAD") and "text/html" in accept


class _ToLogin(Resource):
    """
    303 to the login page, which comes back to this request's path.
    """

    isLeaf = True

    def render(self, request):
        request.setResponseCode(303)
        target = "/login?next=" + quote(request.uri.decode("latin-1"), safe="")
        request.setHeader(b"location", target.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return b""


def refusal(request, e: AuthRefused) -> Resource:
    """
    What answers a request that has no user: a browser asking for a page is
    sent to the login page; anything else gets JSON.
    """
    if e.status == 401 and _wants_page(request):
        return _ToLogin()
    return Refusal(e.status, e.message, "throttled" if e.status == 429 else "unauthenticated",
                   e.retry_after, headers={b"www-authenticate": b'Bearer realm="capsule"'}
                   if e.status == 401 else None)


class _Authenticated(Resource):
    """
    Fires C{d} with the user, then renders C{inner}'s child of C{path}.
    """

    isLeaf = True

    def __init__(self, d: Deferred, inner: Resource, path: bytes) -> None:
        super().__init__()
        self._d, self._inner, self._path = d, inner, path

    def render(self, request):
        def allowed(user):
            request.capsule_user = user
            child = self._inner.getChildWithDefault(self._path, request)
            return getChildForRequest(child, request)

        def refused(failure):
            failure.trap(AuthRefused)
            return refusal(request, failure.value)

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
        # A request whose body was decided from its headers was
        # authenticated then (capsule.web.api): not twice.
        known = getattr(request, "capsule_authenticated", None)
        return _Authenticated(succeed(known) if known is not None
                              else self._auth.user_of(request), self._inner, path)

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
            return json_error(request, 403, "a login must come from capsule's own page",
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
            # 429: too many failed logins, or too many at once; each says when.
            message = ("Wrong user name or password." if e.status == 401 else
                       e.message[:1].upper() + e.message[1:] + ".")
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
            return json_error(request, 403, "a logout must come from capsule's own page",
                              "cross_origin")
        self._auth.log_out(request)
        request.setHeader(b"set-cookie", self._auth.cookie_header(request, "", max_age=0))
        request.setResponseCode(303)
        request.setHeader(b"location", b"/login")
        request.setHeader(b"cache-control", b"no-store")
        return b""
