"""
The git gateway (capsule.gateway.git): which requests it forwards, what it
puts on them and takes off, its refusals as git prints them, and the
environment that sends a session's git to it.
"""

from __future__ import annotations

import base64
import os

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site

from capsule.core.profiles import Profile, ProfileError, builtin_profiles, load_profiles, \
    load_secrets
from capsule.core.spec import ContainerSpec
from capsule.gateway.door import DoorRoot
from capsule.gateway.git import GitCaller, GitGateway, session_callers
from capsule.gateway.git_rules import (GitLimits, GitRefused, GitTokens, answer_headers,
                                       basic_authorization, check_upstream, git_environment,
                                       git_session_environment, parse_git_request,
                                       rewrite_location, upstream_headers)
from capsule.gateway.git_stream import BODY_HIGH_WATER, GitBodyStream
from capsule.gateway.credentials import PlaceholderStore
from capsule.gateway.site import make_gateway_site
from capsule.sessions.observers import SessionObservers
from tests.support.httpclient import ask, send

TOKEN = "ghp_operatorsecrettoken0123456789"
GOOD = "good-placeholder"


# -- paths -----------------------------------------------------------------------------

@pytest.mark.parametrize("method, path, query, kind, service", [
    (b"GET", b"github.com/owner/repo.git/info/refs", b"service=git-upload-pack", "refs",
     "git-upload-pack"),
    (b"GET", b"github.com/owner/repo/info/refs", b"service=git-receive-pack", "refs",
     "git-receive-pack"),
    (b"POST", b"github.com/o-w-n/r_e.p-o.git/git-upload-pack", b"", "rpc", "git-upload-pack"),
    (b"POST", b"github.com/owner/repo.git/git-receive-pack", b"", "rpc", "git-receive-pack"),
])
def test_the_smart_http_requests_are_forwarded(method, path, query, kind, service):
    route = parse_git_request(method, path, query)
    assert (route.kind, route.service) == (kind, service)
    owner, repo = path.decode().split("/")[1:3]
    assert route.upstream_path() == (f"/{owner}/{repo}/info/refs?service={service}"
                                     if kind == "refs" else f"/{owner}/{repo}/{service}")


@pytest.mark.parametrize("method, path, query, status", [
    # Dumb HTTP, the web pages, the API, other hosts.
    (b"GET", b"github.com/owner/repo.git/HEAD", b"", 404),
    (b"GET", b"github.com/owner/repo.git/objects/info/packs", b"", 404),
    (b"GET", b"github.com/owner/repo.git/info/refs", b"", 404),
    (b"GET", b"github.com/owner/repo.git/info/refs", b"service=git-upload-archive", 404),
    (b"GET", b"github.com/owner/repo.git/info/refs",
     b"service=git-upload-pack&x=1", 404),
    (b"GET", b"github.com/owner/repo", b"", 404),
    (b"GET", b"github.com/owner", b"", 404),
    (b"GET", b"github.com/settings/tokens/new", b"", 404),
    (b"POST", b"github.com/owner/repo/git-upload-pack/extra", b"", 404),
    (b"POST", b"github.com/owner/repo/git-upload-pack", b"a=b", 404),
    (b"GET", b"api.github.com/repos/owner/repo/info/refs", b"service=git-upload-pack", 404),
    (b"GET", b"gitlab.com/owner/repo/info/refs", b"service=git-upload-pack", 404),
    (b"GET", b"evil.example/github.com/owner/repo/info/refs", b"service=git-upload-pack", 404),
    # Names GitHub does not have, climbing, encoding.
    (b"GET", b"github.com/../repo/info/refs", b"service=git-upload-pack", 404),
    (b"GET", b"github.com/owner/../info/refs", b"service=git-upload-pack", 404),
    (b"GET", b"github.com/owner/.git/info/refs", b"service=git-upload-pack", 404),
    (b"GET", b"github.com/-owner/repo/info/refs", b"service=git-upload-pack", 404),
    (b"GET", b"github.com/ow%2fner/repo/info/refs", b"service=git-upload-pack", 404),
    (b"GET", b"github.com/owner/re%2e/info/refs", b"service=git-upload-pack", 404),
    (b"GET", b"github.com//repo/info/refs", b"service=git-upload-pack", 404),
    (b"GET", b"github.com/owner/r\xc3\xa9po/info/refs", b"service=git-upload-pack", 404),
    (b"GET", b"github.com/" + b"o" * 40 + b"/repo/info/refs", b"service=git-upload-pack", 404),
    # Methods.
    (b"POST", b"github.com/owner/repo/info/refs", b"service=git-upload-pack", 405),
    (b"GET", b"github.com/owner/repo/git-receive-pack", b"", 405),
    (b"PUT", b"github.com/owner/repo/git-receive-pack", b"", 405),
])
def test_everything_else_is_refused(method, path, query, status):
    with pytest.raises(GitRefused) as refused:
        parse_git_request(method, path, query)
    assert refused.value.status == status
    assert refused.value.message


