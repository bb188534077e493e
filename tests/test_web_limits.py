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


# -- decided from the headers: the spool budget, bodies per address, a decision that takes a while


def _lost(channel):
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure
    channel.connectionLost(Failure(ConnectionLost()))


def test_a_declared_body_past_the_spool_budget_is_a_503_before_it_is_read(web):
    from capsule.web.bodies import BodyBudget
    web.site.body_limits[b"/health"] = 1000
    web.site.bodies = BodyBudget(max_bytes=1500, per_address=10)
    held, _ = _connect(web)
    held.dataReceived(_head(b"Content-Length: 1000\r\n") + b"x" * 10)
    assert web.site.bodies.held == 1000
    channel, transport = _connect(web)
    channel.dataReceived(_head(b"Content-Length: 600\r\n"))
    status, headers, body = parse(transport.value())
    assert (status, json.loads(body)["code"], headers["retry-after"]) == (503, "spool_full", "5")
    assert transport.disconnecting
    # The first ends: what it held is free again.
    _lost(held)
    assert web.site.bodies.held == 0
    channel, transport = _connect(web)
    channel.dataReceived(_head(b"Content-Length: 600\r\n") + b"y" * 10)
    assert transport.value() == b""
    assert web.site.bodies.held == 600


def test_a_chunked_body_counts_against_the_spool_budget_as_it_comes(web):
    from capsule.web.bodies import BodyBudget
    web.site.body_limits[b"/health"] = 10_000
    web.site.bodies = BodyBudget(max_bytes=12, per_address=10)
    channel, transport = _connect(web)
    channel.dataReceived(_head(b"Transfer-Encoding: chunked\r\n") + b"8\r\n01234567\r\n")
    assert (transport.value(), web.site.bodies.held) == (b"", 8)
    channel.dataReceived(b"8\r\n89abcdef\r\n")
    status, _, body = parse(transport.value())
    assert (status, json.loads(body)["code"]) == (503, "spool_full")
    assert web.site.bodies.held == 0


def test_bodies_one_address_sends_at_once_are_bounded(web):
    from capsule.web.bodies import BodyBudget
    web.site.body_limits[b"/health"] = 1000
    web.site.bodies = BodyBudget(max_bytes=1 << 30, per_address=2)
    first, _ = _connect(web)
    first.dataReceived(_head(b"Content-Length: 100\r\n"))
    second, _ = _connect(web)
    second.dataReceived(_head(b"Transfer-Encoding: chunked\r\n"))
    channel, transport = _connect(web)
    channel.dataReceived(_head(b"Content-Length: 100\r\n"))
    status, _, body = parse(transport.value())
    assert (status, json.loads(body)["code"]) == (429, "too_many_bodies")
    # A request without a body is not one.
    channel, transport = _connect(web)
    channel.dataReceived(b"GET /health/x HTTP/1.1\r\nHost: capsule\r\nConnection: close\r\n\r\n")
    assert not transport.value().startswith(b"HTTP/1.1 429")
    # Once a body is in, it no longer counts.
    first.dataReceived(b"x" * 100)
    assert sum(web.site.bodies.receiving.values()) == 1
    channel, transport = _connect(web)
    channel.dataReceived(_head(b"Content-Length: 100\r\n"))
    assert transport.value() == b""


def test_a_decision_that_takes_a_while_stops_reading_and_holds_100_continue(web):
    from twisted.internet.defer import Deferred
    from capsule.web.bodies import BodyRefused
    decisions = []

    def rule(path, request):
        if path == b"/health":
            decisions.append(Deferred())
            return decisions[-1]
    web.site.body_rules.insert(0, rule)
    channel, transport = _connect(web)
    channel.dataReceived(_head(b"Content-Length: 5\r\nConnection: close\r\n",
                               b"Expect: 100-continue\r\n") + b"he")
    assert transport.value() == b""
    assert transport.producerState == "paused"
    decisions[0].callback(10)
    assert transport.producerState == "producing"
    assert transport.value().startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    channel.dataReceived(b"llo")
    # HealthResource answers GET only: the request got through to it, whole.
    assert parse(transport.value().split(b"\r\n\r\n", 1)[1]).status == 405

    # Refused: no 100 Continue, the refusal's own answer, nothing kept.
    channel, transport = _connect(web)
    channel.dataReceived(_head(b"Content-Length: 5\r\n", b"Expect: 100-continue\r\n") + b"he")
    decisions[1].errback(BodyRefused(401, "log in first", "unauthenticated",
                                     headers={b"WWW-Authenticate": b'Bearer realm="capsule"'}))
    status, headers, body = parse(transport.value())
    assert (status, json.loads(body)["code"]) == (401, "unauthenticated")
    assert headers["www-authenticate"] == 'Bearer realm="capsule"'
    assert b"100 Continue" not in transport.value()
    channel.dataReceived(b"llo")
    assert channel._channel.requests[0].content.getvalue() == b""
    assert transport.value().count(b"HTTP/1.1") == 1


def test_a_client_gone_before_the_decision_leaves_nothing_held(web):
    from twisted.internet.defer import Deferred
    from capsule.web.bodies import BodyBudget
    web.site.bodies = BodyBudget(max_bytes=1000, per_address=4)
    decision = Deferred()
    released = []

    def rule(path, request):
        request.on_done(lambda: released.append(True))
        return decision
    web.site.body_rules.insert(0, rule)
    channel, transport = _connect(web)
    channel.dataReceived(_head(b"Content-Length: 5\r\n") + b"he")
    _lost(channel)
    assert released == [True] and web.site.bodies.receiving == {}
    decision.callback(10)
    assert web.site.bodies.held == 0 and transport.value() == b""


def test_refusals_are_logged_at_a_bounded_rate(web):
    from twisted.logger import globalLogPublisher
    from capsule.web import bodies
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        for _ in range(bodies.REFUSAL_LOG_LINES + 30):
            channel, transport = _connect(web)
            channel.dataReceived(_head(b"Content-Length: 5\r\n"))
        web.reactor.advance(bodies.REFUSAL_LOG_WINDOW)
        channel, transport = _connect(web)
        channel.dataReceived(_head(b"Content-Length: 5\r\n"))
    finally:
        globalLogPublisher.removeObserver(seen.append)
    lines = [e for e in seen if "refused" in e.get("log_format", "")]
    assert len(lines) == bodies.REFUSAL_LOG_LINES + 1
    assert lines[-1]["dropped"] == 30
