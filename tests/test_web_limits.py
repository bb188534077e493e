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
# -- connections (issue 19, item 5) ---------------------------------------------------

from twisted.internet.address import IPv4Address  # noqa: E402

from capsule.web.connections import ConnectionLimits, client_key  # noqa: E402
from capsule.core.admission import parse_network  # noqa: E402

PROXY = "10.0.0.7"


@pytest.fixture
def capped(www):  # noqa: F811
    web = Web(www)
    web.site = type(web.site)(
        web.site.resource, reactor=web.reactor, connection_limits=ConnectionLimits(
            per_client=2, total=4, header_timeout=10, idle_timeout=30,
            exempt=(parse_network(PROXY + "/32"),)))
    return web


def _open(web, host="192.0.2.1", port=[40000]):
    port[0] += 1
    peer = IPv4Address("TCP", host, port[0])
    connection = web.site.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    connection.makeConnection(transport)
    return connection, transport


def _closed(transport) -> bool:
    return transport.disconnecting or getattr(transport, "disconnected", False)


def test_past_its_cap_an_address_loses_its_oldest_idle_connection(capped):
    first, first_t = _open(capped)
    second, second_t = _open(capped)
    third, third_t = _open(capped)
    assert _closed(first_t) and first_t.value() == b""
    assert not _closed(second_t) and not _closed(third_t)
    assert capped.site.connections.count("192.0.2.1") == 2
    # Another address is not touched.
    other, other_t = _open(capped, "192.0.2.2")
    assert not _closed(other_t)


def test_past_its_cap_with_every_connection_busy_a_new_one_gets_429(capped):
    capped.site.body_limits[b"/health"] = 1000
    busy = []
    for _ in range(2):
        connection, transport = _open(capped)
        # Headers in: the request is being read (a body that does not come).
        connection.dataReceived(b"POST /health HTTP/1.1\r\nHost: capsule\r\n"
                                b"Content-Length: 100\r\n\r\n")
        busy.append(transport)
    refused, refused_t = _open(capped)
    status, headers, body = parse(refused_t.value())
    assert status == 429
    assert json.loads(body)["code"] == "too_many_connections"
    assert refused_t.disconnecting
    assert not any(_closed(t) for t in busy)
    # Its data goes nowhere.
    refused.dataReceived(b"GET /health HTTP/1.1\r\nHost: capsule\r\n\r\n")
    assert refused_t.value().count(b"HTTP/1.1") == 1


def test_a_websocket_is_never_closed_for_another_connection(capped):
    upgraded, upgraded_t = _open(capped)
    # What Autobahn does when it takes the connection over.
    upgraded.wrappedProtocol = object()
    idle, idle_t = _open(capped)
    _open(capped)
    assert not _closed(upgraded_t) and _closed(idle_t)


def test_the_total_cap_closes_an_idle_connection_of_the_biggest_address(capped):
    mine = [_open(capped, "192.0.2.1") for _ in range(2)]
    theirs = [_open(capped, "192.0.2.2")]
    proxied = [_open(capped, PROXY)]
    assert not any(_closed(t) for _, t in mine + theirs + proxied)
    newcomer, newcomer_t = _open(capped, "192.0.2.3")
    assert not _closed(newcomer_t)
    assert [_closed(t) for _, t in mine] == [True, False]
    assert len(capped.site.connections) == 4


def test_a_trusted_proxy_is_not_capped_per_address(capped):
    opened = [_open(capped, PROXY) for _ in range(4)]
    assert not any(_closed(t) for _, t in opened)
    assert client_key(PROXY, capped.site.connections.limits.exempt) is None


def test_an_ipv6_64_counts_as_one_address():
    assert client_key("2001:db8:1:2::5") == client_key("2001:db8:1:2:ffff::9")
    assert client_key("2001:db8:1:3::5") != client_key("2001:db8:1:2::5")
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert client_key(None) is None


def test_headers_that_trickle_in_are_cut_at_their_deadline(capped):
    connection, transport = _open(capped)
    connection.dataReceived(b"GET /health HTTP/1.1\r\n")
    for second in range(9):
        capped.reactor.advance(1)
        connection.dataReceived(b"X-Trickle-%d: 1\r\n" % second)
    assert transport.value() == b""
    capped.reactor.advance(1.5)
    status, _, body = parse(transport.value())
    assert status == 408
    assert json.loads(body)["code"] == "request_timeout"
    assert transport.disconnecting


def test_a_connection_that_says_nothing_is_closed_at_the_header_deadline(capped):
    _, transport = _open(capped)
    capped.reactor.advance(9)
    assert not transport.disconnecting
    capped.reactor.advance(2)
    assert transport.disconnecting


def test_a_keep_alive_connection_is_closed_when_idle_and_timed_again_for_its_next_request(
        capped):
    connection, transport = _open(capped)
    connection.dataReceived(b"GET /nothing-here HTTP/1.1\r\nHost: capsule\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 404")
    assert connection.idle and not transport.disconnecting
    # Well past the first request's header deadline: idle, not timed out yet.
    capped.reactor.advance(25)
    assert not transport.disconnecting
    connection.dataReceived(b"GET /noth")
    capped.reactor.advance(10.5)
    assert transport.disconnecting
    assert b"408" in transport.value()