# -- headers ---------------------------------------------------------------------------

def test_the_token_replaces_whatever_the_session_sent():
    incoming = Headers({b"authorization": [b"Bearer something"], b"cookie": [b"a=b"],
                        b"x-capsule-session": [b"placeholder"], b"host": [b"172.18.0.1:3180"],
                        b"proxy-authorization": [b"Basic eDp5"],
                        b"git-protocol": [b"version=2"], b"user-agent": [b"git/2.39.5"],
                        b"content-type": [b"application/x-git-upload-pack-request"],
                        b"content-encoding": [b"gzip"], b"x-forwarded-for": [b"1.2.3.4"]})
    out = upstream_headers(incoming, TOKEN)
    names = {name.lower() for name, _ in out.getAllRawHeaders()}
    assert names == {b"authorization", b"git-protocol", b"user-agent", b"content-type",
                     b"content-encoding"}
    (authorization,) = out.getRawHeaders(b"authorization")
    assert authorization == b"Basic " + base64.b64encode(f"x-access-token:{TOKEN}".encode())
    assert basic_authorization(TOKEN) == authorization


def test_without_a_token_no_authorization_goes_on():
    out = upstream_headers(Headers({b"authorization": [b"Basic eDp5"]}), None)
    assert out.getRawHeaders(b"authorization") is None


def test_only_the_answers_headers_git_needs_come_back():
    upstream = Headers({b"content-type": [b"application/x-git-upload-pack-advertisement"],
                        b"set-cookie": [b"logged_in=no"], b"www-authenticate": [b"Basic"],
                        b"strict-transport-security": [b"max-age=1"],
                        b"cache-control": [b"no-cache"]})
    assert dict(answer_headers(upstream)) == {
        b"content-type": [b"application/x-git-upload-pack-advertisement"],
        b"cache-control": [b"no-cache"]}


def test_a_redirect_within_the_upstream_stays_in_the_gateway():
    assert rewrite_location(b"https://github.com/new/name.git/info/refs?service=git-upload-pack",
                            "https://github.com", "/git/github.com") == \
        b"/git/github.com/new/name.git/info/refs?service=git-upload-pack"
    assert rewrite_location(b"/new/name.git/info/refs", "https://github.com",
                            "/git/github.com") == b"/git/github.com/new/name.git/info/refs"
    assert rewrite_location(b"https://evil.example/x", "https://github.com",
                            "/git/github.com") is None
    assert rewrite_location(b"//evil.example/x", "https://github.com", "/git/github.com") is None
    assert rewrite_location(b"https://github.com.evil.example/x", "https://github.com",
                            "/git/github.com") is None


@pytest.mark.parametrize("upstream", ["ftp://github.com", "https://", "https://github.com/x",
                                      "https://u:p@github.com", "https://github.com?a=1",
                                      "github.com", "https://github.com:99999"])
def test_an_upstream_is_a_base_url(upstream):
    with pytest.raises(ValueError):
        check_upstream(upstream)


