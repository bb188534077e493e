"""
Request bodies larger than their path accepts are refused with 413 before
they are read: the real Site over a StringTransport.
"""

import json

import pytest
from twisted.internet.testing import StringTransport

from tests.support.httpclient import parse
from tests.test_web import Web, www  # noqa: F401  (the fixture)


@pytest.fixture
def web(www):  # noqa: F811
    return Web(www)


def _connect(web):
    channel = web.site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def _head(length: bytes = b"", extra: bytes = b"") -> bytes:
    return (b"POST /health HTTP/1.1\r\nHost: capsule\r\n" + length + extra + b"\r\n")


def test_a_declared_length_over_the_limit_is_refused_before_the_body(web, monkeypatch):
    made = []
    import twisted.web.http as http
    monkeypatch.setattr(http, "_getContentFile", lambda length: made.append(length))
    channel, transport = _connect(web)
    channel.dataReceived(_head(b"Content-Length: 10000000000\r\n",
                               b"Expect: 100-continue\r\n"))
    status, headers, body = parse(transport.value())
    assert status == 413
    assert headers["connection"] == "close"
    assert json.loads(body) == {
        "error": "this request may have a body of at most 0 bytes",
        "code": "body_too_large", "limit": 0}
    assert b"100 Continue" not in transport.value()
    assert transport.disconnecting
    channel.dataReceived(b"x" * 100_000)
    assert made == []
    assert channel._channel.requests[0].content.getvalue() == b""


def test_a_small_declared_body_is_refused_too_and_never_reaches_the_resource(web):
    channel, transport = _connect(web)
    channel.dataReceived(_head(b"Content-Length: 5\r\n") + b"hello")
    status, _, body = parse(transport.value())
    assert status == 413
    # One answer only: the resource (405 for a POST) never ran.
    assert transport.value().count(b"HTTP/1.1") == 1


def test_a_chunked_body_over_the_limit_is_cut_off(web):
    limit = 10
    web.site.body_limits[b"/health"] = limit
    channel, transport = _connect(web)
    channel.dataReceived(_head(b"Transfer-Encoding: chunked\r\n") + b"8\r\n01234567\r\n")
    assert transport.value() == b""
    channel.dataReceived(b"8\r\n89abcdef\r\n")
    status, _, body = parse(transport.value())
    assert status == 413
    assert json.loads(body)["limit"] == 10
    assert transport.disconnecting
    channel.dataReceived(b"8\r\n" + b"z" * 8 + b"\r\n0\r\n\r\n")
    assert channel._channel.requests[0].content.getvalue() == b""
    assert transport.value().count(b"HTTP/1.1") == 1


def test_a_body_within_a_paths_limit_reaches_its_resource(web):
    web.site.body_limits[b"/health"] = 10
    channel, transport = _connect(web)
    channel.dataReceived(_head(b"Content-Length: 5\r\nConnection: close\r\n") + b"hello")
    status, _, _ = parse(transport.value())
    # HealthResource answers GET only: the request got through to it.
    assert status == 405


def test_an_empty_chunked_body_and_a_get_are_accepted(web):
    channel, transport = _connect(web)
    channel.dataReceived(b"GET /health/x HTTP/1.1\r\nHost: capsule\r\nConnection: close\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 ")
    assert not transport.value().startswith(b"HTTP/1.1 413")
