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
from capsule.web.http import header, json_body
from capsule.web.preview_api import PortsResource as PreviewPortsResource


class PortAddresses:
    """
    Where a session's ports are opened: C{public_url} (C{--public-url}) and
    C{domain} (C{--preview-domain}), either C{None}.
    """

    def __init__(self, public_url: str | None = None, domain: str | None = None,
                 is_public=None) -> None:
        self.public_url = public_url.rstrip("/") if public_url else None
        self.domain = domain or None
        # is_public(session id, port): whether its owner made the port's
        # preview public (capsule.core.preview_access); None: never.
        self._is_public = is_public

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
        public = self._is_public or (lambda session_id, port: False)
        return [{"port": port, "public": public(session.id, port),
                 "url": preview_url(session.id, port, base=base, domain=self.domain,
                                    scheme=scheme)}
                for port in session.listening_ports]

    def describe(self, session, secure: bool, host: str | None) -> dict:
        return {"ports": self.entries(session, secure, host), "known": session.ports_known,
                "more": session.ports_more}


class PortsResource(PreviewPortsResource):
    """
    C{/api/sessions/{id}/ports}: the ports listening in the session (GET);
    its children are the ports' previews (L{capsule.web.preview_api}).
    Its owner's only, as every session route (another's is a 404).
    """

    methods = (b"GET",)

    def getChild(self, name: bytes, request):
        if name == b"":
            return self
        return super().getChild(name, request)

    def render_GET(self, request):
        session = self.api.find(request, self.session_id)
        addresses = self.api.port_addresses
        body = addresses.describe(session, request.isSecure(), header(request, b"host"))
        return json_body(request, 200, {"session": session.id, **body})