# -- the environment ---------------------------------------------------------------------

def test_the_environment_configures_git_and_holds_no_token():
    environment = git_environment("http://172.18.0.1:3180", "the-placeholder")
    count = int(environment["GIT_CONFIG_COUNT"])
    pairs = [(environment[f"GIT_CONFIG_KEY_{n}"], environment[f"GIT_CONFIG_VALUE_{n}"])
             for n in range(count)]
    assert ("url.http://172.18.0.1:3180/git/github.com/.insteadOf", "https://github.com/") \
        in pairs
    assert ("url.http://172.18.0.1:3180/git/github.com/.insteadOf", "git@github.com:") in pairs
    assert ("http.http://172.18.0.1:3180/git/.extraHeader",
            "X-Capsule-Session: the-placeholder") in pairs
    assert len(environment) == 1 + 2 * count


def test_only_profiles_naming_github_get_it():
    spec = ContainerSpec(image="capsule-runtime:latest")
    hook = git_session_environment(lambda profile: "http://172.18.0.1:3180",
                                   lambda session_id: f"p-{session_id}")
    assert hook("s1", Profile(name="shell", spec=spec)) == {}
    environment = hook("s1", Profile(name="agent", spec=spec, credentials=("github",)))
    assert "X-Capsule-Session: p-s1" in environment.values()
    no_door = git_session_environment(lambda profile: None, lambda session_id: "p")
    assert no_door("s1", Profile(name="agent", spec=spec, credentials=("github",))) == {}


def test_the_claude_profile_names_github_and_a_profile_may(tmp_path):
    shell = Profile(name="shell", spec=ContainerSpec(image="capsule-runtime:latest"))
    builtins = builtin_profiles(shell)
    assert "github" in builtins["claude"].credentials
    assert builtins["shell"].credentials == ()
    path = tmp_path / "profiles.toml"
    path.write_text('[profiles.git]\ncredentials = ["github"]\n')
    assert load_profiles(str(path), builtins)["git"].credentials == ("github",)
    path.write_text('[profiles.git]\ncredentials = ["gitlab"]\n')
    with pytest.raises(ProfileError, match="unknown credential 'gitlab'"):
        load_profiles(str(path), builtins)


def test_the_token_is_read_from_the_environment_or_the_secrets_file(tmp_path):
    shell = Profile(name="shell", spec=ContainerSpec(image="capsule-runtime:latest"))
    profiles = builtin_profiles(shell)
    secrets = load_secrets(None, profiles, {"GITHUB_TOKEN": TOKEN})
    assert secrets.values["GITHUB_TOKEN"] == TOKEN
    # No profile's container gets it.
    assert all("GITHUB_TOKEN" not in secrets.for_profile(p) for p in profiles.values())
    assert TOKEN not in repr(secrets)
    path = tmp_path / "secrets"
    path.write_text(f"GITHUB_TOKEN={TOKEN}\n")
    path.chmod(0o600)
    assert load_secrets(str(path), profiles, {}).values[
        "GITHUB_TOKEN"] == TOKEN


def test_a_users_own_token_comes_first(tmp_path):
    (tmp_path / "alice").write_text("ghp_alices\n")
    (tmp_path / "alice").chmod(0o600)
    (tmp_path / "bob").write_text("ghp_bobs")
    (tmp_path / "bob").chmod(0o644)
    (tmp_path / "carol").write_text("two tokens")
    (tmp_path / "carol").chmod(0o600)
    os.symlink(tmp_path / "alice", tmp_path / "mallory")
    tokens = GitTokens(TOKEN, str(tmp_path))
    assert tokens("alice") == "ghp_alices"
    # Readable by others, not one token, a link, a name that is a path: the operator's.
    assert tokens("bob") == TOKEN
    assert tokens("carol") == TOKEN
    assert tokens("mallory") == TOKEN
    assert tokens("../alice") == TOKEN
    assert tokens(None) == TOKEN
    assert GitTokens(None, None)("alice") is None
    assert TOKEN not in repr(tokens)


