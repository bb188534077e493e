"""
The tests' HTTP client: one answer type, and one way to ask for it, of a
live capsule over a socket or of capsule's Site in memory.

 - L{Response}: status, headers (looked up in any case) and body, which
   unpacks as C{status, headers, body}.
 - L{request} (one request on a connection of its own) and L{Connection}
   (several on one kept-alive connection): a live server, through the
   standard library's C{http.client}.  Redirects are not followed; a
   C{Host} header given replaces the one from the URL; an iterable body is
   sent chunked; C{https} URLs take an C{ssl.SSLContext}.  L{status_line}:
   the first line of an answer that does not end (a WebSocket upgrade).
 - L{send}, L{ask} and L{ask_later}: capsule's Site in memory, a request's
   bytes written into one of its channels over a C{StringTransport} (of
   the peer and local addresses asked for), and L{parse} of what it wrote.
   (Not treq's C{StubTreq}: it serves a resource from a plain Site of its
   own, to one fixed peer, where these tests need capsule's Site, with its
   body limits and request class, and a peer, a local address or a TLS
   transport of their choosing.)

The tests that attack the wire itself (a body cut off, a declared length
that is a lie, a slow reader) write their own bytes, and do not use this.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import ssl
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

from twisted.internet.testing import StringTransport

HeadersIn = Mapping | Iterable[tuple] | None


class Headers(Mapping):
    """
    An answer's headers: a name looks up in any case; a name sent more than
    once is an error to look up as one value (L{all} gives every value).
    """

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._pairs = [(name.lower(), value) for name, value in pairs]

    def all(self, name: str) -> list[str]:
        return [value for key, value in self._pairs if key == name.lower()]

    def __getitem__(self, name: str) -> str:
        values = self.all(name)
        if not values:
            raise KeyError(name)
        assert len(values) == 1, f"{name} is sent {len(values)} times: {values}"
        return values[0]

    def __contains__(self, name) -> bool:
        return bool(self.all(name))

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(key for key, _ in self._pairs))

    def __len__(self) -> int:
        return len(dict.fromkeys(key for key, _ in self._pairs))

    def __repr__(self) -> str:
        return f"Headers({self._pairs!r})"


class Response(NamedTuple):
    """
    One answer.  C{response["etag"]} is a header (C{None} when absent);
    an index or a slice is the tuple's.
    """

    status: int
    headers: Headers
    body: bytes

    def json(self):
        """
        The body as JSON; C{None} for an empty body.
        """
        return json.loads(self.body) if self.body else None

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.headers.get(key)
        return tuple.__getitem__(self, key)


def _pairs(headers: HeadersIn) -> list[tuple]:
    if headers is None:
        return []
    if isinstance(headers, Mapping):
        return list(headers.items())
    return list(headers)


def _text(value) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def _read(response: http.client.HTTPResponse) -> Response:
    body = response.read()
    return Response(response.status, Headers(response.getheaders()), body)


# -- a live server ------------------------------------------------------------------


class Connection:
    """
    One connection to the server of C{url} (its scheme, host and port), on
    which requests are asked one after another.
    """

    def __init__(self, url: str, timeout: float = 30, context=None) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "https":
            self._connection = http.client.HTTPSConnection(
                parts.hostname, parts.port, timeout=timeout, context=context)
        else:
            self._connection = http.client.HTTPConnection(parts.hostname, parts.port,
                                                          timeout=timeout)

    def request(self, method: str, target: str, headers: HeadersIn = None,
                body=None) -> Response:
        """
        Ask C{method} C{target} (a path and query), and read the whole answer.
        """
        pairs = [(_text(k), _text(v)) for k, v in _pairs(headers)]
        chunked = any(k.lower() == "transfer-encoding" and "chunked" in v.lower()
                      for k, v in pairs)
        self._connection.request(method, target, body=body, headers=dict(pairs),
                                 encode_chunked=chunked)
        return _read(self._connection.getresponse())

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def request(url: str, method: str = "GET", headers: HeadersIn = None, body=None, *,
            timeout: float = 30, context=None) -> Response:
    """
    The answer to one request for C{url}, on a connection of its own that
    it asks to close (C{Connection: close}, unless C{headers} say otherwise).
    C{body}: bytes, a file, or an iterable of bytes (sent chunked).
    """
    parts = urllib.parse.urlsplit(url)
    target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    pairs = _pairs(headers)
    if not any(_text(k).lower() == "connection" for k, _ in pairs):
        pairs.append(("Connection", "close"))
    with Connection(url, timeout, context) as connection:
        return connection.request(method, target, pairs, body)


def status_line(url: str, headers: HeadersIn = None, *, host=None, context=None,
                timeout: float = 30) -> str:
    """
    The status line of the answer to a GET of C{url} (C{Host}: C{host}, or
    the URL's), read as it comes: for an answer that has no end, such as a
    WebSocket upgrade's 101.
    """
    parts = urllib.parse.urlsplit(url)
    target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    head = request_bytes("GET", target, headers, host=host or parts.netloc, close=False)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as raw:
        sock = raw
        if parts.scheme in ("https", "wss"):
            sock = (context or ssl.create_default_context()).wrap_socket(
                raw, server_hostname=parts.hostname)
        with sock:
            sock.sendall(head)
            answer = b""
            while b"\r\n" not in answer:
                data = sock.recv(4096)
                if not data:
                    break
                answer += data
    return answer.split(b"\r\n", 1)[0].decode()


def upgrade_headers(origin: str | None = None) -> list[str]:
    """
    A browser's WebSocket upgrade request's headers (RFC 6455's example
    key, whose accept is C{s3pPLMBiTxaQ9kYGzzhZRbK+xOo=}), with C{Origin}
    unless C{origin} is C{None}.
    """
    headers = ["Upgrade: websocket", "Connection: Upgrade",
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"]
    return headers + ([f"Origin: {origin}"] if origin is not None else [])


# -- capsule's Site in memory --------------------------------------------------------


def request_bytes(method="GET", target="/", headers: HeadersIn = None, body: bytes | None = None,
                  *, host="capsule", close: bool = True) -> bytes:
    """
    The bytes of an HTTP/1.1 request: C{Host} (unless C{host} is C{None}),
    C{Connection: close} (with C{close}), then C{headers} (pairs, a
    mapping, or whole header lines: a C{Connection} among them comes last,
    and wins), and, for a C{body} whose length they do not give, its
    C{Content-Length}.
    """
    lines = [f"{_text(method)} {_text(target)} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {_text(host)}")
    if close:
        lines.append("Connection: close")
    for header in _pairs(headers):
        lines.append(_text(header) if isinstance(header, (bytes, str))
                     else f"{_text(header[0])}: {_text(header[1])}")
    names = {line.split(":", 1)[0].strip().lower() for line in lines[1:]}
    if body is not None and not names & {"content-length", "transfer-encoding"}:
        lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + (body or b"")


def send(site, method="GET", target="/", headers: HeadersIn = None, body: bytes | None = None,
         *, host="capsule", close: bool = True, peer=None, local=None,
         transport_class=StringTransport) -> StringTransport:
    """
    Write a request into a new channel of C{site}, from C{peer} to C{local}
    (the transport's own addresses when C{None}); return its transport, of
    C{transport_class}, with C{channel} the channel.
    """
    addresses = {name: address for name, address in (("peerAddress", peer),
                                                      ("hostAddress", local))
                 if address is not None}
    transport = transport_class(**addresses)
    channel = site.buildProtocol(None)
    transport.channel = channel
    channel.makeConnection(transport)
    channel.dataReceived(request_bytes(method, target, headers, body, host=host, close=close))
    return transport


def answered(transport: StringTransport, method="GET", what: str = "", clock=None) -> Response:
    """
    The answer C{transport} holds, which must be complete (the server
    closed the connection after it); with C{clock}, it may take up to 5 s
    of it, advanced in steps of 50 ms.
    """
    for _ in range(100 if clock is not None else 0):
        if transport.disconnecting:
            break
        clock.advance(0.05)
    assert transport.disconnecting, f"no complete answer to {what or _text(method)}"
    return parse(transport.value(), method)


def ask(site, method="GET", target="/", headers: HeadersIn = None, body: bytes | None = None,
        *, clock=None, **options) -> Response:
    """
    The answer of C{site} to one request (see L{send} and L{answered}).
    """
    transport = send(site, method, target, headers, body, **options)
    return answered(transport, method, f"{_text(method)} {_text(target)}", clock)


async def ask_later(site, method="GET", target="/", headers: HeadersIn = None,
                    body: bytes | None = None, **options) -> Response:
    """
    The answer of C{site} to one request that the global reactor finishes
    (Twisted sends a file through its global cooperator): it may take 10 s.
    """
    from twisted.internet import reactor, task

    transport = send(site, method, target, headers, body, **options)
    deadline = reactor.seconds() + 10
    while not transport.disconnecting and reactor.seconds() < deadline:
        await task.deferLater(reactor, 0.001, lambda: None)
    return answered(transport, method, f"{_text(method)} {_text(target)}")


def parse(raw: bytes, method="GET") -> Response:
    """
    The answer in C{raw}, the bytes a server wrote for a C{method} request.
    """
    class Socket:
        def makefile(self, mode):
            return io.BytesIO(raw)
    response = http.client.HTTPResponse(Socket(), method=_text(method))
    response.begin()
    return _read(response)


def raw_websocket(port: int, timeout: float = 10) -> "socket.socket":
    """
    A raw WebSocket to capsule's /ws on loopback: the upgrade done (its 101
    read), nothing read after; for clients that misbehave on purpose.
    """
    import base64
    import os
    import socket
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"capsule closed the upgrade: {head!r}")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"capsule refused the upgrade: {head[:200]!r}")
    return sock
