"""
Which Host names and Origins capsule accepts, and the security headers of
its responses: the policy alone, then the real Site in memory (requests
over a StringTransport, as in test_web.py), the WebSocket handshake over
Twisted's in-memory transports, and the options that configure them.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.test import iosim
from zope.interface import implementer

from capsule.core.spec import ContainerSpec
from capsule.web.headers import GuardResource, HostPolicy, parse_host, parse_origin
from capsule.sessions.manager import SessionManager
from capsule.sessions.session import SessionConfig
from capsule.tap import Options, makeService
from tests.support.fakes import FakeDockerAPI
from tests.support.httpclient import Response, parse, request_bytes, send, upgrade_headers
from capsule.web.site import make_site
from capsule.web.websocket_factory import CapsuleServerFactory

LOOPBACK = IPv4Address("TCP", "127.0.0.1", 3001)
LAN = IPv4Address("TCP", "192.0.2.5", 3001)
CLIENT = IPv4Address("TCP", "192.0.2.77", 40000)


def policy(**kwargs) -> HostPolicy:
    kwargs.setdefault("hostnames", {"capsule-host"})
    return HostPolicy(**kwargs)


# -- parsing ---------------------------------------------------------------------


@pytest.mark.parametrize("value, parsed", [
    ("http://127.0.0.1:3001", ("http", "127.0.0.1", 3001)),
    ("HTTP://LocalHost", ("http", "localhost", 80)),
    ("https://a.example/", ("https", "a.example", 443)),
    ("wss://a.example:8443", ("https", "a.example", 8443)),
    ("http://[::1]:3001", ("http", "::1", 3001)),
    ("null", None),
    ("", None),
    ("file:///etc/passwd", None),
    ("http://a.example/path", None),
    ("http://a.example:99999", None),
    ("http://user@a.example", None),
    ("http://a;b.example", None),
])
def test_parse_origin(value, parsed):
    assert parse_origin(value) == parsed


@pytest.mark.parametrize("value, parsed", [
    ("localhost:3001", ("localhost", 3001)),
    ("localhost", ("localhost", 80)),
    ("[::1]:3001", ("::1", 3001)),
    ("capsule.example.:3001", ("capsule.example", 3001)),
    ("a.example:x", None),
    ("a.example/x", None),
    ("x; script-src *", None),
    ("", None),
])
def test_parse_host(value, parsed):
    assert parse_host(value, 80) == parsed


# -- Host -------------------------------------------------------------------------


@pytest.mark.parametrize("host, local, allowed", [
    # A loopback listener answers to loopback names, on any port (a forwarded one).
    ("127.0.0.1:3001", LOOPBACK, True),
    ("localhost:3001", LOOPBACK, True),
    ("LOCALHOST:3001", LOOPBACK, True),
    ("[::1]:3001", IPv6Address("TCP", "::1", 3001), True),
    ("127.0.0.1:3001", IPv6Address("TCP", "::ffff:127.0.0.1", 3001), True),
    ("localhost:8080", LOOPBACK, True),
    # DNS rebinding: the attacker's name, resolving to 127.0.0.1.
    ("evil.example:3001", LOOPBACK, False),
    ("evil.example", LOOPBACK, False),
    ("127.0.0.1.evil.example:3001", LOOPBACK, False),
    # On an interface: its address and the machine's name.
    ("192.0.2.5:3001", LAN, True),
    ("192.0.2.5:3001", IPv6Address("TCP", "::ffff:192.0.2.5", 3001), True),
    ("capsule-host:3001", LAN, True),
    ("192.0.2.6:3001", LAN, False),
    ("localhost:3001", LAN, False),
    ("127.0.0.1:3001", LAN, False),
    ("evil.example:3001", LAN, False),
    # A UNIX socket is a proxy on this machine.
    ("localhost", UNIXAddress(b"/run/capsule.sock"), True),
    ("evil.example", UNIXAddress(b"/run/capsule.sock"), False),
    # No browser sends no Host, nor a malformed one.
    (None, LAN, True),
    ("a.example/x", LAN, False),
])
def test_host_against_the_listening_address(host, local, allowed):
    assert policy().host_allowed(host, local, secure=False) is allowed


def test_allowed_hosts():
    p = policy(allowed_hosts=["Capsule.Example"])
    assert p.host_allowed("capsule.example:3001", LAN, False)
    assert p.host_allowed("capsule.example", LOOPBACK, False)
    assert not p.host_allowed("other.example:3001", LAN, False)


def test_host_against_the_public_url():
    p = policy(public_url="https://capsule.example")
    assert p.host_allowed("capsule.example", LAN, True)
    assert p.host_allowed("capsule.example:443", LAN, True)
    # Behind a proxy ending TLS, the listener is plain: the port is the URL's.
    assert p.host_allowed("capsule.example", LAN, False)
    assert p.host_allowed("capsule.example:443", LAN, False)
    assert not p.host_allowed("capsule.example:80", LAN, False)
    assert not p.host_allowed("capsule.example:3001", LAN, True)
    assert not p.host_allowed("evil.example", LAN, True)
    # The listener's own address and name are not the public URL's.
    assert not p.host_allowed("192.0.2.5:3001", LAN, True)
    assert not p.host_allowed("capsule-host:3001", LAN, True)
    # A check from this machine, or a local proxy that does not pass Host on.
    assert p.host_allowed("localhost:3001", LOOPBACK, False)
    assert not p.host_allowed("evil.example:3001", LOOPBACK, False)


def test_a_public_url_must_be_an_origin():
    with pytest.raises(ValueError):
        HostPolicy(public_url="capsule.example")
    with pytest.raises(ValueError):
        HostPolicy(public_url="ftp://capsule.example")
    # Under a path, behind a proxy: the origin has none.
    assert HostPolicy(public_url="https://capsule.example:8443/capsule/").public_origin \
        == ("https", "capsule.example", 8443)


# -- Origin ------------------------------------------------------------------------


@pytest.mark.parametrize("origin, host, secure, allowed", [
    (None, "localhost:3001", False, True),
    ("http://localhost:3001", "localhost:3001", False, True),
    ("http://LOCALHOST:3001/", "localhost:3001", False, True),
    ("http://127.0.0.1:3001", "127.0.0.1:3001", False, True),
    ("http://localhost", "localhost:80", False, True),
    ("https://localhost:3443", "localhost:3443", True, True),
    # The scheme counts: an https page is not the origin of an http server.
    ("https://localhost:3001", "localhost:3001", False, False),
    ("http://localhost:3443", "localhost:3443", True, False),
    # So does the port, and the host.
    ("http://localhost:3002", "localhost:3001", False, False),
    ("http://127.0.0.1:3001", "localhost:3001", False, False),
    ("https://evil.example", "localhost:3001", False, False),
    ("null", "localhost:3001", False, False),
])
def test_origin_is_the_pages_own(origin, host, secure, allowed):
    assert policy().origin_allowed(origin, host, secure) is allowed


def test_allowed_origins():
    p = policy(allowed_origins=["https://proxy.example/", "http://b.example:8080"])
    assert p.origin_allowed("https://proxy.example", "localhost:3001", False)
    assert p.origin_allowed("https://proxy.example:443", "localhost:3001", False)
    assert p.origin_allowed("http://b.example:8080", "localhost:3001", False)
    assert not p.origin_allowed("http://proxy.example", "localhost:3001", False)
    assert not p.origin_allowed("http://b.example", "localhost:3001", False)
    assert policy(allowed_origins=["*"]).origin_allowed("https://evil.example", "x", False)


def test_the_public_url_is_the_pages_origin():
    p = policy(public_url="https://capsule.example/")
    assert p.origin_allowed("https://capsule.example", "localhost:3001", False)
    assert not p.origin_allowed("http://capsule.example", "capsule.example", False)
    assert not p.origin_allowed("http://localhost:3001", "localhost:3001", False)


def test_hsts_under_tls_or_an_https_public_url():
    assert policy().hsts(True) and not policy().hsts(False)
    assert policy(public_url="https://capsule.example").hsts(False)
    assert not policy(public_url="http://capsule.example").hsts(False)


# -- the site, in memory -------------------------------------------------------------


@pytest.fixture
def www(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_bytes(b"<!doctype html><title>capsule</title>")
    return www


@implementer(ISSLTransport)
class TLSStringTransport(StringTransport):
    """
    A StringTransport that says it is TLS, as an ssl: listener's is.
    """

    def setTcpNoDelay(self, enabled):
        pass

    def getPeerCertificate(self):
        return None


class Site:
    def __init__(self, www, host_policy) -> None:
        self.reactor = MemoryReactorClock()
        docker = FakeDockerAPI()
        self.manager = SessionManager(docker, self.reactor, SessionConfig(
            spec=ContainerSpec(image="capsule-runtime:latest"), instance="headers-test"))
        self.site = make_site(self.manager, docker, self.reactor, str(www),
                              host_policy=host_policy)

    def request(self, path: bytes = b"/health", *, host: bytes | None = b"127.0.0.1:3001",
                method: bytes = b"GET", headers: tuple[bytes, ...] = (), local=LOOPBACK,
                secure: bool = False) -> Response:
        transport = send(self.site, method, path, headers, host=host, peer=CLIENT, local=local,
                         transport_class=TLSStringTransport if secure else StringTransport)
        return parse(transport.value(), method)


@pytest.fixture
def logged():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def _messages(events) -> list[str]:
    from twisted.logger import formatEvent
    return [formatEvent(e) for e in events if "log_format" in e]


def test_every_answer_has_the_headers(www):
    site = Site(www, policy())
    # A missing file and a refused export id too, not only the page.
    for path in (b"/api/export/x", b"/nothing", b"/api/export/"):
        status, headers, _ = site.request(path)
        assert status == 404
        csp = headers["content-security-policy"]
        # An export's answer may be framed by the page's own origin only
        # (the page reads a failed export's message through a hidden frame).
        export = path.startswith(b"/api/export/")
        assert f"frame-ancestors '{'self' if export else 'none'}'" in csp
        assert "script-src 'self' 'wasm-unsafe-eval';" in csp
        assert "connect-src 'self' ws://127.0.0.1:3001;" in csp
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
        assert headers["x-frame-options"] == ("SAMEORIGIN" if export else "DENY")
        assert "strict-transport-security" not in headers


def test_hsts_under_tls(www):
    site = Site(www, policy())
    status, headers, _ = site.request(b"/nothing", host=b"127.0.0.1:3443", secure=True)
    assert status == 404
    assert headers["strict-transport-security"] == "max-age=31536000"
    assert "connect-src 'self' wss://127.0.0.1:3443;" in headers["content-security-policy"]
    site = Site(www, policy(public_url="https://capsule.example"))
    # Behind a proxy ending TLS: a plain listener, the public URL's Host.
    status, headers, _ = site.request(b"/nothing", host=b"capsule.example", local=LAN)
    assert status == 404
    assert headers["strict-transport-security"] == "max-age=31536000"
    assert "connect-src 'self' wss://capsule.example:443;" in headers["content-security-policy"]


def test_a_rebinding_host_is_refused(www, logged):
    site = Site(www, policy())
    status, headers, body = site.request(b"/", host=b"evil.example:3001")
    assert status == 421
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {
        "error": "this server does not answer to the name evil.example:3001",
        "code": "host_not_allowed"}
    assert headers["x-content-type-options"] == "nosniff"
    assert "refused a request for host evil.example:3001 (peer 192.0.2.77)" in _messages(logged)


def test_a_rebinding_websocket_upgrade_is_refused_with_403(www):
    site = Site(www, policy())
    status, _, body = site.request(b"/ws", host=b"evil.example:3001", headers=(
        b"Upgrade: websocket", b"Connection: Upgrade", b"Sec-WebSocket-Version: 13",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", b"Origin: http://evil.example:3001"))
    assert status == 403
    assert json.loads(body)["code"] == "host_not_allowed"


def test_the_page_is_served_for_its_own_host(www):
    site = Site(www, policy())
    status, _, body = site.request(b"/health", host=b"localhost:3001")
    # The health check waits on the (fake) engine: it is past the guard.
    assert status != 421
    status, _, _ = site.request(b"/nothing", host=b"192.0.2.5:3001", local=LAN)
    assert status == 404


def test_a_state_changing_request_from_another_origin_is_refused(www, logged):
    site = Site(www, policy())
    status, headers, body = site.request(b"/health", method=b"POST", headers=(
        b"Origin: https://evil.example", b"Content-Length: 0"))
    assert status == 403
    assert json.loads(body) == {"error": "origin https://evil.example is not allowed",
                                "code": "origin_not_allowed"}
    assert ("refused a POST from origin https://evil.example (peer 192.0.2.77)"
            in _messages(logged))
    # The same scheme, host and port as the page: past the guard (to the
    # resource, which answers GET only).
    status, _, _ = site.request(b"/nothing", method=b"POST", headers=(
        b"Origin: http://127.0.0.1:3001", b"Content-Length: 0"))
    assert status == 404
    # No Origin: not a browser.
    status, _, _ = site.request(b"/nothing", method=b"DELETE", headers=(b"Content-Length: 0",))
    assert status == 404
    # A GET changes nothing, whatever its Origin.
    status, _, _ = site.request(b"/nothing", headers=(b"Origin: https://evil.example",))
    assert status == 404


def test_a_site_built_without_a_policy_checks_no_host(www):
    site = Site(www, None)
    status, headers, _ = site.request(b"/nothing", host=b"capsule")
    assert status == 404
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert isinstance(site.site.resource, GuardResource)


# -- the WebSocket handshake --------------------------------------------------------


def handshake(factory, host: str, origin: str | None, local=LOOPBACK):
    server = factory.buildProtocol(CLIENT)
    transport = iosim.FakeTransport(server, True, local, CLIENT)
    server.makeConnection(transport)
    server.dataReceived(request_bytes("GET", "/ws", upgrade_headers(origin), host=host,
                                      close=False))
    answer = transport.getOutBuffer()
    return answer.split(b"\r\n", 1)[0].decode()


@pytest.mark.parametrize("host, origin, local, line", [
    ("127.0.0.1:3001", "http://127.0.0.1:3001", LOOPBACK, "HTTP/1.1 101 Switching Protocols"),
    ("127.0.0.1:3001", None, LOOPBACK, "HTTP/1.1 101 Switching Protocols"),
    ("evil.example:3001", "http://evil.example:3001", LOOPBACK,
     "HTTP/1.1 403 host evil.example:3001 is not allowed"),
    # Not a browser, but still a name that is not capsule's.
    ("evil.example:3001", None, LOOPBACK,
     "HTTP/1.1 403 host evil.example:3001 is not allowed"),
    ("127.0.0.1:3001", "https://127.0.0.1:3001", LOOPBACK,
     "HTTP/1.1 403 origin https://127.0.0.1:3001 is not allowed"),
    ("127.0.0.1:3001", "http://127.0.0.1:3002", LOOPBACK,
     "HTTP/1.1 403 origin http://127.0.0.1:3002 is not allowed"),
    ("192.0.2.5:3001", "http://192.0.2.5:3001", LAN, "HTTP/1.1 101 Switching Protocols"),
    ("localhost:3001", "http://localhost:3001", LAN,
     "HTTP/1.1 403 host localhost:3001 is not allowed"),
])
def test_handshake(host, origin, local, line):
    manager = SessionManager(FakeDockerAPI(), Clock(), SessionConfig(
        spec=ContainerSpec(image="capsule-runtime:latest"), instance="headers-test"))
    factory = CapsuleServerFactory(manager, Clock(), host_policy=policy())
    assert handshake(factory, host, origin, local) == line
    assert manager.sessions == {}


def test_handshake_over_tls_wants_an_https_origin():
    manager = SessionManager(FakeDockerAPI(), Clock(), SessionConfig(
        spec=ContainerSpec(image="capsule-runtime:latest"), instance="headers-test"))
    factory = CapsuleServerFactory(manager, Clock(), host_policy=policy())
    tls = TLSStringTransport(hostAddress=LOOPBACK, peerAddress=CLIENT)
    assert factory.handshake_refusal("https://localhost:3443", "localhost:3443", tls) is None
    assert factory.handshake_refusal("http://localhost:3443", "localhost:3443", tls) \
        == "origin http://localhost:3443 is not allowed"
    assert factory.handshake_refusal(None, "evil.example:3443", tls) \
        == "host evil.example:3443 is not allowed"


# -- options ---------------------------------------------------------------------------


def test_allowed_host_and_origin_options_reach_the_policy():
    config = Options()
    config.parseOptions(["-l", "tcp:0:interface=127.0.0.1", "--allowed-host", "capsule.example",
                         "--allowed-host", "other.example", "--allowed-origin",
                         "https://proxy.example"])
    service = makeService(config, MemoryReactorClock())
    p = service.websocket_factory.host_policy
    assert p.allowed_hosts == {"capsule.example", "other.example"}
    assert p.allowed_origins == {("https", "proxy.example", 443)}
    assert p.check_hosts
    site = service.listeners.services[0].factory
    assert site.resource.policy is p


def test_an_empty_allowed_host_is_a_usage_error():
    from twisted.python import usage
    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--allowed-host", " "])