def test_placeholders_are_the_credential_gateways_and_die_with_their_session():
    class Session:
        def __init__(self, id, user):
            self.id = id
            self.core = type("Core", (), {"user": user})()
    live = {"s1": Session("s1", "alice")}
    placeholders = PlaceholderStore(b"k" * 32, lambda: live)
    callers = session_callers(placeholders, live)
    p1 = placeholders.issue("s1")
    assert callers(p1) == GitCaller("s1", "alice")
    assert callers("forged") is None
    # The same key gives the same placeholder: one that outlives a restart
    # of capsule.
    assert session_callers(PlaceholderStore(b"k" * 32, lambda: live), live)(p1) \
        == GitCaller("s1", "alice")
    SessionObservers([placeholders]).session_ended(live.pop("s1"))
    assert callers(p1) is None


# -- the resource, with a fake upstream ------------------------------------------------------

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
    def __init__(self, code, headers=None, chunks=(), end=True):
        self.code = code
        self.headers = Headers(headers or {})
        self.chunks = chunks
        self.end = end
        self.protocol = None
        self.transport = FakeTransport()

    def deliverBody(self, protocol):
        self.protocol = protocol
        protocol.makeConnection(self.transport)
        for chunk in self.chunks:
            protocol.dataReceived(chunk)
        if self.end:
            protocol.connectionLost(Failure(ResponseDone()))


class ListConsumer:
    def __init__(self):
        self.data = []

    def write(self, data):
        self.data.append(data)


class FakeAgent:
    def __init__(self, answer):
        self.answer = answer
        self.requests = []

    def request(self, method, uri, headers=None, body=None):
        if isinstance(body, GitBodyStream):
            # Streamed: what it passed on so far, as it comes.
            self.consumer = ListConsumer()
            self.body_done = body.startProducing(self.consumer)
            data = self.consumer.data
        else:
            data = None if body is None else body._inputFile.read()
        self.requests.append((method, uri, headers, data))
        answer = self.answer
        if isinstance(answer, Deferred):
            return answer
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)


def gateway_site(answer, *, tokens=lambda user: TOKEN, limits=GitLimits(), clock=None,
                 streaming=False):
    agent = FakeAgent(answer)
    root = DoorRoot()
    callers = {GOOD: GitCaller("session-1", "alice")}
    gateway = GitGateway(clock or Clock(), callers.get, tokens, upstream="https://upstream.test",
                         limits=limits, agent=agent)
    if streaming:
        # The door's gateway site, as services.py makes it.
        return make_gateway_site(None, clock or Clock(), git=gateway), agent, gateway
    root.putChild(b"git", gateway)
    return Site(root), agent, gateway


REFS = "/git/github.com/owner/private.git/info/refs?service=git-upload-pack"


def test_a_clone_request_goes_on_with_the_token_and_its_answer_comes_back():
    answer = FakeResponse(200, {b"content-type": [b"application/x-git-upload-pack-advertisement"],
                                b"set-cookie": [b"x=y"]}, [b"001e# service=git-upload-pack\n",
                                                           b"0000"])
    site, agent, _ = gateway_site(answer)
    response = ask(site, "GET", REFS, {"X-Capsule-Session": GOOD, "Git-Protocol": "version=2"})
    assert response.status == 200
    assert response.body == b"001e# service=git-upload-pack\n0000"
    assert response.headers["content-type"] == "application/x-git-upload-pack-advertisement"
    assert "set-cookie" not in response.headers
    ((method, uri, headers, _),) = agent.requests
    assert (method, uri) == (
        b"GET", b"https://upstream.test/owner/private.git/info/refs?service=git-upload-pack")
    assert headers.getRawHeaders(b"authorization") == [basic_authorization(TOKEN)]
    assert headers.getRawHeaders(b"x-capsule-session") is None
    assert headers.getRawHeaders(b"git-protocol") == [b"version=2"]


