"""
The web front's HTTP toolkit: who a request comes from, and answers in JSON.

 - addresses: the socket's peer and the client behind a trusted proxy, of
   a C{twisted.web} request or of Autobahn's C{ConnectionRequest} (a
   WebSocket's upgrade); the decisions are L{capsule.core.addresses}';
 - JSON: every error capsule answers over HTTP is
   C{{"error": sentence, "code": word}}, with C{Cache-Control: no-store}:
   L{json_body}, L{json_error}, L{answer_json} and the L{Refusal} resource.
"""

from __future__ import annotations

import json
from typing import Callable, Iterable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from capsule.core.addresses import Network, client_behind, is_trusted, parse_ip, \
    split_forwarded_for

_log = Logger()


# -- addresses -------------------------------------------------------------------------


def header(request, name: bytes, default: str | None = None) -> str | None:
    """
    The value of a C{twisted.web} request's header C{name}, as text.
    """
    value = request.getHeader(name)
    return default if value is None else value.decode("latin-1")


def peer_host(request) -> str | None:
    """
    The host of the socket's peer: of a C{twisted.web} request, or of an
    Autobahn C{ConnectionRequest}, whose peer is C{"tcp4:1.2.3.4:5678"} or
    C{"tcp6:::1:5678"}.
    """
    get_address = getattr(request, "getClientAddress", None)
    if get_address is not None:
        return getattr(get_address(), "host", None)
    peer = getattr(request, "peer", None) or ""
    kind, _, rest = peer.partition(":")
    if kind in ("tcp4", "tcp6", "tcp"):
        return rest.rpartition(":")[0]
    return peer or None


def peer_address(request) -> str:
    """
    The host of the socket's peer, or C{"unknown"} (a UNIX socket's).
    """
    return peer_host(request) or "unknown"


def forwarded_for(request) -> list[str]:
    """
    The entries of the request's C{X-Forwarded-For} headers, in order.
    """
    headers = getattr(request, "requestHeaders", None)
    if headers is not None:
        values = [v.decode("latin-1") for v in headers.getRawHeaders(b"x-forwarded-for", [])]
    else:
        value = (getattr(request, "headers", None) or {}).get("x-forwarded-for")
        values = [value] if value else []
    return split_forwarded_for(values)


def client_address(request, trusted: Iterable[Network] = ()) -> str:
    """
    The address of the client behind C{request}: the socket's peer, or,
    when that peer is one of the C{trusted} proxies, the client its
    C{X-Forwarded-For} names (L{capsule.core.addresses.client_behind}).
    """
    return client_behind(peer_host(request), forwarded_for(request), trusted)


class ClientAddresses:
    """
    The client addresses of requests, believing C{X-Forwarded-For} from the
    C{trusted_proxies} only, and never from a peer on the sessions' network
    (C{sessions}: a callable, as that network is known only once the engine
    has answered): called with a request, the client's address.
    """

    def __init__(self, trusted_proxies: Iterable[Network] = (),
                 sessions: Callable[[], Iterable[Network]] = tuple) -> None:
        self.trusted_proxies = tuple(trusted_proxies)
        self._sessions = sessions

    def __call__(self, request) -> str:
        if self.from_session(request):
            return self.peer(request)
        return client_address(request, self.trusted_proxies)

    def peer(self, request) -> str:
        """
        The socket's peer (an address as capsule writes it, when it is one).
        """
        host = peer_host(request)
        address = parse_ip(host or "")
        return str(address) if address is not None else host or "unknown"

    def from_trusted_proxy(self, request) -> bool:
        """
        Whether the socket's peer is one of the trusted proxies, and not on
        the sessions' network.
        """
        return (is_trusted(parse_ip(peer_host(request) or ""), self.trusted_proxies)
                and not self.from_session(request))

    def from_session(self, request) -> bool:
        """
        Whether the socket's peer is on the sessions' network: its proxy
        headers are never believed.
        """
        return is_trusted(parse_ip(peer_host(request) or ""), self._sessions())


# -- JSON answers -------------------------------------------------------------------------

# Twisted knows no phrase for 421.
_PHRASES = {421: b"Misdirected Request"}


def json_body(request, status: int, body) -> bytes:
    """
    Set C{request}'s status and JSON headers; return C{body} as JSON bytes.
    """
    request.setResponseCode(status, _PHRASES.get(status))
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode("utf-8")


def json_error(request, status: int, message: str, code: str,
               retry_after: int | None = None, **extra) -> bytes:
    """
    An error answer: C{{"error": message, "code": code, **extra}}, with
    C{Retry-After} when C{retry_after} is given.
    """
    if retry_after is not None:
        request.setHeader(b"retry-after", b"%d" % retry_after)
    return json_body(request, status, {"error": message, "code": code, **extra})


def answer_json(request, d: Deferred, what: str):
    """
    Answer C{request} with the C{(status, body)} that C{d} fires with, as
    JSON, unless the client left meanwhile; a failure is logged as C{what}
    failed.  Returns L{NOT_DONE_YET}, for a C{render} method to return.
    """
    gone = []
    request.notifyFinish().addErrback(gone.append)

    def answer(result):
        status, body = result
        if not gone:
            request.write(json_body(request, status, body))
            request.finish()

    d.addCallback(answer)
    d.addErrback(lambda f: _log.failure("{what} failed", f, what=what))
    return NOT_DONE_YET


class Refusal(Resource):
    """
    Answers any request with a L{json_error}, plus C{headers} (name to
    value, as bytes).
    """

    isLeaf = True

    def __init__(self, status: int, message: str, code: str,
                 retry_after: int | None = None, headers: dict[bytes, bytes] | None = None
                 ) -> None:
        super().__init__()
        self.status, self.message, self.code = status, message, code
        self.retry_after = retry_after
        self.headers = headers or {}

    def render(self, request):
        for name, value in self.headers.items():
            request.setHeader(name, value)
        return json_error(request, self.status, self.message, self.code, self.retry_after)
