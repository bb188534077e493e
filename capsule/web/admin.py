"""
The admin API under C{/api/admin/}: list the sessions, end one or all, and
drain the server.  What C{python -m capsule.admin} speaks to.

    GET    /api/admin/sessions        the live sessions, and the kept ones (under "kept")
    DELETE /api/admin/sessions/ID     end one (ID: the id or a unique prefix)
    DELETE /api/admin/sessions        end every session
    GET    /api/admin/drain           whether capsule drains
    POST   /api/admin/drain?deadline=S  drain: no new sessions; after S s end the rest
    DELETE /api/admin/drain           take new sessions again
    GET    /api/admin/usage           what sessions used of Anthropic's API through the
                                      credential gateway, per user and per live session

Allowed with the admin token (C{Authorization: Bearer}), to a user named by
C{--admin-user}, and from loopback (a request without forwarding headers,
L{capsule.core.addresses.straight_from_loopback}) when capsule has no users
or runs with C{--admin-loopback}: with users, everyone on the machine
reaches loopback, so it is not enough by itself.  A browser's request from
another origin is refused.
"""

from __future__ import annotations

import hmac

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.web.resource import Resource

from capsule.auth.gate import AuthRefused
from capsule.core.addresses import straight_from_loopback
from capsule.sessions.drain import ENDED_BY_ADMIN, Drain, end_all
from capsule.web.http import answer_json, header, peer_address

_log = Logger()


def describe(session, now: float, facts=None) -> dict:
    """
    What the admin API says of a session (and C{facts(session id)}: what
    other parts count of it, e.g. its egress refusals).
    """
    core = session.core
    return {"id": session.id, "owner": core.user, "state": session.status(),
            "created": core.created_at, "age": round(now - core.created_at, 1),
            "idle": round(now - core.active_at, 1),
            "container": core.container_id, "client_attached": session.client is not None,
            "bytes_out": core.replay.end, **(facts(session.id) if facts is not None else {})}


class AdminRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class AdminAccess:
    """
    Who may use the admin API: the admin token, an admin user, or loopback.

    @param token: the admin token (C{None}: none).
    @param users: users allowed (with an L{capsule.auth.gate.Authenticator}).
    @param loopback: whether a request straight from loopback is allowed
        (by default: when there is no authenticator, i.e. no users).
    """

    def __init__(self, token: str | None = None, users=(), authenticator=None,
                 loopback: bool | None = None) -> None:
        self.token = token
        self.users = frozenset(users)
        self.authenticator = authenticator
        self.loopback = authenticator is None if loopback is None else loopback

    def check(self, request) -> Deferred:
        """
        Fire with who asks (for the log), or fail with L{AdminRefused}.
        """
        if not _same_origin(request):
            return fail(AdminRefused(403, "the admin API does not answer other sites' pages"))
        scheme, _, value = header(request, b"authorization", "").strip().partition(" ")
        if self.token and scheme.lower() == "bearer" and hmac.compare_digest(
                value.strip().encode("utf-8"), self.token.encode("utf-8")):
            return succeed("admin token")
        if self.loopback and straight_from_loopback(request):
            return succeed("loopback")
        if self.authenticator is not None and self.users:
            d = self.authenticator.user_of(request)

            def known(user):
                if user in self.users:
                    return f"user {user}"
                raise AdminRefused(403, f"{user} is not an administrator (--admin-user)")

            def refused(failure):
                failure.trap(AuthRefused)
                raise AdminRefused(failure.value.status, failure.value.message)
            return d.addCallbacks(known, refused)
        if self.loopback:
            message = "the admin API answers loopback" + (
                " and the admin token" if self.token else "")
        elif self.token:
            message = ("the admin API needs the admin token (with users, loopback is not"
                       " enough unless capsule runs with --admin-loopback)")
        else:
            message = ("the admin API is closed: with users it needs --admin-token,"
                       " --admin-user or --admin-loopback")
        return fail(AdminRefused(401 if self.token else 403, message))


def _same_origin(request) -> bool:
    """
    A browser's request from another site's page is refused: its C{Origin}
    must name the host it asks, and C{Sec-Fetch-Site} must not say
    cross-site.
    """
    site = header(request, b"sec-fetch-site", "same-origin").lower()
    if site not in ("same-origin", "none"):
        return False
    origin = header(request, b"origin")
    if origin is None:
        return True
    host = header(request, b"host", "").lower()
    netloc = origin.lower().split("://", 1)[-1].rstrip("/")
    return bool(host) and netloc == host