def test_a_push_body_goes_on():
    answer = FakeResponse(200, {b"content-type": [b"application/x-git-receive-pack-result"]},
                          [b"0000"])
    site, agent, gateway = gateway_site(answer)
    response = ask(site, "POST", "/git/github.com/owner/private.git/git-receive-pack",
                   {"X-Capsule-Session": GOOD,
                    "Content-Type": "application/x-git-receive-pack-request"},
                   b"0123456789" * 1000)
    assert response.status == 200
    ((method, uri, _, data),) = agent.requests
    assert (method, uri) == (b"POST", b"https://upstream.test/owner/private.git/git-receive-pack")
    assert data == b"0123456789" * 1000
    assert gateway._under_way == {}


@pytest.mark.parametrize("placeholder", [None, "forged", "x" * 300, "caf\xe9"])
def test_a_forged_placeholder_is_refused_with_a_sentence_git_prints(placeholder):
    site, agent, _ = gateway_site(FakeResponse(200))
    headers = {} if placeholder is None else {"X-Capsule-Session": placeholder}
    response = ask(site, "GET", REFS, headers)
    # Not 401: git would ask the terminal for a password.
    assert response.status == 403
    assert response.headers["content-type"].startswith("text/plain")
    assert response.headers["x-capsule-error"] == "bad_placeholder"
    assert b"forged, or its session ended" in response.body
    assert agent.requests == []


def test_a_path_outside_smart_http_is_refused():
    site, agent, _ = gateway_site(FakeResponse(200))
    response = ask(site, "GET", "/git/github.com/owner/private.git/HEAD",
                   {"X-Capsule-Session": GOOD})
    assert response.status == 404
    assert response.headers["x-capsule-error"] == "not_git"
    assert b"smart HTTP" in response.body
    assert agent.requests == []


def test_an_upstream_401_is_not_a_password_prompt():
    site, _, _ = gateway_site(FakeResponse(401, {b"www-authenticate": [b"Basic"]}, [b"no"]))
    response = ask(site, "GET", REFS, {"X-Capsule-Session": GOOD})
    assert response.status == 403
    assert response.headers["x-capsule-error"] == "token_refused"
    assert "www-authenticate" not in response.headers
    assert TOKEN.encode() not in response.body
    site, _, _ = gateway_site(FakeResponse(401), tokens=lambda user: None)
    response = ask(site, "GET", REFS, {"X-Capsule-Session": GOOD})
    assert b"capsule has none for you" in response.body


def test_an_unreachable_upstream_is_said():
    site, _, _ = gateway_site(ConnectionRefusedError("refused"))
    response = ask(site, "GET", REFS, {"X-Capsule-Session": GOOD})
    assert response.status == 502
    assert response.headers["x-capsule-error"] == "upstream_unreachable"
    assert b"could not reach GitHub" in response.body


def test_a_redirect_elsewhere_is_not_followed():
    site, _, _ = gateway_site(FakeResponse(301, {b"location": [b"https://evil.example/x"]}))
    response = ask(site, "GET", REFS, {"X-Capsule-Session": GOOD})
    assert response.status == 502
    site, _, _ = gateway_site(FakeResponse(
        301, {b"location": [b"https://upstream.test/new/name.git/info/refs"]}))
    response = ask(site, "GET", REFS, {"X-Capsule-Session": GOOD})
    assert response.status == 301
    assert response.headers["location"] == "/git/github.com/new/name.git/info/refs"


def test_a_body_over_the_limit_is_refused():
    site, agent, _ = gateway_site(FakeResponse(200), limits=GitLimits(max_body=100))
    response = ask(site, "POST", "/git/github.com/owner/private.git/git-receive-pack",
                   {"X-Capsule-Session": GOOD,
                    "Content-Type": "application/x-git-receive-pack-request"}, b"x" * 101)
    assert response.status == 413
    assert agent.requests == []


def test_a_wrong_content_type_is_refused():
    site, agent, _ = gateway_site(FakeResponse(200))
    response = ask(site, "POST", "/git/github.com/owner/private.git/git-receive-pack",
                   {"X-Capsule-Session": GOOD, "Content-Type": "text/plain"}, b"x")
    assert response.status == 415
    assert agent.requests == []