def test_an_idle_keep_alive_connection_goes_after_the_idle_timeout(capped):
    connection, transport = _open(capped)
    connection.dataReceived(b"GET /nothing-here HTTP/1.1\r\nHost: capsule\r\n\r\n")
    capped.reactor.advance(29)
    assert not transport.disconnecting
    capped.reactor.advance(2)
    assert transport.disconnecting
    assert transport.value().count(b"HTTP/1.1") == 1


def test_a_connection_that_goes_is_no_longer_counted(capped):
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    connection, _ = _open(capped)
    assert capped.site.connections.count("192.0.2.1") == 1
    connection.connectionLost(Failure(ConnectionDone()))
    assert capped.site.connections.count("192.0.2.1") == 0
    assert len(capped.site.connections) == 0


# -- a WebSocket client that does not read (issue 19, item 6) ---------------------------

from capsule.web.websocket_factory import CapsuleServerFactory  # noqa: E402
from tests.in_memory import Link, clock, docker, manager  # noqa: E402,F401 (fixtures)


@pytest.fixture
def stalling(clock, manager):  # noqa: F811
    factory = CapsuleServerFactory(manager, clock, stall_timeout=30)
    link = Link(clock, factory, "cols=80&rows=24", binary=True)
    link.flush()
    link.new()
    transport = link.server.transport
    reading = []
    transport.pauseProducing = lambda: reading.append(False)
    transport.resumeProducing = lambda: reading.append(True)
    return link, transport, reading


def test_a_full_outgoing_buffer_stops_reading_from_the_client(stalling, docker):  # noqa: F811
    link, transport, reading = stalling
    process = docker.processes[0]
    transport.producer.pauseProducing()
    # Neither its pings (whose pongs would queue) nor anything else is read,
    # and the session's output waits.
    assert reading == [False] and process.paused
    transport.producer.resumeProducing()
    assert reading == [False, True] and not process.paused


def test_reading_resumes_only_when_neither_the_buffer_nor_the_shell_holds_it(stalling):
    link, transport, reading = stalling
    link.server.pause_input(True)
    transport.producer.pauseProducing()
    link.server.pause_input(False)
    assert reading == [False]
    transport.producer.resumeProducing()
    assert reading == [False, True]


def test_a_client_that_leaves_its_buffer_full_is_dropped(stalling, clock, manager):  # noqa: F811
    link, transport, reading = stalling
    [session] = manager.sessions.values()
    transport.producer.pauseProducing()
    clock.advance(29)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnecting
    link.flush()
    # Its session stays for its next connection.
    assert manager.sessions[session.id] is session


def test_a_buffer_that_drains_in_time_keeps_the_client(stalling, clock):  # noqa: F811
    link, transport, reading = stalling
    transport.producer.pauseProducing()
    clock.advance(29)
    transport.producer.resumeProducing()
    for _ in range(60):
        clock.advance(1)
        link.flush()
    assert not transport.disconnecting


# -- capsule's own descriptor limit, at start --------------------------------------------

from capsule.services import connection_limits, descriptor_limit  # noqa: E402
from capsule.tap import Options  # noqa: E402


class _Limits:
    RLIMIT_NOFILE = 7
    RLIM_INFINITY = -1

    def __init__(self, soft, hard, refuse=False):
        self.now, self.refuse = (soft, hard), refuse

    def getrlimit(self, which):
        assert which == self.RLIMIT_NOFILE
        return self.now

    def setrlimit(self, which, limits):
        if self.refuse:
            raise ValueError("not allowed")
        self.now = limits


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one():
    limits = _Limits(1024, 524288)
    assert descriptor_limit(limits) == 524288
    assert limits.now == (524288, 524288)
    assert descriptor_limit(_Limits(400, 400)) == 400
    assert descriptor_limit(_Limits(1024, 4096, refuse=True)) == 1024


def _config(*args):
    options = Options()
    options.parseOptions(["-l", "tcp:0:interface=127.0.0.1", *args])
    return options.config


def test_a_low_descriptor_limit_is_warned_of_at_start(monkeypatch):
    monkeypatch.delenv("CAPSULE_TUNING", raising=False)
    from twisted.logger import LogLevel, globalLogPublisher

    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        low = connection_limits(_config("--max-sessions", "32"), 400)
        high = connection_limits(_config("--max-sessions", "32",
                                         "--max-connections-per-client", "10"), 65536)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    warnings = [e for e in seen if e.get("log_level") == LogLevel.warn]
    assert len(warnings) == 1
    assert "RLIMIT_NOFILE" in warnings[0]["log_format"]
    assert warnings[0]["descriptors"] == 400 and warnings[0]["wanted"] > 400
    # What the connections may take leaves the reserve free.
    assert 16 <= low.total < 400 - 32 * 4
    assert low.per_client == 64 and high.per_client == 10
    assert high.total > 60000
