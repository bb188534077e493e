"""
Egress policies (capsule.core.egress) and the egress proxy behind the
session door (capsule.gateway.egress): names and wildcards, the addresses
never reached, the first-line switch, refusals and their counts, and
tunnels between two TCP sockets spliced in the kernel (real sockets on
loopback).
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from zope.interface import implementer

from capsule.core.egress import (AGENT_EGRESS, ALLOWLIST, NONE, OPEN, EgressPolicy,
                                 normalise_host, parse_egress, refused_address)
from capsule.core.profiles import (AGENT_PROFILE, Profile, ProfileError, builtin_profiles,
                                   fence, load_profiles)
from capsule.core.spec import ContainerSpec
from capsule.gateway.egress import (DoorFactory, EgressLimits, EgressProxy, host_addresses,
                                    proxy_environment)
from capsule.ops.metrics import Metrics
from capsule.sessions.by_address import SessionsByAddress
from tests.support.fakes import FakeDockerAPI

SPEC = ContainerSpec(image="capsule-runtime:latest", memory="1g", cpus=1, pids=64)


def profile(egress, name="agent") -> Profile:
    return Profile(name=name, spec=SPEC, egress=parse_egress(egress))


# -- names and policies --------------------------------------------------------

@pytest.mark.parametrize("given, expected", [
    ("PyPI.org", "pypi.org"), ("pypi.org.", "pypi.org"), ("bücher.example", "xn--bcher-kva.example"),
    ("[::1]", "::1"), ("127.000.0.1", None), ("0x7f.1", None), ("10.0.0.1", "10.0.0.1"),
])
def test_names_are_normalised(given, expected):
    if expected is None:
        with pytest.raises(ValueError):
            normalise_host(given)
    else:
        assert normalise_host(given) == expected


@pytest.mark.parametrize("bad", ["", "a..b", "-a.com", "a b.com", "x" * 64 + ".com",
                                 "exa_mple.com", "a.com..", "a/b"])
def test_what_is_not_a_name_is_refused(bad):
    with pytest.raises(ValueError):
        normalise_host(bad)


def test_wildcards_match_subdomains_only_whatever_the_case():
    policy = parse_egress(["*.GitHub.com", "pypi.org."])
    assert policy.mode == ALLOWLIST and policy.hosts == ("*.github.com", "pypi.org")
    assert policy.allows("api.github.com") and policy.allows("a.b.github.com")
    assert not policy.allows("github.com")
    assert not policy.allows("evilgithub.com")
    assert not policy.allows("github.com.evil.org")
    assert policy.allows("pypi.org") and not policy.allows("www.pypi.org")


def test_open_and_none():
    assert parse_egress("open").allows("anything.example") and not parse_egress("open").fenced
    none = parse_egress("none")
    assert none.fenced and not none.allows("pypi.org")


@pytest.mark.parametrize("bad", ["closed", 3, [3], ["*"], ["*.com"], ["a.*.com"],
                                 ["*.10.0.0.1"], {"a": 1}, ["exa mple.com"]])
def test_bad_policies_are_refused(bad):
    with pytest.raises((TypeError, ValueError)):
        parse_egress(bad)


# -- addresses -----------------------------------------------------------------

@pytest.mark.parametrize("address", [
    "169.254.169.254", "169.254.1.1", "10.1.2.3", "172.16.0.1", "172.31.255.255",
    "192.168.1.1", "100.64.0.1", "127.0.0.1", "127.8.8.8", "0.0.0.0", "224.0.0.1",
    "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "fd12::1", "ff02::1",
    "::ffff:10.0.0.1", "::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe", "2002:a00:1::1",
])
def test_addresses_never_reached(address):
    assert refused_address(address) is not None


@pytest.mark.parametrize("address", ["1.1.1.1", "151.101.0.223", "2606:4700::1111",
                                     "172.32.0.1"])
def test_public_addresses_are_reachable(address):
    assert refused_address(address) is None


def test_the_operator_names_an_address_and_the_hosts_own_are_refused():
    allowed = [ipaddress.ip_network("10.9.0.0/16")]
    assert refused_address("10.9.1.1", allowed) is None
    assert refused_address("10.8.1.1", allowed) is not None
    assert "host" in refused_address("203.0.113.7", own=["203.0.113.7"])
    assert refused_address("203.0.113.7", [ipaddress.ip_network("203.0.113.7/32")],
                           own=["203.0.113.7"]) is None


def test_the_hosts_own_addresses_are_read():
    assert "127.0.0.1" in host_addresses()


# -- profiles ------------------------------------------------------------------

def builtins():
    return builtin_profiles(Profile(name="shell", spec=SPEC), agent_image="capsule-agent:t")


def test_builtins_shell_is_open_and_claude_has_the_agent_list():
    profiles = builtins()
    assert profiles["shell"].egress.mode == OPEN
    claude = profiles[AGENT_PROFILE].egress
    assert claude.mode == ALLOWLIST and claude.hosts == AGENT_EGRESS
    for host in ("registry.npmjs.org", "pypi.org", "files.pythonhosted.org", "github.com",
                 "api.github.com", "raw.githubusercontent.com", "deb.debian.org"):
        assert claude.allows(host)
    assert not claude.allows("example.com")


def test_fenced_profiles_go_to_the_fenced_network_unless_they_have_none():
    profiles = builtins()
    profiles["off"] = replace(profiles["claude"], name="off",
                              spec=replace(SPEC, network="none"))
    fenced = fence(profiles, "capsule-fenced")
    assert fenced["shell"].spec.network == SPEC.network
    assert fenced["claude"].spec.network == "capsule-fenced"
    assert fenced["off"].spec.network == "none"


def test_a_file_sets_egress(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[profiles.web]\negress = ["Example.COM.", "*.example.org"]\n'
                    '[profiles.shut]\negress = "none"\n'
                    '[profiles.free]\nextends = "claude"\negress = "open"\n')
    profiles = load_profiles(str(path), builtins())
    assert profiles["web"].egress == EgressPolicy(ALLOWLIST, ("example.com", "*.example.org"))
    assert profiles["shut"].egress.mode == NONE
    assert profiles["free"].egress.mode == OPEN


@pytest.mark.parametrize("text, expected", [
    ('[profiles.web]\negress = ["ex ample.com"]\n', "profile 'web': key 'egress': not a host"),
    ('[profiles.web]\negress = "closed"\n', "profile 'web': key 'egress': must be"),
    ('[profiles.web]\negress = ["*"]\n', "profile 'web': key 'egress': a wildcard"),
    ('[profiles.web]\negress = "none"\nnetwork = "mynet"\n',
     "profile 'web': key 'network': a profile whose egress is not open"),
])
def test_bad_egress_is_refused_naming_file_profile_and_key(tmp_path, text, expected):
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(ProfileError) as caught:
        load_profiles(str(path), builtins())
    assert str(caught.value).startswith(str(path)) and expected in str(caught.value)


# -- the proxy -----------------------------------------------------------------

class FakeSession:
    def __init__(self, settings, session_id="s1"):
        self.id = session_id
        self.settings = settings
        self.client = NoticedClient()


class NoticedClient:
    def __init__(self):
        self.notices = []

    def session_notice(self, code, message):
        self.notices.append((code, message))


class FakeSite:
    def __init__(self):
        self.protocols = []

    def buildProtocol(self, addr):
        protocol = Recording()
        self.protocols.append(protocol)
        return protocol


class Recording(Protocol):
    def __init__(self):
        self.received = b""
        self.lost = False

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason=None):
        self.lost = True


class HalfTransport(StringTransport):
    write_closed = False

    def loseWriteConnection(self):
        self.write_closed = True


class Upstreams:
    """
    Connections the proxy makes: each gets a StringTransport.
    """

    def __init__(self):
        self.made = []

    def __call__(self, address, port, factory):
        protocol = factory.buildProtocol(None)
        transport = HalfTransport()
        protocol.makeConnection(transport)
        self.made.append((address, port, protocol, transport))
        return succeed(protocol)


def make_door(settings, names=None, limits=EgressLimits(), session="s1", **options):
    clock = Clock()
    names = {"pypi.org": ["151.101.0.223"], "internal.example": ["10.0.0.5"],
             **(names or {})}

    def resolve(host, port):
        if host not in names:
            return fail(OSError("Name or service not known"))
        return succeed(names[host])
    upstreams = Upstreams()
    metrics = Metrics()
    proxy = EgressProxy(clock, resolve=resolve, own=["198.51.100.2"], metrics=metrics,
                        limits=limits, connect=upstreams, **options)
    site = FakeSite()
    sessions = {} if session is None else {"s1": FakeSession(settings, session)}
    factory = DoorFactory(proxy, site, lambda transport: sessions.get("s1"))
    factory.session = sessions.get("s1")
    return clock, proxy, site, upstreams, factory, metrics


def connect(factory):
    protocol = factory.buildProtocol(None)
    transport = HalfTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_anything_else_goes_to_the_site_unchanged():
    _, _, site, upstreams, factory, _ = make_door(profile(["pypi.org"]))
    protocol, transport = connect(factory)
    protocol.dataReceived(b"GET /anthropic/v1/messages HTTP/1.1\r\nHo")
    protocol.dataReceived(b"st: door\r\n\r\n")
    [inner] = site.protocols
    assert inner.received == b"GET /anthropic/v1/messages HTTP/1.1\r\nHost: door\r\n\r\n"
    assert inner.transport is transport and upstreams.made == []
    protocol.connectionLost(None)
    assert inner.lost


def test_connect_to_an_allowed_host_is_a_tunnel():
    _, proxy, _, upstreams, factory, _ = make_door(profile(["pypi.org"]))
    protocol, transport = connect(factory)
    protocol.dataReceived(b"CONNECT pypi.org:443 HTTP/1.1\r\nHost: pypi.org:443\r\n\r\n"
                          b"\x16\x03\x01early")
    [(address, port, upstream, upstream_transport)] = upstreams.made
    assert (address, port) == ("151.101.0.223", 443)
    assert transport.value() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert upstream_transport.value() == b"\x16\x03\x01early"
    protocol.dataReceived(b"more")
    upstream.dataReceived(b"answer")
    assert upstream_transport.value().endswith(b"more")
    assert transport.value().endswith(b"answer")
    # Backpressure: each side's transport produces for the other.
    assert upstream_transport.producer is transport and transport.producer is upstream_transport
    # Not both TCP sockets: copied through capsule, not spliced.
    assert protocol.splicers == []
    assert proxy.tunnels == {"s1": 1}
    upstream.connectionLost(None)
    assert transport.disconnecting
    protocol.connectionLost(None)
    assert proxy.tunnels == {}


def test_a_refused_host_is_told_with_the_setting_that_allows_it():
    _, proxy, _, upstreams, factory, metrics = make_door(profile(["pypi.org"], name="claude"))
    protocol, transport = connect(factory)
    protocol.dataReceived(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert (b"capsule: egress to example.com refused: profile claude allows only its egress"
            b" list; add example.com to egress in the profiles file") in answer
    assert b"X-Capsule-Egress: capsule: egress to example.com refused" in answer
    assert transport.disconnecting and upstreams.made == []
    assert proxy.refusals == {"s1": 1}
    assert metrics.registry.get_sample_value("capsule_egress_refusals_total",
                                             {"reason": "policy"}) == 1
    # The terminal is told too, at the log's rate (once a minute per kind).
    [(code, message)] = factory.session.client.notices
    assert code == "egress_refused" and message.startswith("capsule: egress to example.com")
    protocol, transport = connect(factory)
    protocol.dataReceived(b"CONNECT example.org:443 HTTP/1.1\r\n\r\n")
    assert proxy.refusals == {"s1": 2} and len(factory.session.client.notices) == 1


def test_none_refuses_everything():
    _, _, _, upstreams, factory, _ = make_door(profile("none", name="shut"))
    protocol, transport = connect(factory)
    protocol.dataReceived(b"CONNECT pypi.org:443 HTTP/1.1\r\n\r\n")
    assert b"profile shut allows no egress" in transport.value() and upstreams.made == []


def test_a_name_resolving_to_a_private_address_is_refused_even_when_open():
    _, _, _, upstreams, factory, _ = make_door(
        profile("open"), names={"rebind.example": ["151.101.0.1", "10.0.0.5"]})
    for target in (b"internal.example:443", b"rebind.example:443", b"169.254.169.254:80",
                   b"127.0.0.1:443", b"[::1]:443", b"198.51.100.2:443"):
        protocol, transport = connect(factory)
        protocol.dataReceived(b"CONNECT " + target + b" HTTP/1.1\r\n\r\n")
        assert transport.value().startswith(b"HTTP/1.1 403"), target
        assert b"never reachable from a session" in transport.value()
    assert upstreams.made == []


def test_the_operator_allows_an_address_and_a_port():
    _, _, _, upstreams, factory, _ = make_door(
        profile(["internal.example"]), allowed=[ipaddress.ip_network("10.0.0.0/24")],
        ports=(80, 443, 8080))
    protocol, transport = connect(factory)
    protocol.dataReceived(b"CONNECT internal.example:8080 HTTP/1.1\r\n\r\n")
    assert upstreams.made[0][:2] == ("10.0.0.5", 8080)
    protocol, transport = connect(factory)
    protocol.dataReceived(b"CONNECT internal.example:22 HTTP/1.1\r\n\r\n")
    assert b"port 22 refused" in transport.value() and len(upstreams.made) == 1


def test_plain_http_is_forwarded_as_an_origin_request():
    _, _, _, upstreams, factory, _ = make_door(profile(["pypi.org"]))
    protocol, transport = connect(factory)
    protocol.dataReceived(b"GET http://PyPI.org/simple/?q=1 HTTP/1.1\r\nHost: pypi.org\r\n"
                          b"Proxy-Connection: keep-alive\r\nProxy-Authorization: x\r\n"
                          b"Accept: */*\r\n\r\n")
    [(address, port, upstream, upstream_transport)] = upstreams.made
    assert (address, port) == ("151.101.0.223", 80)
    assert upstream_transport.value() == (b"GET /simple/?q=1 HTTP/1.1\r\nHost: pypi.org\r\n"
                                          b"Accept: */*\r\nConnection: close\r\n\r\n")
    assert transport.value() == b""
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nhi")
    assert transport.value() == b"HTTP/1.1 200 OK\r\n\r\nhi"


def test_plain_http_to_a_refused_host_reads_the_message():
    _, _, _, _, factory, _ = make_door(profile(["pypi.org"], name="claude"))
    protocol, transport = connect(factory)
    protocol.dataReceived(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert transport.value().endswith(
        b"\r\n\r\ncapsule: egress to example.com refused: profile claude allows only its"
        b" egress list; add example.com to egress in the profiles file ([profiles.claude]"
        b" egress = [..., \"example.com\"])\n")


def test_limits_of_the_head():
    limits = EgressLimits(first_line=64, header=256, head_timeout=5)
    clock, _, _, _, factory, _ = make_door(profile(["pypi.org"]), limits=limits)
    protocol, transport = connect(factory)
    protocol.dataReceived(b"G" * 65)
    assert transport.value().startswith(b"HTTP/1.1 400") and transport.disconnecting
    protocol, transport = connect(factory)
    protocol.dataReceived(b"CONNECT pypi.org:443 HTTP/1.1\r\n" + b"X: y\r\n" * 60)
    assert transport.value().startswith(b"HTTP/1.1 431")
    protocol, transport = connect(factory)
    protocol.dataReceived(b"CONNECT pypi.org:443 HTTP/1.1\r\n")
    clock.advance(5)
    assert transport.value().startswith(b"HTTP/1.1 408") and transport.disconnecting


def test_an_unknown_source_and_a_bad_target_are_refused():
    _, _, _, _, factory, _ = make_door(profile(["pypi.org"]), session=None)
    protocol, transport = connect(factory)
    protocol.dataReceived(b"CONNECT pypi.org:443 HTTP/1.1\r\n\r\n")
    assert b"sessions only" in transport.value()
    _, _, _, _, factory, _ = make_door(profile("open"))
    protocol, transport = connect(factory)
    protocol.dataReceived(b"CONNECT pypi.org HTTP/1.1\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 400")


def test_tunnels_per_session_and_idle_ones_are_closed():
    clock, proxy, _, upstreams, factory, _ = make_door(
        profile(["pypi.org"]), limits=EgressLimits(tunnels=2, idle_timeout=60))
    held = []
    for _ in range(2):
        protocol, transport = connect(factory)
        protocol.dataReceived(b"CONNECT pypi.org:443 HTTP/1.1\r\n\r\n")
        held.append((protocol, transport))
    protocol, transport = connect(factory)
    protocol.dataReceived(b"CONNECT pypi.org:443 HTTP/1.1\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 429") and len(upstreams.made) == 2
    # One is busy, the other idle: only the idle one is closed.
    clock.advance(30)
    held[0][0].dataReceived(b"busy")
    clock.advance(30)
    assert not held[0][1].disconnecting and held[1][1].disconnecting
    clock.advance(60)
    assert held[0][1].disconnecting


def test_a_session_without_network_is_identified_by_its_session():
    _, _, _, upstreams, factory, _ = make_door(profile(["pypi.org"]), session=None)
    protocol = factory.for_session(FakeSession(profile(["pypi.org"])))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"CONNECT pypi.org:443 HTTP/1.1\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200") and len(upstreams.made) == 1
    assert protocol.splicers == []


def test_fenced_sessions_environment_points_at_the_door():
    hook = proxy_environment(lambda p: "172.30.0.1", 3180)
    assert hook("s", profile("open")) == {}
    env = hook("s", profile(["pypi.org"]))
    assert env["HTTPS_PROXY"] == env["http_proxy"] == "http://172.30.0.1:3180"
    assert env["NO_PROXY"] == env["no_proxy"] == "172.30.0.1,localhost,127.0.0.1"
    assert proxy_environment(lambda p: None, 3180)("s", profile("none")) == {}


# -- which session -------------------------------------------------------------

class FakeManager:
    def __init__(self, sessions):
        self.sessions = {s.id: s for s in sessions}

        class Pool:
            held = []
        self.pool = Pool()


class Core:
    message = None


class AddressedSession:
    def __init__(self, session_id, container_id):
        self.id = session_id
        self.container_id = container_id
        self.core = Core()


def test_sessions_are_found_by_their_address():
    docker = FakeDockerAPI()
    docker.addresses["capsule-fenced"] = {"172.30.0.2": "c1"}
    clock = Clock()
    session = AddressedSession("s1", "c1")
    manager = FakeManager([session])
    by_address = SessionsByAddress(manager, docker, clock, lambda: ["capsule-fenced"])
    found = []
    Deferred.fromCoroutine(by_address.find("172.30.0.2")).addCallback(found.append)
    assert found == [session]
    # An unknown address is looked for again, at most every REFRESH_EVERY.
    Deferred.fromCoroutine(by_address.find("172.30.0.3")).addCallback(found.append)
    assert found == [session]
    docker.addresses["capsule-fenced"]["172.30.0.3"] = "c2"
    clock.advance(by_address.REFRESH_EVERY)
    assert found == [session, None]
    manager.sessions["s2"] = AddressedSession("s2", "c2")
    Deferred.fromCoroutine(by_address.find("172.30.0.3")).addCallback(found.append)
    assert found == [session, None, manager.sessions["s2"]]
    # An ended session's address is nobody's.
    session.core = type("Ended", (), {"message": "ended"})()
    Deferred.fromCoroutine(by_address.find("172.30.0.2")).addCallback(found.append)
    clock.advance(1)
    assert found[-1] is None


# -- the fenced network --------------------------------------------------------

def test_the_fenced_network_is_made_internal():
    from capsule.engine.network import FENCED_BRIDGE, FENCED_NETWORK, SessionNetwork
    docker = FakeDockerAPI()
    network = SessionNetwork(docker, Clock(), FENCED_NETWORK)
    Deferred.fromCoroutine(network.ensure())
    made = docker.networks[FENCED_NETWORK]
    assert made["internal"] is True
    assert made["options"]["com.docker.network.bridge.name"] == FENCED_BRIDGE
    assert made["options"]["com.docker.network.bridge.enable_icc"] == "false"
    assert network.gateways() == made["gateways"]


def test_a_fenced_network_with_a_route_out_is_refused():
    from capsule.engine.network import FENCED_NETWORK, NotFenced, SessionNetwork
    docker = FakeDockerAPI()
    docker.ensure_network(FENCED_NETWORK, {}, {}, internal=False)
    network = SessionNetwork(docker, Clock(), FENCED_NETWORK)
    failures = []
    Deferred.fromCoroutine(network.ensure()).addErrback(failures.append)
    assert failures[0].check(NotFenced) and "not internal" in str(failures[0].value)
    assert network.gateways() == []


def test_ports_out_of_range_are_bad_targets():
    _, _, _, upstreams, factory, _ = make_door(profile("open"))
    for line in (b"CONNECT pypi.org:0 HTTP/1.1", b"CONNECT pypi.org:70000 HTTP/1.1",
                 b"GET http://pypi.org:0/ HTTP/1.1"):
        protocol, transport = connect(factory)
        protocol.dataReceived(line + b"\r\n\r\n")
        assert transport.value().startswith(b"HTTP/1.1 400"), line
    assert upstreams.made == []


def test_a_tunnel_carries_a_half_close_either_way():
    _, _, _, upstreams, factory, _ = make_door(profile(["pypi.org"]))
    protocol, transport = connect(factory)
    protocol.dataReceived(b"CONNECT pypi.org:443 HTTP/1.1\r\n\r\n")
    [(_, _, upstream, upstream_transport)] = upstreams.made
    # The session shuts its sending side: the upstream hears it, and still answers.
    protocol.readConnectionLost()
    assert upstream_transport.write_closed and not upstream_transport.disconnecting
    upstream.dataReceived(b"answer")
    assert transport.value().endswith(b"answer") and not transport.disconnecting
    # Then the upstream ends: both go.
    upstream.readConnectionLost()
    assert transport.disconnecting and upstream_transport.disconnecting


def test_head_ends_at_its_first_blank_line():
    _, _, _, upstreams, factory, _ = make_door(profile(["pypi.org"]))
    protocol, transport = connect(factory)
    protocol.dataReceived(b"CONNECT pypi.org:443 HTTP/1.1\n\nearly\r\n\r\n")
    [(_, _, _, upstream_transport)] = upstreams.made
    assert upstream_transport.value() == b"early\r\n\r\n"


def test_a_request_then_a_half_close_still_gets_its_answer():
    _, _, _, _, factory, _ = make_door(profile(["pypi.org"]))
    protocol, transport = connect(factory)
    # The connection to the upstream is made later than the half-close.
    pending = []
    waiting = Deferred()
    factory.proxy.connect = lambda address, port, f: (pending.append(f), waiting)[1]
    protocol.dataReceived(b"GET http://pypi.org/ HTTP/1.0\r\n\r\n")
    protocol.readConnectionLost()
    assert not transport.disconnecting
    upstream = pending[0].buildProtocol(None)
    upstream_transport = HalfTransport()
    upstream.makeConnection(upstream_transport)
    waiting.callback(upstream)
    assert upstream_transport.value().startswith(b"GET / HTTP/1.0")
    assert upstream_transport.write_closed
    upstream.dataReceived(b"HTTP/1.0 200 OK\r\n\r\nok")
    assert transport.value().endswith(b"ok")


# -- spliced: both ends TCP sockets ----------------------------------------------

@implementer(IHalfCloseableProtocol)
class Far(Protocol):
    """
    An upstream (or a session's client): keeps what it receives; answers
    C{answer} once the other side has shut its sending side.
    """

    def __init__(self, answer=b"", first=b""):
        self.answer, self.first = answer, first
        self.received = bytearray()
        self.finished = Deferred()
        self.ended = Deferred()

    def connectionMade(self):
        if self.first:
            self.transport.write(self.first)

    def dataReceived(self, data):
        self.received += data

    def readConnectionLost(self):
        self.finished.callback(self.received)
        if self.answer:
            self.transport.write(self.answer)
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason=None):
        if not self.finished.called:
            self.finished.callback(self.received)
        self.ended.callback(self.received)


async def spliced_door(answer: bytes, limits=EgressLimits()):
    """
    A door and an upstream on loopback, with real sockets (the reactor's),
    the door's timers on a clock.
    """
    from twisted.internet import reactor
    upstreams = []

    def far():
        upstreams.append(Far(answer))
        return upstreams[-1]
    listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(far))
    port = listening.getHost().port
    clock = Clock()
    proxy = EgressProxy(
        clock, allowed=[ipaddress.ip_network("127.0.0.1/32")], ports=[port], own=[],
        limits=limits,
        connect=lambda address, port, factory: TCP4ClientEndpoint(
            reactor, address, port).connect(factory))
    session = FakeSession(profile(["127.0.0.1"]))
    doors = []
    factory = DoorFactory(proxy, FakeSite(), lambda transport: session)
    build = factory.buildProtocol
    factory.buildProtocol = lambda addr: doors.append(build(addr)) or doors[-1]
    door = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    return reactor, clock, proxy, port, upstreams, doors, (listening, door)


async def within(d, seconds=20):
    from twisted.internet import reactor
    return await d.addTimeout(seconds, reactor)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("kind", ["connect", "http"])
async def test_a_tunnel_between_tcp_sockets_is_spliced_half_closes_and_all(kind):
    answer = bytes(range(256)) * 8192  # 2 MiB
    reactor, _, proxy, port, upstreams, doors, listening = await spliced_door(answer)
    try:
        payload = b"\x16\x03\x01" + bytes(range(251)) * 4096
        head = (f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n" if kind == "connect" else
                f"POST http://127.0.0.1:{port}/up HTTP/1.1\r\nHost: x\r\n\r\n").encode()
        client = Far(first=head)
        await TCP4ClientEndpoint(reactor, "127.0.0.1", listening[1].getHost().port).connect(
            Factory.forProtocol(lambda: client))
        if kind == "connect":
            while b"\r\n\r\n" not in client.received:
                await within(_turn(reactor))
            assert client.received == b"HTTP/1.1 200 Connection established\r\n\r\n"
        while not upstreams:
            await within(_turn(reactor))
        # The session sends, then shuts its sending side: the upstream hears
        # all of it and the end, then answers, and both ends close.
        client.transport.write(payload)
        client.transport.loseWriteConnection()
        received = await within(upstreams[0].finished)
        if kind == "http":
            head_sent, _, received = received.partition(b"\r\n\r\n")
            assert head_sent.startswith(b"POST /up HTTP/1.1\r\n")
            assert b"Connection: close" in head_sent
        assert received == payload
        got = await within(client.ended)
        if kind == "connect":
            got = got.partition(b"\r\n\r\n")[2]
        assert got == answer
        [door] = doors
        # The bytes went through the kernel, both ways, not through capsule.
        assert [s.moved > 0 for s in door.splicers] == [True, True]
        assert sum(s.moved for s in door.splicers) <= len(payload) + len(answer)
        assert all(s.closed for s in door.splicers) and proxy.tunnels == {}
    finally:
        for port_ in listening:
            await port_.stopListening()


@pytest_twisted.ensureDeferred
async def test_without_a_pipe_a_tunnel_between_tcp_sockets_is_copied(monkeypatch):
    import os

    def no_pipe(flags):
        raise OSError(24, "Too many open files")
    monkeypatch.setattr(os, "pipe2", no_pipe)
    answer = b"a" * 300_000
    reactor, _, proxy, port, upstreams, doors, listening = await spliced_door(answer)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        client = Far(first=f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        await TCP4ClientEndpoint(reactor, "127.0.0.1", listening[1].getHost().port).connect(
            Factory.forProtocol(lambda: client))
        while not client.received or not upstreams:
            await within(_turn(reactor))
        client.transport.write(b"through")
        client.transport.loseWriteConnection()
        assert await within(upstreams[0].finished) == b"through"
        got = await within(client.ended)
        assert got == b"HTTP/1.1 200 Connection established\r\n\r\n" + answer
        assert doors[0].splicers == []
        # Said once (both ways failed: one line, at the log's rate).
        said = [formatEvent(e) for e in events if "copied, not spliced" in formatEvent(e)]
        assert said == ["egress: a tunnel of session s1 is copied, not spliced:"
                        " [Errno 24] Too many open files"]
    finally:
        globalLogPublisher.removeObserver(events.append)
        for port_ in listening:
            await port_.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_spliced_tunnel_idle_for_its_limit_is_closed():
    reactor, clock, proxy, port, upstreams, doors, listening = await spliced_door(
        b"", limits=EgressLimits(idle_timeout=60))
    try:
        client = Far(first=f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        await TCP4ClientEndpoint(reactor, "127.0.0.1", listening[1].getHost().port).connect(
            Factory.forProtocol(lambda: client))
        while not client.received or not upstreams:
            await within(_turn(reactor))
        [door] = doors
        assert len(door.splicers) == 2
        # Busy through the splice (capsule never sees the bytes): kept.
        client.transport.write(b"busy")
        while upstreams[0].received != b"busy":
            await within(_turn(reactor))
        clock.advance(60)
        assert proxy.tunnels == {"s1": 1} and not door.transport.disconnecting
        # Then idle for as long: closed.
        clock.advance(60)
        await within(client.ended)
        assert proxy.tunnels == {}
    finally:
        for port_ in listening:
            await port_.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_spliced_tunnel_reads_no_more_than_its_reader_takes():
    size = 32 * 1024 * 1024
    reactor, _, proxy, port, upstreams, doors, listening = await spliced_door(b"")
    try:
        client = Far(first=f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        await TCP4ClientEndpoint(reactor, "127.0.0.1", listening[1].getHost().port).connect(
            Factory.forProtocol(lambda: client))
        while not client.received or not upstreams:
            await within(_turn(reactor))
        [door] = doors
        # The session reads nothing: the upstream's bytes stop at what the
        # kernel's buffers and one pipe hold, and capsule stops reading.
        client.transport.pauseProducing()
        upstreams[0].transport.write(b"x" * size)
        moved = -1
        while door.splicers[1].moved != moved:
            moved = door.splicers[1].moved
            for _ in range(10):
                await within(_turn(reactor))
        assert 0 < moved < size and door.splicers[1].pending <= EgressLimits().splice
        assert len(upstreams[0].transport.dataBuffer) + upstreams[0].transport._tempDataLen > 0
        # It reads again: all of it arrives.
        client.transport.resumeProducing()
        while len(client.received) < len(b"HTTP/1.1 200 Connection established\r\n\r\n") + size:
            await within(_turn(reactor))
        assert door.splicers[1].moved == size
        client.transport.loseConnection()
        await within(client.ended)
        while proxy.tunnels:
            await within(_turn(reactor))
        assert all(s.closed for s in door.splicers)
    finally:
        for port_ in listening:
            await port_.stopListening()


def _turn(reactor):
    d = Deferred()
    reactor.callLater(0.01, d.callback, None)
    return d
