"""
The ports listening in a session, as its owner sees them:

  - C{GET /api/sessions/{id}/ports}: C{{"ports": [{"port", "url", "public"}],
    "known": bool, "more": N}}; C{known} is false while the session's keeper
    has said nothing about its ports (an image with an older keeper never
    does), C{more} how many more listen than the keeper names;
  - the WebSocket's C{ports} message (L{capsule.core.protocol.encode_ports}),
    with the same entries, sent to the owner's page when the set changes
    and as it attaches.

The ports are what the session's keeper read from the container's own
socket table (L{capsule.core.keeper.parse_ports}), capsule's own in-container
ports left out (L{capsule.core.keeper.own_ports}): answering costs no Docker
call.  Each port's address is its preview's (L{capsule.core.preview}): under
C{--preview-domain} when there is one, else the path on capsule's site at
C{--public-url} or, without it, at the host the request named.
"""

from __future__ import annotations

from capsule.core.preview import preview_url
from capsule.web.api_base import ApiError, JsonResource
from capsule.web.http import header, json_body


class PortAddresses:
    """
    Where a session's ports are opened: C{public_url} (C{--public-url}) and
    C{domain} (C{--preview-domain}), either C{None}.
    """

    def __init__(self, public_url: str | None = None, domain: str | None = None) -> None:
        self.public_url = public_url.rstrip("/") if public_url else None
        self.domain = domain or None

    def base(self, secure: bool, host: str | None) -> str:
        """
        capsule's own address, as the client reached it (C{host}: the
        request's C{Host}, which the site's host policy accepted) unless
        the operator named it.
        """
        if self.public_url:
            return self.public_url
        if not host:
            return ""
        return ("https://" if secure else "http://") + host

    def scheme(self, secure: bool) -> str:
        if self.public_url:
            return "https" if self.public_url.startswith("https:") else "http"
        return "https" if secure else "http"

    def entries(self, session, secure: bool, host: str | None) -> list[dict]:
        base, scheme = self.base(secure, host), self.scheme(secure)
        return [{"port": port, "public": False,
                 "url": preview_url(session.id, port, base=base, domain=self.domain,
                                    scheme=scheme)}
                for port in session.listening_ports]

    def describe(self, session, secure: bool, host: str | None) -> dict:
        return {"ports": self.entries(session, secure, host), "known": session.ports_known,
                "more": session.ports_more}


class PortsResource(JsonResource):
    """
    C{/api/sessions/{id}/ports}: the ports listening in the session (GET).
    Its owner's only, as every session route (another's is a 404).
    """

    methods = (b"GET",)
    isLeaf = True

    def __init__(self, api, session_id: str) -> None:
        super().__init__()
        self.api, self.session_id = api, session_id

    def render_GET(self, request):
        if [p for p in request.postpath if p]:
            raise ApiError(404, "no such API route: the ports have no children here",
                           "not_found")
        session = self.api.find(request, self.session_id)
        addresses = self.api.port_addresses
        body = addresses.describe(session, request.isSecure(), header(request, b"host"))
        return json_body(request, 200, {"session": session.id, **body})
