"""
The web front's HTTP toolkit (capsule.web.http) and the address decisions
under it (capsule.core.addresses): who a request comes from, behind trusted
proxies or not, and the JSON answers every resource gives.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.web.test.requesthelper import DummyRequest

from capsule.core.addresses import client_behind, is_loopback, is_trusted, parse_ip
from capsule.core.admission import parse_network
from capsule.web.http import ClientAddresses, Refusal, answer_json, client_address, \
    json_error, peer_address


# -- client addresses --------------------------------------------------------------------

def ws_request(peer: str, forwarded: str | None = None):
    # What Autobahn hands onConnect: a peer descriptor and lower-case headers.
    headers = {} if forwarded is None else {"x-forwarded-for": forwarded}
    return SimpleNamespace(peer=peer, headers=headers)


LOCAL = [parse_network("127.0.0.1/32")]
PROXIES = [parse_network("10.0.0.0/8"), parse_network("::1")]


@pytest.mark.parametrize("peer, forwarded, trusted, expected", [
    # No trusted proxy: the header is the client's word, ignored.
    ("tcp4:203.0.113.9:5555", "198.51.100.1", [], "203.0.113.9"),
    ("tcp4:127.0.0.1:5555", "198.51.100.1", [], "127.0.0.1"),
    # A peer that is not a trusted proxy: ignored too.
    ("tcp4:203.0.113.9:5555", "198.51.100.1", LOCAL, "203.0.113.9"),
    # A trusted peer: the rightmost address that is not a trusted proxy.
    ("tcp4:127.0.0.1:5555", "198.51.100.1", LOCAL, "198.51.100.1"),
    ("tcp4:10.1.2.3:5555", "1.1.1.1, 198.51.100.7, 10.9.9.9", PROXIES, "198.51.100.7"),
    # Garbage left of the trusted chain is not believed.
    ("tcp4:10.1.2.3:5555", "nonsense, 10.9.9.9", PROXIES, "10.9.9.9"),
    ("tcp4:10.1.2.3:5555", "nonsense", PROXIES, "10.1.2.3"),
    # All trusted: the leftmost.
    ("tcp4:10.1.2.3:5555", "10.0.0.5, 10.9.9.9", PROXIES, "10.0.0.5"),
    # No header from a trusted peer: the peer.
    ("tcp4:127.0.0.1:5555", None, LOCAL, "127.0.0.1"),
    # IPv6 peers and chains.
    ("tcp6:::1:5555", "2001:db8::7", PROXIES, "2001:db8::7"),
    ("tcp6:2001:db8::1:5555", None, PROXIES, "2001:db8::1"),
    # A dual-stack listener's view of an IPv4 peer is that IPv4 peer.
    ("tcp6:::ffff:127.0.0.1:5555", "198.51.100.1", LOCAL, "198.51.100.1"),
    ("tcp6:::ffff:203.0.113.9:5555", None, [], "203.0.113.9"),
    # An IPv4 network does not hold IPv6 addresses.
    ("tcp6:::1:5555", "2001:db8::7", LOCAL, "::1"),
])
def test_client_address_of_a_websocket_request(peer, forwarded, trusted, expected):
    assert client_address(ws_request(peer, forwarded), trusted) == expected


def test_client_address_of_a_web_request():
    request = DummyRequest([b"api"])
    request.client = IPv4Address("TCP", "127.0.0.1", 4000)
    assert client_address(request, LOCAL) == "127.0.0.1"
    request.requestHeaders.addRawHeader(b"X-Forwarded-For", b"192.0.2.1, 198.51.100.2")
    request.requestHeaders.addRawHeader(b"X-Forwarded-For", b"198.51.100.3")
    assert client_address(request, LOCAL) == "198.51.100.3"
    assert client_address(request, []) == "127.0.0.1"



def test_client_addresses_is_client_address_with_its_proxies():
    addresses = ClientAddresses(PROXIES)
    request = ws_request("tcp4:10.1.2.3:5555", "198.51.100.7")
    assert addresses(request) == client_address(request, PROXIES) == "198.51.100.7"
    assert addresses.from_trusted_proxy(request)
    assert addresses.peer(request) == "10.1.2.3"
    stranger = ws_request("tcp6:::ffff:203.0.113.9:5555", "198.51.100.7")
    assert addresses(stranger) == "203.0.113.9"
    assert not addresses.from_trusted_proxy(stranger)
    assert addresses.peer(stranger) == "203.0.113.9"
    assert not ClientAddresses().from_trusted_proxy(request)


def test_the_peer_of_a_unix_socket_is_unknown():
    request = DummyRequest([b""])
    request.client = UNIXAddress(None)
    assert peer_address(request) == "unknown"
    assert client_address(request, PROXIES) == "unknown"
    assert not ClientAddresses(PROXIES).from_trusted_proxy(request)


@pytest.mark.parametrize("text, expected", [
    ("192.0.2.1", "192.0.2.1"),
    (" [2001:db8::1] ", "2001:db8::1"),
    ("::ffff:192.0.2.1", "192.0.2.1"),
    ("example.com", None),
    ("", None),
])
def test_parse_ip(text, expected):
    address = parse_ip(text)
    assert (None if address is None else str(address)) == expected


def test_loopback_and_trust():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.2")
    assert not is_loopback("192.0.2.1") and not is_loopback("localhost")
    assert is_trusted(parse_ip("10.9.9.9"), PROXIES)
    assert not is_trusted(parse_ip("::ffff:10.9.9.9"), [parse_network("::/0")])
    assert not is_trusted(None, PROXIES)


def test_client_behind_takes_the_entries_of_every_header():
    assert client_behind("10.0.0.1", ["198.51.100.1", "198.51.100.2"], PROXIES) \
        == "198.51.100.2"
    assert client_behind(None, ["198.51.100.1"], PROXIES) == "unknown"


# -- JSON answers -------------------------------------------------------------------------

def answer(request) -> tuple[int, dict]:
    return request.responseCode, json.loads(b"".join(request.written))


def test_json_error_says_what_and_when_to_come_back():
    request = DummyRequest([b""])
    request.written.append(json_error(request, 429, "slow down", "throttled", 7,
                                      limit=3))
    assert answer(request) == (429, {"error": "slow down", "code": "throttled", "limit": 3})
    headers = request.responseHeaders
    assert headers.getRawHeaders(b"retry-after") == [b"7"]
    assert headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert headers.getRawHeaders(b"cache-control") == [b"no-store"]


def test_a_refusal_renders_its_error_and_headers():
    request = DummyRequest([b""])
    refusal = Refusal(421, "not this name", "host_not_allowed",
                      headers={b"x-extra": b"yes"})
    request.written.append(refusal.render(request))
    assert answer(request) == (421, {"error": "not this name", "code": "host_not_allowed"})
    assert request.responseMessage == b"Misdirected Request"
    assert request.responseHeaders.getRawHeaders(b"x-extra") == [b"yes"]
    assert not request.responseHeaders.hasHeader(b"retry-after")


def test_answer_json_answers_once_it_knows():
    request = DummyRequest([b""])
    d = Deferred()
    answer_json(request, d, "a test")
    assert request.finished == 0
    d.callback((200, {"ok": True}))
    assert request.finished == 1
    assert answer(request) == (200, {"ok": True})


def test_answer_json_writes_nothing_to_a_client_that_left():
    request = DummyRequest([b""])
    d = Deferred()
    answer_json(request, d, "a test")
    request.processingFailed(Exception("gone"))
    d.callback((200, {"ok": True}))
    assert request.written == [] and request.finished == 0
