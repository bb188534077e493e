"""
The gateway site: what the session door (L{capsule.gateway.door}) hands an
ordinary HTTP request to.  Its root answers 404 for what it does not serve;
its children are the credential gateways: C{/anthropic/}
(L{capsule.gateway.anthropic}) and C{/git/} (L{capsule.gateway.git}).

A request's body is decided before any of it is read
(L{capsule.web.site.LimitedRequest}): a child may say how large its bodies
may be (a C{body_limit(request, length)} method, else
L{DEFAULT_BODY_LIMIT}); a larger one is answered 413 at once.  git's
C{POST}s under C{/git/} are the exception: their bodies (a push's pack)
stream to the git gateway as they come, which bounds them itself
(L{capsule.gateway.git_stream.GitStreamingRequest}).

Sessions learn where the door is from their environment
(L{SessionEnvironment}: C{CAPSULE_DOOR}, and for a profile that names the
C{anthropic} credential C{ANTHROPIC_BASE_URL} and the placeholder as
C{ANTHROPIC_AUTH_TOKEN}).
"""

from __future__ import annotations

import ipaddress

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.http import HTTPChannel
from twisted.web.server import Site

from capsule.gateway.anthropic import no_delay
from capsule.gateway.door import DoorRoot, door_url
from capsule.gateway.git_stream import GitStreamingRequest
from capsule.web.bodies import RefusalLog

_log = Logger()

# What a request to a path with no limit of its own may send.
DEFAULT_BODY_LIMIT = 64 * 1024
# Seconds a kept-alive connection to the gateway may stay idle.
IDLE_TIMEOUT = 300
# Where a session with no network reaches the door: its keeper forwards
# this address's door port to capsule.
LOOPBACK_DOOR = "127.0.0.1"


class _Channel(HTTPChannel):
    def connectionMade(self):
        super().connectionMade()
        # Each piece of an answer goes as it is written.
        no_delay(self.transport)


class GatewaySite(Site):
    """
    The site behind the session door: bodies limited per child, refusals
    logged at a bounded rate, no access log (the gateways log what they
    refuse).
    """

    # A LimitedRequest, but for git's streamed POSTs.
    requestFactory = GitStreamingRequest
    protocol = _Channel
    # LimitedRequest asks these.
    bodies = None

    def __init__(self, root: Resource, reactor=None) -> None:
        # A kept-alive connection with no request under way is closed after
        # IDLE_TIMEOUT (twisted's default is 12 hours); a request's own time
        # is its gateway's to bound.
        super().__init__(root, timeout=IDLE_TIMEOUT)
        self.refusal_log = RefusalLog(reactor)

    def body_decision(self, path: bytes, request, length: int | None) -> int:
        first = path.lstrip(b"/").split(b"/", 1)[0].split(b"?", 1)[0]
        child = self.resource.children.get(first)
        limit = getattr(child, "body_limit", None)
        if limit is None:
            return DEFAULT_BODY_LIMIT
        return limit(request, length) if callable(limit) else limit

    def log(self, request) -> None:
        pass


def make_gateway_site(anthropic: Resource | None, reactor=None, git: Resource | None = None
                      ) -> GatewaySite:
    """
    The gateway site with its children (C{anthropic}: the Anthropic gateway,
    C{git}: the git gateway, each if any).
    """
    # Its children are the gateways; any other path is DoorRoot's 404.
    root = DoorRoot()
    if anthropic is not None:
        root.putChild(b"anthropic", anthropic)
    if git is not None:
        root.putChild(b"git", git)
    return GatewaySite(root, reactor)


class SessionEnvironment:
    """
    What a session's container learns of the door from its environment: a
    callable C{(session_id, profile) -> dict} for the manager's
    C{session_environment}.

    @param port: the door's port (0: no door, nothing is said).
    @param network: the sessions' network (L{capsule.engine.network.SessionNetwork}),
        or a list of them (capsule's and the fenced one): the door's address
        for a network's sessions is its gateway's.
    @param store: the placeholders (L{capsule.gateway.credentials.PlaceholderStore}).
    @param keys: the real keys: without the Anthropic key, a session gets no
        Anthropic settings (its own login, if any, is left alone).
    """

    def __init__(self, port: int, network, store, keys) -> None:
        self._port = port
        self._networks = [n for n in (network if isinstance(network, (list, tuple))
                                      else [network]) if n is not None]
        self._store = store
        self._keys = keys
        self._unreached: set[str] = set()

    def door_host(self, profile) -> str | None:
        """
        Where sessions of C{profile} reach the door: the gateway address of
        the sessions' network (IPv4 first), 127.0.0.1 with no network;
        C{None} when unknown (another network, or not found yet).
        """
        network = profile.spec.network
        if network == "none":
            return LOOPBACK_DOOR
        on = next((n for n in self._networks if n.name == network), None)
        if on is None:
            return None
        found = sorted(on.gateways(), key=lambda a: ipaddress.ip_address(a).version)
        return found[0] if found else None

    def __call__(self, session_id: str, profile) -> dict[str, str]:
        if not self._port:
            return {}
        host = self.door_host(profile)
        if host is None:
            if "anthropic" in profile.credentials and profile.name not in self._unreached:
                self._unreached.add(profile.name)
                _log.warn("sessions of profile {profile} cannot reach capsule's gateway (their"
                          " network {network} has no session door): Anthropic's API is not"
                          " brokered for them", profile=profile.name,
                          network=profile.spec.network)
            return {}
        door = door_url(host, self._port)
        environment = {"CAPSULE_DOOR": door}
        if "anthropic" in profile.credentials and "anthropic" in self._keys:
            environment["ANTHROPIC_BASE_URL"] = f"{door}/anthropic"
            environment["ANTHROPIC_AUTH_TOKEN"] = self._store.issue(session_id)
        return environment