def test_a_session_has_a_few_requests_under_way_at_most():
    site, agent, gateway = gateway_site(Deferred(), limits=GitLimits(per_session=2))
    for _ in range(2):
        transport = send(site, "GET", REFS, {"X-Capsule-Session": GOOD})
        assert transport.value() == b""
    response = ask(site, "GET", REFS, {"X-Capsule-Session": GOOD})
    assert response.status == 429
    assert gateway._under_way == {"session-1": 2}


def test_an_upstream_that_says_nothing_is_given_up():
    clock = Clock()
    site, _, gateway = gateway_site(Deferred(), clock=clock,
                                    limits=GitLimits(stall=60.0))
    transport = send(site, "GET", REFS, {"X-Capsule-Session": GOOD})
    clock.advance(30)
    assert transport.value() == b""
    clock.advance(31)
    assert b"504" in transport.value().split(b"\r\n")[0]
    assert b"nothing came or went" in transport.value()
    assert gateway._under_way == {}


def test_a_slow_reader_pauses_the_upstream():
    answer = FakeResponse(200, {b"content-type": [b"application/x-git-upload-pack-result"]},
                          [b"x" * 1000], end=False)
    site, _, gateway = gateway_site(answer)
    transport = send(site, "GET", REFS, {"X-Capsule-Session": GOOD})
    # The session's side stops reading (its transport pauses the channel):
    # the upstream is paused; it reads again: resumed.
    transport.producer.pauseProducing()
    assert answer.transport.paused
    transport.producer.resumeProducing()
    assert not answer.transport.paused
    answer.protocol.connectionLost(Failure(ResponseDone()))
    assert transport.value().endswith(b"x" * 1000 + b"\r\n0\r\n\r\n")
    assert gateway._under_way == {}


def test_the_session_going_away_stops_the_upstream():
    answer = FakeResponse(200, {}, [b"x"], end=False)
    site, _, gateway = gateway_site(answer)
    transport = send(site, "GET", REFS, {"X-Capsule-Session": GOOD})
    transport.channel.connectionLost(Failure(ConnectionRefusedError("gone")))
    assert answer.transport.stopped
    assert gateway._under_way == {}


# -- streamed bodies ------------------------------------------------------------------------

PUSH = "/git/github.com/owner/private.git/git-receive-pack"
PUSH_HEADERS = {"X-Capsule-Session": GOOD, "Content-Type": "application/x-git-receive-pack-request",
                "Transfer-Encoding": "chunked"}


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def test_a_push_goes_on_as_it_comes_not_once_it_is_all_in():
    answer = Deferred()
    site, agent, gateway = gateway_site(answer, streaming=True)
    transport = send(site, "POST", PUSH, PUSH_HEADERS, b"", close=False)
    channel = transport.channel
    # The upstream is asked as soon as the headers are in.
    ((method, uri, headers, passed),) = agent.requests
    assert uri == b"https://upstream.test/owner/private.git/git-receive-pack"
    assert headers.getRawHeaders(b"authorization") == [basic_authorization(TOKEN)]
    channel.dataReceived(chunk(b"first piece"))
    assert passed == [b"first piece"]
    channel.dataReceived(chunk(b"second"))
    assert passed == [b"first piece", b"second"]
    assert not agent.body_done.called
    channel.dataReceived(b"0\r\n\r\n")
    assert agent.body_done.called
    answer.callback(FakeResponse(200, {b"content-type": [
        b"application/x-git-receive-pack-result"]}, [b"0000"]))
    response_bytes = transport.value()
    assert response_bytes.startswith(b"HTTP/1.1 200")
    assert response_bytes.endswith(b"4\r\n0000\r\n0\r\n\r\n")
    assert gateway._under_way == {}
    # The connection goes on: a next request is understood.
    assert not transport.disconnecting


