"""
The session API's side of previews (L{capsule.web.preview}), under
C{/api/sessions/{id}/ports/{port}}:

  - C{PUT} C{{"public": true}}: the port's preview opens to anyone who has
    its URL (C{false}: to its owner only again);
  - C{/shares}: C{POST} a new link to the preview (body C{{"ttl": seconds}},
    optional): answers C{{id, token, url, port, created_at, expires_at,
    expires_in}}, the only time the token is told; C{GET} the live links
    (never their tokens), whether the port is public and its URL;
  - C{/shares/{share_id}}: C{DELETE} revokes a link, and closes what was
    opened through it.

Only the session's owner reaches these (a session of another user is a
404, as one that does not exist).
"""

from __future__ import annotations

from twisted.logger import Logger

from capsule.core.preview import valid_port
from capsule.core.shares import ShareRefused
from capsule.web.api_base import ApiError, JsonResource, NotFound, json_request, only_keys, \
    user_of
from capsule.web.http import json_body
from capsule.web.preview import AUTH_PATH

_log = Logger()


def _router(api):
    router = getattr(api, "previews", None)
    if router is None:
        raise ApiError(404, "capsule has no previews here", "not_found")
    return router


class PortsResource(JsonResource):
    """
    C{/api/sessions/{id}/ports}: its children are the session's ports.
    """

    methods = ()

    def __init__(self, api, session_id: str) -> None:
        super().__init__()
        self.api, self.session_id = api, session_id

    def getChild(self, name: bytes, request):
        try:
            port = int(name.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return NotFound()
        if not valid_port(port) or name != b"%d" % port:
            return NotFound()
        return PortResource(self.api, self.session_id, port)


class PortResource(JsonResource):
    """
    C{/api/sessions/{id}/ports/{port}}: whether its preview is public (PUT).
    """

    methods = (b"PUT",)

    def __init__(self, api, session_id: str, port: int) -> None:
        super().__init__()
        self.api, self.session_id, self.port = api, session_id, port

    def getChild(self, name: bytes, request):
        if name == b"shares":
            return PortSharesResource(self.api, self.session_id, self.port)
        if name == b"":
            return self
        return NotFound()

    def render_PUT(self, request):
        router = _router(self.api)
        body = json_request(request, "setting a port's preview")
        only_keys(body, {"public"})
        public = body.get("public")
        if not isinstance(public, bool):
            raise ApiError(400, "public must be true or false", "bad_request")
        session = self.api.find(request, self.session_id)
        _check_port(router, self.port)
        router.access.set_public(session.id, self.port, public)
        router.watch(session)
        user = user_of(request)
        _log.info("session {short}: the preview of port {port} is {what}{who}",
                  short=session.id[:8], port=self.port,
                  what="public" if public else "its owner's only",
                  who=f" (by {user})" if user else "")
        return json_body(request, 200, {"session": session.id, "port": self.port,
                                        "public": public,
                                        "url": router.url(session.id, self.port)})


def _check_port(router, port: int) -> None:
    why = router.port_refusal(port)
    if why is not None:
        raise ApiError(400, why, "port_not_allowed")


def link_url(router, session_id: str, port: int, token: str) -> str:
    return f"{router.url(session_id, port)}{AUTH_PATH}?share={token}"


class PortSharesResource(JsonResource):
    """
    C{/api/sessions/{id}/ports/{port}/shares}: list (GET) and create (POST).
    """

    methods = (b"GET", b"POST")

    def __init__(self, api, session_id: str, port: int) -> None:
        super().__init__()
        self.api, self.session_id, self.port = api, session_id, port

    def getChild(self, name: bytes, request):
        if name == b"":
            return self
        return PortShareResource(self.api, self.session_id, self.port,
                                 name.decode("utf-8", "replace")[:64])

    def render_GET(self, request):
        router = _router(self.api)
        session = self.api.find(request, self.session_id)
        access = router.access
        now = access.clock.seconds()
        return json_body(request, 200, {
            "session": session.id, "port": self.port,
            "public": access.is_public(session.id, self.port),
            "url": router.url(session.id, self.port),
            "shares": [s.describe(now) for s in access.links(session.id, self.port)]})

    def render_POST(self, request):
        router = _router(self.api)
        body = json_request(request, "making a preview link", empty_ok=True)
        only_keys(body, {"ttl"})
        ttl = body.get("ttl")
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float))):
            raise ApiError(400, "ttl must be a number of seconds", "bad_request")
        session = self.api.find(request, self.session_id)
        _check_port(router, self.port)
        try:
            share, token = router.access.share(session.id, self.port, ttl)
        except ShareRefused as e:
            raise ApiError(409 if e.code == "too_many_shares" else 400, e.message,
                           e.code) from None
        router.watch(session)
        now = router.access.clock.seconds()
        user = user_of(request)
        _log.info("session {short}: a link to the preview of port {port} made{who}, for"
                  " {ttl:g} s", short=session.id[:8], port=self.port,
                  who=f" by {user}" if user else "", ttl=share.expires_at - now)
        return json_body(request, 201, {**share.describe(now), "token": token,
                                        "port": self.port,
                                        "url": link_url(router, session.id, self.port, token)})


class PortShareResource(JsonResource):
    """
    C{/api/sessions/{id}/ports/{port}/shares/{share_id}}: revoke it (DELETE).
    """

    methods = (b"DELETE",)
    isLeaf = True

    def __init__(self, api, session_id: str, port: int, share_id: str) -> None:
        super().__init__()
        self.api, self.session_id, self.port, self.share_id = api, session_id, port, share_id

    def render_DELETE(self, request):
        if [p for p in request.postpath if p]:
            raise ApiError(404, "no such API route: a preview link has no children",
                           "not_found")
        router = _router(self.api)
        session = self.api.find(request, self.session_id)
        if not router.access.revoke(session.id, self.port, self.share_id):
            raise ApiError(404, f"port {self.port} of session {session.id} has no live link"
                                f" {self.share_id}", "share_not_found")
        router.revoked(session.id, self.port, self.share_id)
        user = user_of(request)
        _log.info("session {short}: the preview link {share} of port {port} revoked{who}",
                  short=session.id[:8], share=self.share_id, port=self.port,
                  who=f" by {user}" if user else "")
        return json_body(request, 200, {"id": self.share_id, "revoked": True})
