"""
What a browser may do with capsule's pages: which C{Host} names capsule
answers to (DNS rebinding), which C{Origin}s may open a terminal or change
state (cross-site requests), and the security headers of every response.

L{HostPolicy} decides, without I/O; L{GuardResource} applies it to every
HTTP request, and the WebSocket factory asks it at the handshake.
"""

from __future__ import annotations

import re
import socket
from urllib.parse import urlsplit

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger
from twisted.web.resource import Resource

from capsule.core.addresses import parse_ip
from capsule.web.http import Refusal, header, peer_address

_log = Logger()

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
# A WebSocket's origin is its page's: ws is http's, wss https's.
_PAGE_SCHEMES = {"http": "http", "https": "https", "ws": "http", "wss": "https"}

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

# Methods that change nothing; any other must come from an allowed Origin.
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})

# A year, without includeSubDomains: capsule speaks for its own name only.
HSTS = b"max-age=31536000"

# The page loads its scripts and styles from its own origin; xterm.js
# styles its rows with style elements and attributes, hence
# 'unsafe-inline' for styles (never for scripts).  'wasm-unsafe-eval' lets
# those scripts compile WebAssembly (asciinema-player's terminal, for "while
# you were away"): it allows no eval() or new Function() of JavaScript, and
# no script from anywhere else.
_CSP = ("default-src 'self'; script-src 'self' 'wasm-unsafe-eval';"
        " style-src 'self' 'unsafe-inline';"
        " img-src 'self' data:; font-src 'self'; connect-src 'self'{websocket};"
        " object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

Origin = tuple[str, str, int]

# What a host name or address may be made of (an IPv6 address without its
# brackets); anything else is no host of capsule's.
_NAME = re.compile(r"[a-z0-9._~%:-]+\Z")


def parse_origin(value: str | None) -> Origin | None:
    """
    C{scheme://host[:port]} as C{(page scheme, host, port)}, the port
    explicit; C{None} for anything else (C{null}, a path, no host).
    """
    if not value:
        return None
    try:
        parts = urlsplit(value.strip().rstrip("/"))
        scheme = _PAGE_SCHEMES.get(parts.scheme.lower())
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if scheme is None or not host or parts.path or parts.query or parts.username:
        return None
    if not _NAME.match(host):
        return None
    return scheme, host.rstrip("."), port if port is not None else _DEFAULT_PORTS[scheme]


def parse_host(value: str | None, default_port: int) -> tuple[str, int] | None:
    """
    A C{Host} header as C{(name, port)}, the name lower case and an IPv6
    address without brackets; C{None} when it is not a host.
    """
    if not value:
        return None
    try:
        parts = urlsplit("//" + value.strip())
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host or parts.path or parts.query or parts.fragment or parts.username:
        return None
    if not _NAME.match(host):
        return None
    return host.rstrip("."), port if port is not None else default_port


def _without_path(url: str) -> str:
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return url
    return f"{parts.scheme}://{parts.netloc}"


def is_secure(transport) -> bool:
    """
    Whether C{transport} is TLS (an C{ssl:} listener).
    """
    return transport is not None and ISSLTransport(transport, None) is not None


class HostPolicy:
    """
    The names capsule answers to and the origins allowed to use it.

    @param public_url: the URL the users reach capsule at (C{--public-url});
        when given, the only name and origin of the page.
    @param allowed_hosts: names besides (C{--allowed-host}): names behind
        DNS that reach a listener on all interfaces.
    @param allowed_origins: origins besides the page's own
        (C{--allowed-origin}); C{"*"} allows any.
    @param hostnames: the machine's own names (by default its host name).
    @param check_hosts: whether C{Host} is checked at all (off only for a
        site built without a configuration, in tests).
    """

    def __init__(self, public_url: str | None = None, allowed_hosts=(), allowed_origins=(),
                 hostnames=None, check_hosts: bool = True) -> None:
        # The page may be under a path (a proxy's /capsule/): its origin has none.
        self.public_origin = parse_origin(_without_path(public_url)) if public_url else None
        if public_url and self.public_origin is None:
            raise ValueError(f"not a URL of a page (scheme://host[:port]): {public_url}")
        self.allowed_hosts = frozenset(h.strip().lower().rstrip(".") for h in allowed_hosts)
        self.any_origin = "*" in allowed_origins
        self.allowed_origins = frozenset(
            filter(None, (parse_origin(o) for o in allowed_origins if o != "*")))
        if hostnames is None:
            name = socket.gethostname().lower()
            hostnames = {name, name.split(".", 1)[0]}
        self.hostnames = frozenset(hostnames)
        self.check_hosts = check_hosts

    def hsts(self, secure: bool) -> bool:
        """
        Whether responses say C{Strict-Transport-Security}: under TLS, or
        when the users reach capsule over https (a proxy ending TLS).
        """
        return secure or (self.public_origin is not None and self.public_origin[0] == "https")

    def host_allowed(self, host: str | None, local, secure: bool) -> bool:
        """
        Whether a request whose C{Host} is C{host}, which arrived at the
        local address C{local}, is for capsule.  A browser sends the name
        of the URL it opened: a name only the attacker's DNS gives (DNS
        rebinding) is none of these.

        A request without C{Host} (no browser sends one) is allowed; so is
        any when C{local} is unknown.
        """
        if not self.check_hosts or host is None or local is None:
            return True
        # A browser leaves out the default port of the URL it opened: the
        # public URL's scheme's (behind a proxy ending TLS, 443 reaches a
        # plain listener), else the listener's.
        scheme = self.public_origin[0] if self.public_origin else "https" if secure else "http"
        parsed = parse_host(host.lower(), _DEFAULT_PORTS[scheme])
        if parsed is None:
            return False
        name, port = parsed
        if self.public_origin is not None and (name, port) == self.public_origin[1:]:
            return True
        if name in self.allowed_hosts:
            return True
        if isinstance(local, (IPv4Address, IPv6Address)):
            here = parse_ip(local.host)
            loopback = here is not None and here.is_loopback
        else:
            # A UNIX socket: a proxy on this machine.
            here, loopback = None, True
        if loopback and (name in LOOPBACK_NAMES or name.endswith(".localhost")):
            # Loopback names reach no other machine, whatever the URL said.
            return True
        if self.public_origin is not None:
            return False
        if name in self.hostnames:
            return True
        asked = parse_ip(name)
        return asked is not None and here is not None and (
            asked == here or (asked.is_loopback and here.is_loopback))

    def own_origin(self, host: str | None, secure: bool) -> Origin | None:
        """
        The origin of the page: the public URL's, else the listener's
        scheme with C{host}.
        """
        if self.public_origin is not None:
            return self.public_origin
        scheme = "https" if secure else "http"
        parsed = parse_host((host or "").lower(), _DEFAULT_PORTS[scheme])
        return None if parsed is None else (scheme, *parsed)

    def origin_allowed(self, origin: str | None, host: str | None, secure: bool) -> bool:
        """
        Whether a browser page of C{origin} may open a terminal or change
        state here: the page's own origin, scheme host and port, or one
        allowed.  Clients that are not browsers send no Origin and are
        allowed.
        """
        if origin is None:
            return True
        if self.any_origin:
            return True
        parsed = parse_origin(origin.lower())
        if parsed is None:
            return False
        return parsed in self.allowed_origins or parsed == self.own_origin(host, secure)

    def csp(self, host: str | None, secure: bool) -> bytes:
        own = self.own_origin(host, secure)
        websocket = ""
        if own is not None:
            scheme, name, port = own
            name = f"[{name}]" if ":" in name else name
            websocket = f" {'wss' if scheme == 'https' else 'ws'}://{name}:{port}"
        return _CSP.format(websocket=websocket).encode("ascii")


class GuardResource(Resource):
    """
    The root of the site, in front of C{wrapped}: every response gets the
    security headers; a request for a name that is not capsule's is refused
    with 421 (403 for a WebSocket upgrade), and a state-changing request
    from another origin with 403, both before any resource sees them.
    """

    def __init__(self, wrapped: Resource, policy: HostPolicy) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.policy = policy

    def putChild(self, path: bytes, child) -> None:
        self.wrapped.putChild(path, child)

    def getChildWithDefault(self, name: bytes, request):
        refusal = self._check(request)
        if refusal is not None:
            return refusal
        return self.wrapped.getChildWithDefault(name, request)

    def render(self, request):
        refusal = self._check(request)
        return (refusal or self.wrapped).render(request)

    def _check(self, request) -> Resource | None:
        secure = request.isSecure()
        host = header(request, b"host")
        policy = self.policy
        csp = policy.csp(host, secure)
        # An export's answer (a download, or a JSON error) is fetched by the
        # page through a hidden frame of its own origin, which reads the
        # error: the page's own origin may frame it, and nothing else.
        own_frame = request.path.startswith(b"/api/export/")
        if own_frame:
            csp = csp.replace(b"frame-ancestors 'none'", b"frame-ancestors 'self'")
        request.setHeader(b"content-security-policy", csp)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"x-frame-options", b"SAMEORIGIN" if own_frame else b"DENY")
        request.setHeader(b"referrer-policy", b"no-referrer")
        if policy.hsts(secure):
            request.setHeader(b"strict-transport-security", HSTS)
        peer = peer_address(request)
        if not policy.host_allowed(host, request.getHost(), secure):
            _log.warn("refused a request for host {host} (peer {peer})",
                      host=host[:200], peer=peer)
            upgrade = (header(request, b"upgrade") or "").lower() == "websocket"
            return Refusal(403 if upgrade else 421,
                           f"this server does not answer to the name {host[:200]}",
                           "host_not_allowed")
        if request.method not in SAFE_METHODS:
            origin = header(request, b"origin")
            if not policy.origin_allowed(origin, host, secure):
                _log.warn("refused a {method} from origin {origin} (peer {peer})",
                          method=request.method.decode("latin-1")[:20],
                          origin=origin[:200], peer=peer)
                return Refusal(403, f"origin {origin[:200]} is not allowed",
                               "origin_not_allowed")
        return None