class AdminResource(Resource):
    """
    C{/api/admin/}: see the module's docstring.
    """

    isLeaf = True

    def __init__(self, manager, drain: Drain, access: AdminAccess, clock, usage=None,
                 session_facts=None, keeping=None) -> None:
        super().__init__()
        # The kept sessions (capsule.sessions.keeping), or None: none.
        self._keeping = keeping
        self._manager, self._drain, self._access, self._clock = manager, drain, access, clock
        # usage(): the credential gateway's counts (capsule.gateway.usage), or None.
        self._usage = usage
        # session_facts(session id): more of what a session's listing says
        # (its egress refusals), or None.
        self._session_facts = session_facts

    def render(self, request):
        def refused(failure):
            failure.trap(AdminRefused)
            e = failure.value
            _log.info("refused an admin request from {peer}: {message}",
                      peer=peer_address(request),
                      message=e.message)
            if e.status == 401:
                request.setHeader(b"www-authenticate", b'Bearer realm="capsule admin"')
            return e.status, {"error": e.message, "code": "forbidden"
                              if e.status == 403 else "unauthenticated"}

        d = self._access.check(request)
        d.addCallback(lambda who: self._dispatch(request, who))
        d.addErrback(refused)
        return answer_json(request, d, "an admin request")

    def _dispatch(self, request, who: str) -> tuple[int, dict]:
        path = [p.decode("utf-8", "replace") for p in request.postpath if p]
        method = request.method
        if path == ["sessions"]:
            if method in (b"GET", b"HEAD"):
                return self._list()
            if method == b"DELETE":
                count = end_all(self._manager, ENDED_BY_ADMIN)
                _log.info("admin ({who}) ended every session: {count}", who=who, count=count)
                return 200, {"ended": count}
        elif len(path) == 2 and path[0] == "sessions":
            if method == b"DELETE":
                return self._end(path[1], who)
        elif path == ["usage"] and self._usage is not None:
            if method in (b"GET", b"HEAD"):
                return 200, self._usage()
        elif path == ["drain"]:
            if method in (b"GET", b"HEAD"):
                return 200, self._drain.state()
            if method == b"POST":
                return self._start_drain(request, who)
            if method == b"DELETE":
                self._drain.stop()
                _log.info("admin ({who}) stopped the drain: capsule takes new sessions again",
                          who=who)
                return 200, self._drain.state()
        else:
            return 404, {"error": "no such admin path", "code": "not_found"}
        allowed = ("GET, HEAD, DELETE" if path == ["sessions"] else "GET, HEAD"
                   if path == ["usage"] else "DELETE" if len(path) == 2
                   else "GET, HEAD, POST, DELETE")
        request.setHeader(b"allow", allowed.encode("ascii"))
        return 405, {"error": f"{method.decode('ascii', 'replace')[:20]} is not allowed here;"
                              f" use {allowed}", "code": "method_not_allowed"}

    def _list(self) -> Deferred:
        now = self._clock.seconds()
        sessions = sorted(self._manager.sessions.values(), key=lambda s: s.core.created_at)
        listing = {"instance": self._manager.config.instance, "draining": self._drain.active,
                   "sessions": [describe(s, now, self._session_facts) for s in sessions],
                   "kept": []}
        if self._keeping is None:
            return succeed((200, listing))

        def kept(found):
            listing["kept"] = [{**k.describe(now), "owner": k.user, "container": k.container_id}
                               for k in sorted(found, key=lambda k: k.kept_at)]
            return 200, listing
        return maybeDeferred(self._keeping.kept_all).addCallback(kept)

    def _end(self, wanted: str, who: str) -> tuple[int, dict]:
        wanted = wanted.lower()
        matches = [s for i, s in self._manager.sessions.items() if i.startswith(wanted)]
        if len(wanted) < 4 or not matches:
            return 404, {"error": f"no live session {wanted[:40]}", "code": "session_not_found"}
        if len(matches) > 1:
            return 409, {"error": f"{wanted} names {len(matches)} sessions: give more of its id",
                         "code": "ambiguous"}
        session = matches[0]
        self._manager.end(session, ENDED_BY_ADMIN)
        _log.info("admin ({who}) ended session {session_id}", who=who,
                  session_id=session.id[:8])
        return 200, {"ended": session.id}

    def _start_drain(self, request, who: str) -> tuple[int, dict]:
        values = request.args.get(b"deadline")
        deadline = None
        if values:
            try:
                deadline = float(values[0])
                if not 0 <= deadline < 10 ** 7:
                    raise ValueError(deadline)
            except ValueError:
                return 400, {"error": "deadline: seconds, 0 or more", "code": "bad_request"}
        self._drain.start(deadline)
        _log.info("admin ({who}) began draining: no new sessions; {left} session(s) go on"
                  " {until}", who=who, left=len(self._manager.sessions),
                  until="until they end" if deadline is None
                  else f"for at most {deadline:g} s")
        return 200, self._drain.state()


class AdminMount(Resource):
    """
    Wraps the site's root (and its login gate): C{/api/admin} goes to the
    admin API, which checks its callers itself; every other path to
    C{inner}.
    """

    def __init__(self, inner: Resource, admin: AdminResource) -> None:
        super().__init__()
        self._inner, self._admin = inner, admin

    def getChildWithDefault(self, path: bytes, request):
        if path == b"api" and request.postpath[:1] == [b"admin"]:
            request.prepath.append(request.postpath.pop(0))
            return self._admin
        return self._inner.getChildWithDefault(path, request)

    def render(self, request):
        return self._inner.render(request)
