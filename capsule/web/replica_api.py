"""
C{/api/sessions/{id}/...} for a session another capsule replica served
(L{capsule.sessions.replicas}): the session is looked for in the cluster
and taken over first, then the route answers as for a session of this
replica's.  Another user's session, or none, answers as before (404).
"""

from __future__ import annotations

from twisted.internet.defer import fail
from twisted.web.resource import Resource, getChildForRequest
from twisted.web.server import NOT_DONE_YET

from capsule.web.api_base import answer_when, user_of


class AdoptFirst(Resource):
    """
    Take the session C{session_id} over from another replica (when it is
    one of the caller's), then hand the request to C{route()}, the
    session's resource, as if it had been found at once.
    """

    isLeaf = True

    def __init__(self, replicas, session_id: str, route) -> None:
        super().__init__()
        self._replicas = replicas
        self._session_id = session_id
        self._route = route

    def render(self, request):
        d = self._replicas.adopt(self._session_id, user_of(request))

        def adopted(_):
            resource = getChildForRequest(self._route(), request)
            body = resource.render(request)
            if body is not NOT_DONE_YET and not request.finished:
                request.write(body)
                request.finish()
        d.addCallback(adopted)
        d.addErrback(lambda f: answer_when(request, fail(f), "taking over a session"))
        return NOT_DONE_YET


def adopting(api, session_id: str, route) -> Resource:
    """
    C{route()} (the resource of the caller's session C{session_id}), or, on
    a cluster when this replica does not know that session, an
    L{AdoptFirst} of it.
    """
    replicas = getattr(api.manager, "replicas", None)
    if replicas is None or session_id in api.manager.sessions:
        return route()
    return AdoptFirst(replicas, session_id, route)