def test_a_slow_upstream_stops_the_push_being_read():
    site, agent, _ = gateway_site(Deferred(), streaming=True)
    transport = send(site, "POST", PUSH, PUSH_HEADERS, b"", close=False)
    channel = transport.channel
    body = getattr(channel, "_channel", channel).requests[-1].content
    body.pauseProducing()
    piece = b"x" * 65536
    while transport.producerState == "producing":
        channel.dataReceived(chunk(piece))
        assert len(agent.consumer.data) == 0
    # Paused past the high water mark, not before; resumed once it is taken.
    assert body.received > BODY_HIGH_WATER
    assert body.received <= BODY_HIGH_WATER + 2 * len(piece)
    body.resumeProducing()
    assert transport.producerState == "producing"
    assert sum(map(len, agent.consumer.data)) == body.received


def test_a_chunked_push_past_the_limit_is_refused_and_the_connection_closed():
    clock = Clock()
    site, agent, gateway = gateway_site(Deferred(), streaming=True, clock=clock,
                                        limits=GitLimits(max_body=100))
    transport = send(site, "POST", PUSH, PUSH_HEADERS, b"", close=False)
    transport.channel.dataReceived(chunk(b"x" * 60))
    transport.channel.dataReceived(chunk(b"x" * 60))
    # The body producer failed, with the refusal; so does the upstream's request.
    failed = []
    agent.body_done.addErrback(failed.append)
    assert failed[0].value.status == 413
    agent.answer.errback(Failure(RuntimeError("the body failed")))
    clock.advance(0)
    out = transport.value()
    assert out.startswith(b"HTTP/1.1 413")
    assert b"larger than the git gateway takes (100 bytes)" in out
    assert transport.disconnecting
    assert gateway._under_way == {}


def test_a_declared_push_past_the_limit_is_refused_before_any_of_it_is_read():
    clock = Clock()
    site, agent, _ = gateway_site(Deferred(), streaming=True, clock=clock,
                                  limits=GitLimits(max_body=100))
    headers = {**PUSH_HEADERS, "Content-Length": "1000000"}
    del headers["Transfer-Encoding"]
    transport = send(site, "POST", PUSH, headers, b"", close=False)
    clock.advance(0)
    assert transport.value().startswith(b"HTTP/1.1 413")
    assert transport.disconnecting
    assert agent.requests == []


def test_a_forged_push_is_refused_before_its_body():
    clock = Clock()
    site, agent, _ = gateway_site(Deferred(), streaming=True, clock=clock)
    transport = send(site, "POST", PUSH, {**PUSH_HEADERS, "X-Capsule-Session": "forged"}, b"",
                     close=False)
    transport.channel.dataReceived(chunk(b"x" * 100))
    clock.advance(0)
    assert transport.value().startswith(b"HTTP/1.1 403")
    assert transport.disconnecting
    assert agent.requests == []


def test_a_get_of_the_streaming_site_is_as_ever_and_a_fetch_is_streamed():
    site, agent, _ = gateway_site(FakeResponse(200, {}, [b"ok"]), streaming=True)
    response = ask(site, "GET", REFS, {"X-Capsule-Session": GOOD})
    assert response.status == 200 and response.body == b"ok"
    answer = agent.answer = Deferred()
    transport = send(site, "POST", "/git/github.com/owner/private.git/git-upload-pack",
                     {"X-Capsule-Session": GOOD,
                      "Content-Type": "application/x-git-upload-pack-request"}, b"0000")
    assert agent.requests[-1][3] == [b"0000"]
    answer.callback(FakeResponse(200, {}, [b"pack"]))
    assert transport.value().startswith(b"HTTP/1.1 200")
    assert transport.value().endswith(b"4\r\npack\r\n0\r\n\r\n")


def test_an_answer_before_the_body_is_in_closes_the_connection_after_it():
    clock = Clock()
    site, agent, _ = gateway_site(FakeResponse(200, {}, [b"early"]), streaming=True,
                                  clock=clock)
    transport = send(site, "POST", PUSH, PUSH_HEADERS, b"", close=False)
    transport.channel.dataReceived(chunk(b"x" * 10))
    clock.advance(0)
    assert transport.value().startswith(b"HTTP/1.1 200")
    assert transport.disconnecting


