"""
The session API's share links, under C{/api/sessions/{id}/shares}:

  - C{POST}: a new read-only link to the session (body C{{"ttl": seconds}},
    optional): answers C{{id, token, url, expires_at, expires_in}}, the
    only time the token is told;
  - C{GET}: the session's live links, each with how many watch through it
    (never their tokens);
  - C{DELETE /api/sessions/{id}/shares/{share_id}}: revoke one; whoever
    watches through it is disconnected.

Only the session's owner reaches these (a session of another user is a
404, as one that does not exist).  Whoever opens the link watches without
logging in: see L{capsule.sessions.spectators}.
"""

from __future__ import annotations

from twisted.logger import Logger

from capsule.core.shares import ShareRefused
from capsule.web.api_base import ApiError, JsonResource, json_request, only_keys, user_of
from capsule.web.http import json_body

_log = Logger()

# The page that watches: the token follows the "#", so that it never
# reaches a server's log or a Referer.
WATCH_PATH = "/watch/#"


def watch_url(public_url: str | None, token: str) -> str:
    return (public_url or "") + WATCH_PATH + token


class SharesResource(JsonResource):
    """
    C{/api/sessions/{id}/shares}: list (GET) and create (POST); its children
    are the shares, which are revoked (DELETE).
    """

    methods = (b"GET", b"POST")

    def __init__(self, api, session_id: str) -> None:
        super().__init__()
        self.api, self.session_id = api, session_id

    def getChild(self, name: bytes, request):
        if name == b"":
            return self
        return ShareResource(self.api, self.session_id, name.decode("utf-8", "replace")[:64])

    def _spectators(self):
        spectators = self.api.spectators
        if spectators is None:
            raise ApiError(404, "capsule has no watch links here", "not_found")
        return spectators

    def render_GET(self, request):
        spectators = self._spectators()
        session = self.api.find(request, self.session_id)
        shares = spectators.shares(session)
        return json_body(request, 200, {"session": session.id, "shares": shares,
                                        "watchers": spectators.count(session.id)})

    def render_POST(self, request):
        spectators = self._spectators()
        body = json_request(request, "making a share link", empty_ok=True)
        only_keys(body, {"ttl"})
        ttl = body.get("ttl")
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float))):
            raise ApiError(400, "ttl must be a number of seconds", "bad_request")
        session = self.api.find(request, self.session_id)
        try:
            share, token = spectators.share(session, ttl)
        except ShareRefused as e:
            raise ApiError(409 if e.code == "too_many_shares" else 400, e.message,
                           e.code) from None
        now = spectators.clock.seconds()
        return json_body(request, 201, {**share.describe(now), "token": token,
                                        "url": watch_url(self.api.public_url, token),
                                        "read_only": True})


class ShareResource(JsonResource):
    """
    C{/api/sessions/{id}/shares/{share_id}}: revoke it (DELETE).
    """

    methods = (b"DELETE",)
    isLeaf = True

    def __init__(self, api, session_id: str, share_id: str) -> None:
        super().__init__()
        self.api, self.session_id, self.share_id = api, session_id, share_id

    def render_DELETE(self, request):
        if [p for p in request.postpath if p]:
            raise ApiError(404, "no such API route: a share link has no children", "not_found")
        spectators = self.api.spectators
        session = self.api.find(request, self.session_id)
        if spectators is None or not spectators.revoke(session, self.share_id):
            raise ApiError(404, f"session {session.id} has no live share {self.share_id}",
                           "share_not_found")
        user = user_of(request)
        _log.info("session {short}: share {share} revoked{who}", short=session.id[:8],
                  share=self.share_id, who=f" by {user}" if user else "")
        return json_body(request, 200, {"id": self.share_id, "revoked": True})
