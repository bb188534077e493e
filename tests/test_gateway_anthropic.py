"""
The Anthropic gateway in memory (capsule.gateway.anthropic, .site, .usage):
placeholders checked, headers taken off and the key put on, the answer
passed on piece by piece, usage read from it, the limits and the budget.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers

from capsule.core.profiles import Profile
from capsule.core.spec import ContainerSpec
from capsule.gateway.anthropic import (AnthropicGateway, GatewayLimits, forwarded_headers,
                                       placeholder_of)
from capsule.gateway.credentials import Keys, PlaceholderStore
from capsule.gateway.site import SessionEnvironment, make_gateway_site
from capsule.gateway.usage import Usage, UsageCollector, UsageReader
from tests.support.fake_anthropic import stream_events
from tests.support.httpclient import answered, parse, send

KEY = "sk-ant-real-key"
CLAUDE = Profile("claude", ContainerSpec("agent"), credentials=("anthropic", "github"))
SHELL = Profile("shell", ContainerSpec("shell"))


class FakeTransport:
    def __init__(self):
        self.paused = self.stopped = False

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False

    def stopProducing(self):
        self.stopped = True


class FakeResponse:
    def __init__(self, code=200, headers=None):
        self.code, self.phrase = code, b"OK"
        self.headers = Headers(headers or {})
        self.protocol = None
        self.transport = FakeTransport()

    def deliverBody(self, protocol):
        self.protocol = protocol
        protocol.makeConnection(self.transport)


class FakeAgent:
    def __init__(self):
        self.asked = []

    def request(self, method, url, headers, body):
        d = Deferred(lambda d: None)
        content = None
        if body is not None:
            content = body._data if hasattr(body, "_data") else body._inputFile.read()
        self.asked.append(SimpleNamespace(method=method, url=url, headers=headers,
                                          body=content, answer=d))
        return d


class Gateway:
    def __init__(self, budget=None, limits=GatewayLimits(), keys=None, profile=CLAUDE):
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.sessions = {"s1": SimpleNamespace(id="s1", settings=profile, profile=profile.name,
                                               core=SimpleNamespace(user="ann"))}
        self.store = PlaceholderStore(b"k" * 32, lambda: self.sessions)
        self.usage = Usage(self.clock, budget)
        self.agent = FakeAgent()
        self.keys = Keys({"anthropic": KEY}) if keys is None else keys
        self.gateway = AnthropicGateway(self.clock, self.store, self.keys, self.sessions,
                                        self.usage, upstream="https://upstream.test",
                                        limits=limits, agent=self.agent)
        self.site = make_gateway_site(self.gateway, self.clock)
        self.token = self.store.issue("s1")

    def send(self, body=b'{"stream": true}', headers=None, target="/anthropic/v1/messages",
             method="POST"):
        headers = headers if headers is not None else {"authorization": f"Bearer {self.token}"}
        return send(self.site, method, target, headers, body)


def answer_of(transport):
    return parse(transport.value(), "POST")


def test_the_placeholder_is_swapped_for_the_key():
    g = Gateway()
    transport = g.send(headers=[("Authorization", f"Bearer {g.token}"),
                                ("anthropic-version", "2023-06-01"),
                                ("Connection", "keep-alive, x-hop"), ("x-hop", "1"),
                                ("Keep-Alive", "timeout=5"), ("Proxy-Authorization", "p"),
                                ("Cookie", "c=1"), ("Accept-Encoding", "gzip")],
                       body=b'{"model": "m", "stream": true}')
    [asked] = g.agent.asked
    assert asked.method == b"POST"
    assert asked.url == b"https://upstream.test/v1/messages"
    assert asked.body == b'{"model": "m", "stream": true}'
    headers = {k.lower(): v for k, v in asked.headers.getAllRawHeaders()}
    assert headers[b"x-api-key"] == [KEY.encode()]
    assert headers[b"anthropic-version"] == [b"2023-06-01"]
    assert headers[b"accept-encoding"] == [b"identity"]
    for gone in (b"authorization", b"connection", b"x-hop", b"keep-alive",
                 b"proxy-authorization", b"cookie", b"host"):
        assert gone not in headers
    assert g.token.encode() not in b"".join(b"".join(v) for v in headers.values())
    assert transport.value() == b""


def test_x_api_key_carries_the_placeholder_too_and_the_query_passes():
    g = Gateway()
    g.send(headers={"x-api-key": g.token}, target="/anthropic/v1/models?limit=5", body=None,
           method="GET")
    [asked] = g.agent.asked
    assert asked.url == b"https://upstream.test/v1/models?limit=5"
    assert asked.headers.getRawHeaders(b"x-api-key") == [KEY.encode()]


@pytest.mark.parametrize("headers", [
    {}, {"authorization": "Bearer capsule-forged"}, {"x-api-key": "sk-ant-guess"},
    {"authorization": "Basic xyz"},
])
def test_a_forged_or_missing_placeholder_is_refused(headers):
    g = Gateway()
    status, _, body = answered(g.send(headers=headers), "POST")
    answer = json.loads(body)
    assert status == 401 and answer["type"] == "error"
    assert answer["error"]["type"] == "authentication_error"
    assert answer["code"] == "placeholder_refused"
    assert "placeholder" in answer["error"]["message"]
    assert g.agent.asked == []
    assert g.usage.describe()["refusals"] == {"placeholder_refused": 1}


def test_an_ended_session_s_placeholder_is_refused():
    g = Gateway()
    session = g.sessions.pop("s1")
    g.store.session_ended(session)
    status, _, body = answered(g.send(), "POST")
    assert status == 401 and json.loads(body)["code"] == "placeholder_refused"


def test_a_profile_without_the_credential_is_refused():
    g = Gateway(profile=SHELL)
    status, _, body = answered(g.send(), "POST")
    assert (status, json.loads(body)["code"]) == (403, "credential_not_granted")


def test_without_a_key_the_gateway_says_so():
    g = Gateway(keys=Keys({}))
    status, _, body = answered(g.send(), "POST")
    answer = json.loads(body)
    assert (status, answer["code"]) == (503, "no_key")
    assert "ANTHROPIC_API_KEY" in answer["error"]["message"]


def test_other_paths_are_not_forwarded():
    g = Gateway()
    status, _, body = answered(g.send(target="/anthropic/admin"), "POST")
    assert (status, json.loads(body)["code"]) == (404, "not_found")
    status, _, body = answered(g.send(target="/elsewhere"), "POST")
    assert status == 404 and "session door" in json.loads(body)["error"]
    assert g.agent.asked == []


def test_a_body_over_the_limit_is_refused_before_it_is_read():
    g = Gateway(limits=GatewayLimits(body_bytes=1000))
    status, _, body = answered(g.send(body=b"x" * 1001), "POST")
    assert (status, json.loads(body)["code"]) == (413, "body_too_large")
    assert g.agent.asked == []
    # Without a live placeholder, only a small body is taken (and refused).
    g = Gateway()
    status, _, body = answered(g.send(body=b"x" * 70000, headers={}), "POST")
    assert status == 413


def test_requests_at_once_per_session_are_limited():
    g = Gateway(limits=GatewayLimits(per_session=2))
    g.send(), g.send()
    status, _, body = answered(g.send(), "POST")
    answer = json.loads(body)
    assert (status, answer["code"]) == (429, "too_many_requests")
    assert answer["error"]["type"] == "rate_limit_error"
    assert len(g.agent.asked) == 2
    # One ends: room again.
    response = FakeResponse(200, {b"content-type": [b"application/json"]})
    g.agent.asked[0].answer.callback(response)
    response.protocol.connectionLost(Failure(ResponseDone()))
    g.send()
    assert len(g.agent.asked) == 3


def test_the_stream_passes_piece_by_piece_and_its_usage_is_counted():
    g = Gateway()
    transport = g.send()
    response = FakeResponse(200, {b"content-type": [b"text/event-stream"],
                                  b"set-cookie": [b"a=b"], b"request-id": [b"req_1"]})
    g.agent.asked[0].answer.callback(response)
    head = transport.value()
    assert head.startswith(b"HTTP/1.1 200 OK") and b"req_1" in head
    assert b"set-cookie" not in head.lower()
    events = list(stream_events("hello world", 25, 9, 3))
    seen = len(head)
    for event in events:
        # Cut at an odd place: usage is read across pieces.
        for piece in (event[:7], event[7:]):
            response.protocol.dataReceived(piece)
            now = transport.value()
            assert len(now) > seen, "a piece was held back"
            seen = len(now)
    # The session's connection is the upstream's producer: backpressure.
    transport.producer.pauseProducing()
    assert response.transport.paused
    transport.producer.resumeProducing()
    assert not response.transport.paused
    response.protocol.connectionLost(Failure(ResponseDone()))
    status, _, body = parse(transport.value(), "POST")
    assert status == 200 and body == b"".join(events)
    usage = g.usage.describe()
    assert usage["users"]["ann"]["requests"] == 1
    assert usage["users"]["ann"]["input_tokens"] == 25
    assert usage["users"]["ann"]["output_tokens"] == 9
    assert usage["sessions"]["s1"]["tokens"] == 34
    assert usage["users"]["ann"]["today"] == 34


def test_a_client_that_goes_away_stops_the_upstream():
    g = Gateway()
    transport = g.send()
    response = FakeResponse(200, {b"content-type": [b"text/event-stream"]})
    g.agent.asked[0].answer.callback(response)
    transport.channel.connectionLost(Failure(ConnectionRefusedError()))
    assert response.transport.stopped


def test_an_answer_cut_off_upstream_is_cut_off_here():
    g = Gateway()
    transport = g.send()
    response = FakeResponse(200, {b"content-type": [b"text/event-stream"]})
    g.agent.asked[0].answer.callback(response)
    response.protocol.dataReceived(b"event: ping\n")
    response.protocol.connectionLost(Failure(ResponseFailed([Failure(Exception("x"))])))
    assert transport.disconnecting
    assert not transport.value().endswith(b"0\r\n\r\n")


def test_an_unreachable_upstream_is_a_502():
    g = Gateway()
    transport = g.send()
    g.agent.asked[0].answer.errback(Failure(ConnectionRefusedError("refused")))
    status, _, body = parse(transport.value(), "POST")
    answer = json.loads(body)
    assert (status, answer["code"]) == (502, "upstream_unreachable")
    assert "upstream.test" in answer["error"]["message"]
    assert KEY not in body.decode()


def test_a_silent_upstream_is_a_504():
    g = Gateway(limits=GatewayLimits(answer_timeout=30))
    transport = g.send()
    g.clock.advance(31)
    status, _, body = parse(transport.value(), "POST")
    assert (status, json.loads(body)["code"]) == (504, "upstream_timeout")


def test_a_stalled_answer_is_cut_off():
    g = Gateway(limits=GatewayLimits(idle_timeout=5))
    g.send()
    response = FakeResponse(200, {b"content-type": [b"text/event-stream"]})
    g.agent.asked[0].answer.callback(response)
    g.clock.advance(4)
    response.protocol.dataReceived(b"event: ping\n")
    g.clock.advance(4)
    assert not response.transport.stopped
    g.clock.advance(2)
    assert response.transport.stopped


def test_the_budget_refuses_once_spent():
    g = Gateway(budget=30)
    g.send(body=b"{}")
    response = FakeResponse(200, {b"content-type": [b"application/json"]})
    g.agent.asked[0].answer.callback(response)
    response.protocol.dataReceived(json.dumps(
        {"usage": {"input_tokens": 20, "output_tokens": 15}}).encode())
    response.protocol.connectionLost(Failure(ResponseDone()))
    status, _, body = answered(g.send(), "POST")
    answer = json.loads(body)
    assert (status, answer["code"]) == (429, "budget_spent")
    assert answer["error"]["type"] == "rate_limit_error"
    assert "30 tokens per day" in answer["error"]["message"] and "ann" in answer["error"]["message"]
    # A new day (UTC): the budget renews.
    g.clock.advance(86400)
    g.send()
    assert len(g.agent.asked) == 2


# -- usage ---------------------------------------------------------------------

def test_usage_is_read_from_a_stream_in_any_pieces():
    events = b"".join(stream_events("some text", 100, 42, 5))
    for size in (1, 3, 64, len(events)):
        reader = UsageReader("text/event-stream; charset=utf-8")
        for start in range(0, len(events), size):
            reader.feed(events[start:start + size])
        tokens = reader.finish()
        assert (tokens["input_tokens"], tokens["output_tokens"]) == (100, 42)


def test_usage_reading_holds_no_stream_and_believes_no_nonsense():
    reader = UsageReader("text/event-stream")
    reader.feed(b"data: " + b"x" * (2 * 1024 * 1024))
    assert len(reader._buffer) <= 1024 * 1024 + 1
    reader.feed(b"\n")
    reader.feed(b'data: {"type": "message_delta", "usage": {"output_tokens": -5,'
                b' "input_tokens": "9", "cache_read_input_tokens": 10000000000000}}\n')
    reader.feed(b'data: [1, 2]\ndata: {"type": "message_start", "message": 3}\n')
    reader.feed(b'data: {"type": "message_delta", "usage": {"cache_read_input_tokens": 3}}')
    assert reader.finish()["cache_read_input_tokens"] == 3
    assert sum(reader.tokens.values()) == 3


def test_usage_of_a_json_answer():
    reader = UsageReader("application/json")
    body = json.dumps({"usage": {"input_tokens": 5, "output_tokens": 6,
                                 "cache_creation_input_tokens": 7}}).encode()
    reader.feed(body[:10])
    reader.feed(body[10:])
    assert reader.finish() == {"input_tokens": 5, "output_tokens": 6,
                               "cache_creation_input_tokens": 7, "cache_read_input_tokens": 0}
    assert UsageReader("text/plain").finish() == dict.fromkeys(reader.tokens, 0)


def test_usage_in_the_metrics_is_by_user_never_by_session():
    from prometheus_client import CollectorRegistry, generate_latest
    clock = Clock()
    usage = Usage(clock)
    usage.requested("ann", "session-1")
    usage.used("ann", "session-1", {"input_tokens": 3, "output_tokens": 4})
    usage.requested(None, "session-2")
    usage.refused("budget_spent")
    registry = CollectorRegistry()
    registry.register(UsageCollector(usage))
    text = generate_latest(registry).decode()
    assert 'capsule_anthropic_requests_total{user="ann"} 1.0' in text
    assert 'capsule_anthropic_requests_total{user=""} 1.0' in text
    assert 'capsule_anthropic_tokens_total{kind="output",user="ann"} 4.0' in text
    assert 'capsule_anthropic_refusals_total{code="budget_spent"} 1.0' in text
    assert 'capsule_anthropic_tokens_today{user="ann"} 7.0' in text
    assert "session-1" not in text
    # A session that ended leaves the admin's list, not the user's counts;
    # an answer that ends after it does not bring it back.
    usage.session_ended(SimpleNamespace(id="session-1"))
    usage.used("ann", "session-1", {"output_tokens": 1})
    assert "session-1" not in usage.describe()["sessions"]
    assert usage.describe()["users"]["ann"]["tokens"] == 8


# -- what a session is told ----------------------------------------------------

class Network:
    name = "capsule"

    def gateways(self):
        return ["fd00::1", "172.18.0.1"]


def test_a_session_learns_the_door_and_its_placeholder_never_the_key():
    store = PlaceholderStore(b"k" * 32, lambda: {})
    environment = SessionEnvironment(3180, Network(), store, Keys({"anthropic": KEY}))
    claude = Profile("claude", ContainerSpec("agent", network="capsule"),
                     credentials=("anthropic",))
    told = environment("s1", claude)
    assert told == {"CAPSULE_DOOR": "http://172.18.0.1:3180",
                    "ANTHROPIC_BASE_URL": "http://172.18.0.1:3180/anthropic",
                    "ANTHROPIC_AUTH_TOKEN": store.issue("s1")}
    assert KEY not in json.dumps(told) and "ANTHROPIC_API_KEY" not in told
    offline = Profile("offline", ContainerSpec("agent", network="none"),
                      credentials=("anthropic",))
    assert environment("s2", offline)["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:3180/anthropic"
    shell = Profile("shell", ContainerSpec("shell", network="capsule"))
    assert environment("s3", shell) == {"CAPSULE_DOOR": "http://172.18.0.1:3180"}
    elsewhere = Profile("x", ContainerSpec("agent", network="other"), credentials=("anthropic",))
    assert environment("s4", elsewhere) == {}
    # Without the key, a session is left with its own login.
    keyless = SessionEnvironment(3180, Network(), store, Keys({}))
    assert keyless("s5", claude) == {"CAPSULE_DOOR": "http://172.18.0.1:3180"}
    assert SessionEnvironment(0, Network(), store, Keys({"anthropic": KEY}))("s6", claude) == {}


def test_the_manager_merges_every_feature_s_environment():
    from capsule.sessions.manager import SessionManager
    from capsule.sessions.session import SessionConfig
    from tests.support.fakes import FakeDockerAPI
    manager = SessionManager(FakeDockerAPI(), Clock(), SessionConfig(
        spec=ContainerSpec("capsule-runtime:latest"), instance="t", grace=60,
        replay_bytes=16), session_environment=[
        lambda session_id, profile: {"A": session_id, "B": "1"},
        lambda session_id, profile: {"B": "2", "P": profile.name}])
    spec = manager._container_spec("s9")
    assert spec.environment["A"] == "s9" and spec.environment["B"] == "2"
    assert spec.environment["P"] == "shell" and spec.environment["TERM"] == "xterm-256color"


def test_headers_helpers():
    incoming = Headers({b"Authorization": [b"Bearer capsule-x"], b"X-Other": [b"1"]})
    assert forwarded_headers(incoming, KEY).getRawHeaders(b"x-other") == [b"1"]
    request = SimpleNamespace(requestHeaders=Headers({b"authorization": [b"bearer  tok "]}))
    assert placeholder_of(request) == "tok"
    request = SimpleNamespace(requestHeaders=Headers({b"x-api-key": [b"k2"]}))
    assert placeholder_of(request) == "k2"


def test_an_idle_kept_alive_connection_is_closed():
    from capsule.gateway.site import IDLE_TIMEOUT
    g = Gateway()
    site = make_gateway_site(None, g.clock)
    assert site.timeOut == IDLE_TIMEOUT
    channel = site.buildProtocol(None)
    assert channel.timeOut == IDLE_TIMEOUT


def test_a_client_that_leaves_before_the_answer_cancels_the_request():
    cancelled = []
    g = Gateway()
    g.agent.request = lambda *a: Deferred(cancelled.append)
    transport = g.send()
    transport.channel.connectionLost(Failure(ConnectionRefusedError()))
    assert len(cancelled) == 1
    assert g.gateway._under_way == {}