def test_a_push_still_coming_is_not_a_stall():
    clock = Clock()
    site, agent, gateway = gateway_site(Deferred(), streaming=True, clock=clock,
                                        limits=GitLimits(stall=60.0))
    transport = send(site, "POST", PUSH, PUSH_HEADERS, b"", close=False)
    for _ in range(5):
        clock.advance(30)
        transport.channel.dataReceived(chunk(b"x" * 10))
    assert transport.value() == b""
    clock.advance(61)
    assert transport.value().startswith(b"HTTP/1.1 504")
    assert gateway._under_way == {}


def test_100_continue_only_for_a_push_the_gateway_takes():
    clock = Clock()
    site, agent, _ = gateway_site(Deferred(), streaming=True, clock=clock)
    expecting = {**PUSH_HEADERS, "Expect": "100-continue"}
    transport = send(site, "POST", PUSH, {**expecting, "X-Capsule-Session": "forged"}, b"",
                     close=False)
    clock.advance(0)
    assert transport.value().startswith(b"HTTP/1.1 403")
    assert b"100 Continue" not in transport.value()
    transport = send(site, "POST", PUSH, expecting, b"", close=False)
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert agent.requests[-1][2].getRawHeaders(b"expect") is None


def test_the_gateway_site_streams_gits_posts_and_limits_the_others():
    # One site behind the door: a git push streams to the git gateway, while
    # a body for /anthropic/ is still decided (and refused) before it is read.
    class Anthropic(Resource):
        isLeaf = True
        body_limit = 10
        seen = []

        def render_POST(self, request):
            self.seen.append(request.content.read())
            return b"ok"
    anthropic = Anthropic()
    agent = FakeAgent(Deferred())
    git = GitGateway(Clock(), {GOOD: GitCaller("session-1", "alice")}.get, lambda user: TOKEN,
                     upstream="https://upstream.test", agent=agent)
    site = make_gateway_site(anthropic, Clock(), git=git)
    response = ask(site, "POST", "/anthropic/v1/messages", {}, b"x" * 11)
    assert response.status == 413 and anthropic.seen == []
    assert ask(site, "POST", "/anthropic/v1/messages", {}, b"x" * 10).body == b"ok"
    transport = send(site, "POST", PUSH, PUSH_HEADERS, b"", close=False)
    # The push reached the upstream before its body is in, each piece
    # passed on as it comes, past /anthropic/'s limit and the default one.
    ((_, _, _, passed),) = agent.requests
    transport.channel.dataReceived(chunk(b"x" * 100_000))
    assert passed == [b"x" * 100_000] and not transport.disconnecting


def test_the_server_gives_git_and_anthropic_one_placeholder_and_mounts_git(
        monkeypatch, tmp_path):
    from twisted.internet.testing import MemoryReactorClock
    from capsule.services import make_service
    from capsule.tap import Options
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-real")
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    options = Options()
    options.parseOptions(["-l", "tcp:0:interface=127.0.0.1", "--state-dir", str(tmp_path)])
    service = make_service(options.config, MemoryReactorClock())
    manager = service.manager
    anthropic_environment = manager._session_environment[0]
    # The claude profile is fenced: its door is its network's gateway.
    for network in anthropic_environment._networks:
        monkeypatch.setattr(network, "gateways", lambda: ["172.18.0.1"])
    environment = manager._container_spec("s1", manager.profiles["claude"]).environment
    placeholder = environment["ANTHROPIC_AUTH_TOKEN"]
    assert "X-Capsule-Session: " + placeholder in environment.values()
    assert "url.http://172.18.0.1:3180/git/github.com/.insteadOf" in environment.values()
    assert TOKEN not in environment.values()
    # The door's site serves /git/ beside /anthropic/.
    site = manager._door.factory.site
    assert {b"git", b"anthropic"} <= set(site.resource.children)
