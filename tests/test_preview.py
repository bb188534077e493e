"""
Previews, in memory: which requests are a preview's (path and host forms),
the head the app gets (capsule's cookies and credentials stripped, its own
forwarded headers), the answer's head, who may open a preview (public
ports, links, tickets, grants), and a preview's request taken out of the
site at its headers: its body is never spooled, and it is spliced to the
session's port with each side the other's producer.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from capsule.core.preview_access import PreviewAccess
from capsule.core.shares import ShareRefused
from capsule.web.preview import (PreviewRefused, Target, answer_head, domain_name,
                                 forward_head, target_of)
from tests.support.httpclient import parse
from tests.test_web import Web, www  # noqa: F401  (the fixture)

SID = "0f6c1d2e-3a4b-4c5d-8e9f-0a1b2c3d4e5f"
OTHER = "11111111-2222-4333-8444-555555555555"


# -- routing ----------------------------------------------------------------------------

def test_a_preview_path_names_a_session_and_a_port():
    found = target_of("capsule.example", f"/preview/{SID}/3000/a/b?c=1".encode(), None)
    assert found == Target(SID, 3000, "path", f"/preview/{SID}/3000", b"/a/b?c=1")
    assert target_of(None, f"/preview/{SID}/3000".encode(), None).rest == b""
    assert target_of("x", b"/api/sessions", None) is None
    assert target_of("x", b"/previews", None) is None
    for bad in (b"/preview/", b"/preview/nope/3000/", f"/preview/{SID}/0/".encode(),
                f"/preview/{SID}/65536/".encode(), f"/preview/{SID}/03000/".encode(),
                f"/preview/{SID}/x/".encode(), f"/preview/{SID.upper()}/3000/".encode()):
        refused = target_of("x", bad, None)
        assert isinstance(refused, PreviewRefused) and refused.status == 404, bad


def test_under_a_domain_the_host_names_the_preview_before_the_path():
    domain = "preview.example"
    found = target_of(f"3000-{SID}.preview.example", b"/preview/x?y", domain)
    assert found == Target(SID, 3000, "host", "", b"/preview/x?y")
    assert target_of(f"3000-{SID}.PREVIEW.example:443", b"/", domain).port == 3000
    # Another name, or no preview's label: capsule's own site.
    assert target_of("capsule.example", b"/", domain) is None
    assert target_of(f"x-{SID}.preview.example", b"/", domain) is None
    assert target_of(f"3000-{SID}.preview.example.evil", b"/", domain) is None
    # A domain given with the port browsers reach it on.
    assert domain_name("preview.test:8080") == "preview.test"
    found = target_of(f"80-{SID}.preview.test:8080", b"/", "preview.test:8080")
    assert (found.session_id, found.port) == (SID, 80)


# -- the heads --------------------------------------------------------------------------

def _head(headers, **kwargs) -> str:
    options = dict(prefix=f"/preview/{SID}/3000", client="203.0.113.7", proto="https",
                   host="capsule.example", upgrade=False)
    options.update(kwargs)
    return forward_head(b"POST", b"/submit?x=1", b"HTTP/1.1", headers, **options).decode()


def test_the_app_gets_no_credential_of_capsules():
    head = _head([
        (b"Host", b"capsule.example"),
        (b"Cookie", b"capsule_session=LOGIN; theme=dark; capsule_preview=GRANT; a=b"),
        (b"Authorization", b"Bearer TOKEN"), (b"Proxy-Authorization", b"Basic x"),
        (b"X-Remote-User", b"alice"), (b"X-Forwarded-For", b"6.6.6.6"),
        (b"Forwarded", b"for=6.6.6.6"), (b"X-Real-IP", b"6.6.6.6"),
        (b"Keep-Alive", b"300"), (b"Connection", b"keep-alive"),
        (b"Content-Length", b"5"), (b"X-Evil", b"a\r\nInjected: 1"),
    ], dropped=[b"X-Remote-User"])
    assert head.startswith("POST /submit?x=1 HTTP/1.1\r\nHost: capsule.example\r\n")
    for secret in ("LOGIN", "GRANT", "TOKEN", "alice", "6.6.6.6", "Basic", "Keep-Alive",
                   "Injected"):
        assert secret not in head, secret
    assert "Cookie: theme=dark; a=b\r\n" in head and "Content-Length: 5\r\n" in head
    assert head.endswith("X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n"
                         "X-Forwarded-Host: capsule.example\r\n"
                         f"X-Forwarded-Prefix: /preview/{SID}/3000\r\n"
                         "Connection: close\r\n\r\n")


def test_only_capsules_cookies_leave_and_an_empty_cookie_header_goes():
    head = _head([(b"Cookie", b"capsule_session=x; capsule_preview=y")])
    assert "Cookie" not in head


def test_an_upgrade_keeps_its_connection_and_the_host_form_has_no_prefix():
    head = _head([(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")], upgrade=True,
                 prefix="")
    assert "Upgrade: websocket\r\n" in head and head.endswith("Connection: upgrade\r\n\r\n")
    assert "X-Forwarded-Prefix" not in head


def test_the_answer_closes_and_cannot_set_capsules_cookies():
    head = answer_head(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n"
                       b"Keep-Alive: timeout=5\r\nSet-Cookie: app=1; Path=/\r\n"
                       b"Set-Cookie: capsule_session=evil; Path=/\r\n"
                       b"set-cookie:  capsule_preview=evil\r\n"
                       b"Service-Worker-Allowed: /", path_form=True)
    assert head == (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nSet-Cookie: app=1; Path=/\r\n"
                    b"Connection: close\r\n\r\n")
    kept = answer_head(b"HTTP/1.1 200 OK\r\nService-Worker-Allowed: /", path_form=False)
    assert b"Service-Worker-Allowed" in kept
    switching = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade"
    assert answer_head(switching, path_form=True) == switching + b"\r\n\r\n"


# -- who may open a preview -------------------------------------------------------------

def test_a_port_made_public_and_closed_again():
    access = PreviewAccess(Clock())
    assert not access.is_public(SID, 3000)
    access.set_public(SID, 3000, True)
    assert access.is_public(SID, 3000) and not access.is_public(SID, 3001)
    access.set_public(SID, 3000, False)
    assert not access.is_public(SID, 3000)


def test_a_link_is_for_one_port_and_its_grant_dies_with_it():
    clock = Clock()
    access = PreviewAccess(clock)
    share, token = access.share(SID, 3000, ttl=100)
    assert access.link(SID, 3000, token) is share
    assert access.link(SID, 3001, token) is None and access.link(OTHER, 3000, token) is None
    grant = access.grant(SID, 3000, share=share)
    assert access.granted(SID, 3000, grant).share_id == share.id
    assert access.granted(SID, 3001, grant) is None
    assert access.granted(SID, 3000, grant + "x") is None
    assert access.granted(SID, 3000, None) is None
    # Revoked: the link and its grants.
    assert access.revoke(SID, 3000, share.id)
    assert access.granted(SID, 3000, grant) is None and access.link(SID, 3000, token) is None
    assert not access.revoke(SID, 3000, share.id)
    # Expired: its grant does not outlive it.
    share, token = access.share(SID, 3000, ttl=10)
    grant = access.grant(SID, 3000, share=share)
    clock.advance(10)
    assert access.granted(SID, 3000, grant) is None and access.link(SID, 3000, token) is None
    with pytest.raises(ShareRefused):
        access.share(SID, 3000, ttl=10**9)


def test_a_ticket_is_traded_once_for_its_own_port_within_a_minute():
    clock = Clock()
    access = PreviewAccess(clock)
    ticket = access.ticket(SID, 3000, "alice")
    assert access.redeem(SID, 3001, ticket) is None
    # A wrong port used it up: tickets are single use, whatever the answer.
    ticket = access.ticket(SID, 3000, "alice")
    grant = access.redeem(SID, 3000, ticket)
    assert access.granted(SID, 3000, grant).user == "alice"
    assert access.redeem(SID, 3000, ticket) is None
    late = access.ticket(SID, 3000, "alice")
    clock.advance(61)
    assert access.redeem(SID, 3000, late) is None
    assert access.redeem(SID, 3000, "x" * 1000) is None
    # An owner's grant lasts its time, then goes.
    clock.advance(access.grant_ttl)
    assert access.granted(SID, 3000, grant) is None


def test_a_sessions_end_forgets_everything_of_it():
    access = PreviewAccess(Clock())
    access.set_public(SID, 3000, True)
    share, token = access.share(SID, 3000)
    grant = access.grant(SID, 3000, user="alice")
    ticket = access.ticket(SID, 3000, "alice")
    kept, kept_token = access.share(OTHER, 3000)
    access.drop_session(SID)
    assert not access.is_public(SID, 3000) and access.link(SID, 3000, token) is None
    assert access.granted(SID, 3000, grant) is None and access.redeem(SID, 3000, ticket) is None
    assert access.link(OTHER, 3000, kept_token) is kept


# -- a preview's request leaves the site at its headers ------------------------------------

def _open(web):
    peer = IPv4Address("TCP", "192.0.2.1", 40001)
    connection = web.site.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer,
                                hostAddress=IPv4Address("TCP", "127.0.0.1", 3001))
    connection.makeConnection(transport)
    return connection, transport


def test_a_previews_body_is_never_spooled_nor_refused_for_its_size(www, monkeypatch):  # noqa: F811
    import twisted.web.http as http
    made = []
    monkeypatch.setattr(http, "_getContentFile", lambda length: made.append(length))
    web = Web(www)
    connection, transport = _open(web)
    connection.dataReceived(f"POST /preview/{SID}/3000/upload HTTP/1.1\r\nHost: x\r\n"
                            "Content-Length: 10000000000\r\n\r\n".encode() + b"x" * 100_000)
    status, headers, body = parse(transport.value())
    # Not 413: the preview decides (no such session), from the headers.
    assert status == 404 and json.loads(body)["code"] == "session_not_found"
    assert headers["connection"] == "close"
    connection.dataReceived(b"x" * 100_000)
    assert made == [] and web.site.bodies.held == 0
    assert transport.value().count(b"HTTP/1.1 ") == 1


def test_the_rest_of_the_site_is_untouched(www):  # noqa: F811
    web = Web(www)
    connection, transport = _open(web)
    connection.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, _ = parse(transport.value())
    assert status in (200, 503)


class _Session:
    def __init__(self, user=None) -> None:
        from twisted.internet.defer import Deferred
        self.id, self.over, self.container_id, self.ready = SID, False, "c1", True
        self.core = type("Core", (), {"user": user})()
        self._ended = Deferred()

    def ended(self):
        return self._ended


def test_a_preview_is_spliced_to_the_port_with_each_side_pausing_the_other(www):  # noqa: F811
    web = Web(www)
    session = _Session()
    web.manager.sessions[SID] = session
    router = web.site.previews

    async def address(session):
        return "172.18.0.5"
    router.address = address
    connection, client = _open(web)
    connection.dataReceived(f"PUT /preview/{SID}/3000/up HTTP/1.1\r\nHost: x\r\n"
                            "Cookie: capsule_session=LOGIN\r\nContent-Length: 10\r\n\r\n"
                            "hello".encode())
    host, port, factory, timeout, _ = web.reactor.tcpClients[-1]
    assert (host, port) == ("172.18.0.5", 3000)
    upstream = StringTransport()
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    protocol.makeConnection(upstream)
    sent = upstream.value()
    assert sent.startswith(b"PUT /up HTTP/1.1\r\n") and b"LOGIN" not in sent
    assert sent.endswith(b"Connection: close\r\n\r\nhello")
    # The rest of the body goes on raw, as it comes.
    connection.dataReceived(b"world")
    assert upstream.value().endswith(b"\r\n\r\nhelloworld")
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n")
    assert client.value() == b""
    protocol.dataReceived(b"\r\nok")
    assert client.value() == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    # A client that reads slowly pauses the session's side, and the other way.
    client.producer.pauseProducing()
    assert upstream.producerState == "paused"
    client.producer.resumeProducing()
    assert upstream.producerState == "producing"
    upstream.producer.pauseProducing()
    assert client.producerState == "paused"
    upstream.producer.resumeProducing()
    assert client.producerState == "producing"
    assert len(router.open[SID]) == 1
    # The session ends: so does the preview.
    session._ended.callback(session)
    assert upstream.disconnecting or upstream.disconnected
    assert client.disconnecting or client.disconnected
    assert SID not in router.open


def test_nothing_listening_is_a_clear_502(www):  # noqa: F811
    from twisted.internet.error import ConnectionRefusedError
    web = Web(www)
    web.manager.sessions[SID] = _Session()

    async def address(session):
        return "172.18.0.5"
    web.site.previews.address = address
    connection, client = _open(web)
    connection.dataReceived(f"GET /preview/{SID}/3000/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    connector = web.reactor.connectors[-1]
    factory = web.reactor.tcpClients[-1][2]
    factory.clientConnectionFailed(connector, ConnectionRefusedError())
    status, _, body = parse(client.value())
    assert status == 502 and json.loads(body) == {
        "error": "nothing listens on port 3000 in this session", "code": "nothing_listening"}
    assert SID not in web.site.previews.open


def test_a_session_still_starting_is_a_503(www):  # noqa: F811
    web = Web(www)
    session = web.manager.sessions[SID] = _Session()
    session.ready = False
    connection, client = _open(web)
    connection.dataReceived(f"GET /preview/{SID}/3000/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    status, headers, body = parse(client.value())
    assert status == 503 and json.loads(body)["code"] == "starting"
    assert headers["retry-after"] == "2"


def test_a_session_without_a_network_says_so(www):  # noqa: F811
    web = Web(www)
    web.manager.sessions[SID] = _Session()

    async def address(session):
        return None
    web.site.previews.address = address
    connection, client = _open(web)
    connection.dataReceived(f"GET /preview/{SID}/3000/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    status, _, body = parse(client.value())
    assert status == 502 and json.loads(body)["code"] == "no_network"
    assert "has no network" in json.loads(body)["error"]


def _spliced(web, cookie: str | None = None):
    """
    A preview request of port 3000 of the fake session, connected upstream.
    """
    connection, client = _open(web)
    extra = f"Cookie: capsule_preview={cookie}\r\n" if cookie else ""
    connection.dataReceived(f"GET /preview/{SID}/3000/ HTTP/1.1\r\nHost: x\r\n{extra}"
                            "\r\n".encode())
    host, port, factory, _, _ = web.reactor.tcpClients[-1]
    upstream = StringTransport()
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    protocol.makeConnection(upstream)
    return client, upstream, protocol


def _with_session(www, **limits):  # noqa: F811
    from capsule.web.preview import PreviewLimits
    web = Web(www)
    web.manager.sessions[SID] = _Session(user="alice")
    router = web.site.previews
    router.limits = PreviewLimits(**limits)

    async def address(session):
        return "172.18.0.5"
    router.address = address
    return web, router


def test_a_sessions_previews_hold_a_bounded_number_of_connections(www):  # noqa: F811
    web, router = _with_session(www, per_session=2)
    router.access.set_public(SID, 3000, True)
    first = _spliced(web)
    _spliced(web)
    connection, client = _open(web)
    connection.dataReceived(f"GET /preview/{SID}/3000/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    status, _, body = parse(client.value())
    assert status == 429 and json.loads(body)["code"] == "too_many_preview_connections"
    # One ends: room again.
    first[2].connectionLost(None)
    assert len(router.open[SID]) == 1
    _spliced(web)
    assert len(router.open[SID]) == 2


def test_a_revoked_link_closes_what_was_opened_through_it(www):  # noqa: F811
    web, router = _with_session(www)
    share, _ = router.access.share(SID, 3000, ttl=100)
    grant = router.access.grant(SID, 3000, share=share)
    client, upstream, _ = _spliced(web, cookie=grant)
    assert upstream.value().startswith(b"GET / HTTP/1.1")
    owner_grant = router.access.grant(SID, 3000, user="alice")
    other_client, other_upstream, _ = _spliced(web, cookie=owner_grant)
    assert router.access.revoke(SID, 3000, share.id)
    router.revoked(SID, 3000, share.id)
    assert client.disconnecting or client.disconnected
    assert not (other_client.disconnecting or getattr(other_client, "disconnected", False))


def test_a_preview_carries_at_most_its_bytes_per_second(www):  # noqa: F811
    web, router = _with_session(www, bytes_per_second=1000)
    router.access.set_public(SID, 3000, True)
    client, upstream, protocol = _spliced(web)
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 3000)
    # Over its second's worth: the session's side pauses, for as long as
    # the excess takes at the rate.
    assert upstream.producerState == "paused"
    web.reactor.advance(1.9)
    assert upstream.producerState == "paused"
    web.reactor.advance(0.2)
    assert upstream.producerState == "producing"


def test_a_grant_of_another_user_or_nobody_does_not_open_a_private_port(www):  # noqa: F811
    web, router = _with_session(www)
    connection, client = _open(web)
    connection.dataReceived(f"GET /preview/{SID}/3000/ HTTP/1.1\r\nHost: x\r\n"
                            "Cookie: capsule_preview=forged\r\n\r\n".encode())
    # No authenticator in this site: the caller is nobody, the owner alice.
    status, _, body = parse(client.value())
    assert status == 404 and json.loads(body)["code"] == "session_not_found"


# -- the operator's options -------------------------------------------------------------

def test_the_preview_options(tmp_path):
    from twisted.python import usage

    from tests.test_tap import parse
    config = parse("--preview-domain", "Preview.Example.", "--preview-connections-per-session",
                   "8", "--preview-bytes-per-second", "1000000").config
    assert (config.preview_domain, config.preview_connections_per_session,
            config.preview_bytes_per_second) == ("preview.example", 8, 1_000_000)
    assert parse().config.preview_domain is None
    assert parse("--preview-domain", "preview.test:8080").config.preview_domain == (
        "preview.test:8080")
    for bad in ("-x.example", "a..b", "preview.example:0", "preview.example:x", "a b"):
        with pytest.raises(usage.UsageError):
            parse("--preview-domain", bad)
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:" + "a" * 40 + "\n")
    # With users, a visitor logs in at capsule's own address: it must be known.
    with pytest.raises(usage.UsageError) as refused:
        parse("--tokens", str(tokens), "--preview-domain", "preview.example")
    assert "--public-url" in str(refused.value)
    assert parse("--tokens", str(tokens), "--preview-domain", "preview.example",
                 "--public-url", "https://capsule.example").config.preview_domain
    with pytest.raises(usage.UsageError):
        parse("--preview-connections-per-session", "0")


def test_a_client_gone_while_capsule_connects_frees_its_place(www):  # noqa: F811
    web, router = _with_session(www)
    router.access.set_public(SID, 3000, True)
    connection, client = _open(web)
    connection.dataReceived(f"GET /preview/{SID}/3000/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert len(router.open[SID]) == 1
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure
    connection.connectionLost(Failure(ConnectionDone()))
    assert SID not in router.open
    # The connection made meanwhile is closed at once.
    host, port, factory, _, _ = web.reactor.tcpClients[-1]
    upstream = StringTransport()
    factory.buildProtocol(IPv4Address("TCP", host, port)).makeConnection(upstream)
    assert upstream.disconnecting and upstream.value() == b""
