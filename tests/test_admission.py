"""
Admission control: the pure logic with a Clock, then the WebSocket endpoint
in memory refusing new sessions with the right frame and close code while
nothing is made.
"""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace

import pytest
from twisted.internet.task import Clock

from capsule.core.memory import MemoryBudget, default_reserve, host_capacity
from capsule.core.admission import (QUOTA_EXCEEDED, SERVER_FULL, AdmissionControl, AdmissionPolicy,
                               AdmissionRefused, TokenBucket, parse_network, parse_rate)
from tests.support.fakes import FakeDockerAPI
from capsule.sessions.service import SessionService
from capsule.web.websocket_factory import CapsuleServerFactory

from .in_memory import Link, clock, docker, manager  # noqa: F401 (fixtures)

GIB = 1024 ** 3
MIB = 1024 ** 2


# -- parsing -----------------------------------------------------------------------------

def test_parse_rate():
    assert parse_rate("10/60") == (10, 60.0)
    assert parse_rate("1/0.5") == (1, 0.5)


@pytest.mark.parametrize("text", ["10", "0/60", "10/0", "-1/60", "x/60", "10/inf", "10/nan",
                                  "/60", ""])
def test_parse_rate_refuses(text):
    with pytest.raises(ValueError):
        parse_rate(text)


# -- the token bucket --------------------------------------------------------------------

def test_a_bucket_allows_a_burst_then_refills_at_its_rate():
    bucket = TokenBucket(3, 60.0, now=100.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.retry_after(100.0) == pytest.approx(20.0)
    assert bucket.take(119.0) is False
    assert bucket.take(120.0) is True
    assert bucket.take(120.0) is False
    # Never more than its capacity, however long it waited.
    assert bucket.tokens(10_000.0) == 3.0 and bucket.full(10_000.0)


def test_a_bucket_ignores_a_clock_going_back():
    bucket = TokenBucket(1, 10.0, now=50.0)
    assert bucket.take(50.0)
    assert not bucket.take(40.0)
    assert bucket.tokens(55.0) == pytest.approx(0.5)


# -- the decisions ------------------------------------------------------------------------

class Counted:
    """
    What admission control reads of a session manager.
    """

    def __init__(self) -> None:
        self.sessions: dict[str, object] = {}
        self.pool = Pool()
        self.profiles: dict[str, object] = {}
        self._next = 0

    def make(self, admission: AdmissionControl, address: str, profile=None) -> str:
        admission.admit(address, profile=profile)
        # Like the session manager: no profile named is the shell profile.
        profile = profile or self.profiles.get("shell")
        name = profile.name if profile is not None else None
        for warm in self.pool.ready:
            if getattr(warm.settings, "name", None) == name:
                self.pool.ready.remove(warm)
                break
        self._next += 1
        session_id = f"s{self._next}"
        self.sessions[session_id] = SimpleNamespace(settings=profile)
        admission.created(session_id, address)
        return session_id


class Pool:
    """
    What admission control reads of the warm pools: the sessions they hold.
    """

    def __init__(self) -> None:
        self.ready: list = []
        self.making: list = []

    @property
    def held(self) -> list:
        return [*self.ready, *self.making]


def warm(profile=None):
    return SimpleNamespace(settings=profile)


def profile(name: str, request: int):
    return SimpleNamespace(name=name, request=request)


class Host:
    """
    A fake reading of the engine host's memory (capsule.core.memory.HostReading).
    """

    def __init__(self, available: int | None = None, used=None) -> None:
        self.available = available
        self.measured = dict(used or {})

    def used(self, container_id):
        return self.measured.get(container_id)


def control(clock=None, session_request=None, memory_budget=None, reserve=None, host=None,
            **policy):
    manager = Counted()
    policy.setdefault("rate", None)
    memory = None
    if session_request is not None:
        memory = MemoryBudget(session_request, budget=memory_budget, reserve=reserve,
                              reading=host)
    return manager, AdmissionControl(manager, clock or Clock(), AdmissionPolicy(**policy),
                                     memory=memory)


def refused(admission, address) -> tuple[str, str]:
    with pytest.raises(AdmissionRefused) as caught:
        admission.admit(address)
    return caught.value.code, caught.value.message


def test_the_per_client_limit_counts_live_sessions_by_creator():
    manager, admission = control(max_sessions=10, max_per_client=2)
    first = manager.make(admission, "a")
    manager.make(admission, "a")
    code, message = refused(admission, "a")
    assert code == QUOTA_EXCEEDED and "at most 2 at once" in message
    # Another client is not affected.
    manager.make(admission, "b")
    # A session that ended frees its creator's place.
    del manager.sessions[first]
    manager.make(admission, "a")
    assert admission.sessions_of("a") == 2 and admission.sessions_of("b") == 1


def test_sessions_not_created_here_count_only_globally():
    manager, admission = control(max_sessions=3, max_per_client=1)
    manager.sessions["recovered-1"] = manager.sessions["recovered-2"] = object()
    manager.make(admission, "a")
    code, message = refused(admission, "b")
    assert code == SERVER_FULL and "3 sessions" in message


def test_the_global_limit_is_server_full():
    manager, admission = control(max_sessions=2, max_per_client=5)
    manager.make(admission, "a")
    manager.make(admission, "b")
    assert refused(admission, "c")[0] == SERVER_FULL


def test_the_creators_of_ended_sessions_are_forgotten():
    manager, admission = control(max_sessions=100, max_per_client=100)
    for _ in range(50):
        session_id = manager.make(admission, "a")
        del manager.sessions[session_id]
    manager.make(admission, "a")
    assert len(admission._creators) == 1


def test_the_rate_refuses_a_burst_and_recovers_with_time():
    clock = Clock()
    manager, admission = control(clock, max_sessions=100, max_per_client=100, rate=(3, 30.0))
    for _ in range(3):
        manager.make(admission, "a")
    code, message = refused(admission, "a")
    assert code == QUOTA_EXCEEDED
    assert message == ("too many new sessions from a (at most 3 per 30 s): try again in 10 s")
    # Refusals cost nothing; other clients have their own buckets.
    manager.make(admission, "b")
    clock.advance(9.9)
    assert refused(admission, "a")[0] == QUOTA_EXCEEDED
    clock.advance(0.1)
    manager.make(admission, "a")
    assert refused(admission, "a")[0] == QUOTA_EXCEEDED


def test_a_refusal_for_another_reason_costs_no_token():
    clock = Clock()
    manager, admission = control(clock, max_sessions=1, max_per_client=5, rate=(1, 60.0))
    manager.sessions["other"] = object()
    assert refused(admission, "a")[0] == SERVER_FULL
    del manager.sessions["other"]
    manager.make(admission, "a")


def test_full_buckets_are_dropped():
    clock = Clock()
    manager, admission = control(clock, max_sessions=1000, max_per_client=1000, rate=(5, 10.0))
    for n in range(100):
        sid = manager.make(admission, f"10.0.0.{n}")
        del manager.sessions[sid]
    assert len(admission._buckets) == 100
    clock.advance(2.0)
    manager.make(admission, "x")
    assert set(admission._buckets) == {"x"}


def test_an_ipv6_64_is_one_client():
    """
    An IPv6 client picks addresses from its /64 at will: its sessions and
    its rate are counted for the /64, whatever the address; another /64,
    and IPv4 clients, are others.
    """
    clock = Clock()
    manager, admission = control(clock, max_sessions=100, max_per_client=2, rate=(3, 60.0))
    manager.make(admission, "2001:db8:1:2::1")
    manager.make(admission, "[2001:db8:1:2:ffff:ffff:ffff:fffe]")
    code, message = refused(admission, "2001:db8:1:2:abcd::9")
    assert code == QUOTA_EXCEEDED
    assert message == ("too many sessions from 2001:db8:1:2::/64 (at most 2 at once):"
                       " end one first")
    assert admission.sessions_of("2001:db8:1:2::77") == 2
    manager.make(admission, "2001:db8:1:3::1")
    manager.make(admission, "192.0.2.1")
    manager.make(admission, "::ffff:192.0.2.1")
    assert admission.sessions_of("192.0.2.1") == 2
    # The rate too: a third new session of the /64, once the first two ended.
    for session_id in list(manager.sessions):
        del manager.sessions[session_id]
    manager.make(admission, "2001:db8:1:2::5")
    code, message = refused(admission, "2001:db8:1:2::6")
    assert code == QUOTA_EXCEEDED and "from 2001:db8:1:2::/64 (at most 3 per 60 s)" in message
    assert set(admission._buckets) == {"2001:db8:1:2::/64", "2001:db8:1:3::/64", "192.0.2.1"}


def test_one_user_from_many_addresses_gets_a_share_by_default(tmp_path):
    """
    With users and no --max-sessions-per-user, a user has a quarter of
    --max-sessions (at least one): from five addresses, one user no longer
    takes every slot; C{off} lifts it, without users there is nothing to
    count.
    """
    from twisted.internet.testing import MemoryReactorClock

    from capsule.tap import makeService, per_user_default

    assert [per_user_default(n, True) for n in (1, 3, 4, 16, 32)] == [1, 1, 1, 4, 8]
    assert per_user_default(16, False) is None

    def policy(*args):
        service = makeService(parse(*args), MemoryReactorClock())
        return service.websocket_factory.sessions.admission.policy

    (tmp_path / "tokens").write_text("mallory:" + "m" * 32 + "\n")
    tokens = ["--tokens", str(tmp_path / "tokens"), "-l", "tcp:0"]
    assert policy("--max-sessions", "16", *tokens).max_per_user == 4
    assert policy("--max-sessions", "16", "--max-sessions-per-user", "10",
                  *tokens).max_per_user == 10
    assert policy("--max-sessions", "16", "--max-sessions-per-user", "off",
                  *tokens).max_per_user is None
    assert policy("--max-sessions", "16").max_per_user is None

    class Users(Counted):
        def of_user(self, user):
            return [s for s in self.sessions.values() if s.user == user]

    manager = Users()
    admission = AdmissionControl(manager, Clock(), policy("--max-sessions", "16", *tokens))
    made = 0
    for n in range(16):
        address = f"192.0.2.{n % 5}"
        try:
            admission.admit(address, "mallory")
        except AdmissionRefused as e:
            assert e.code == QUOTA_EXCEEDED and "mallory has too many sessions" in e.message
            continue
        made += 1
        manager.sessions[f"s{n}"] = SimpleNamespace(user="mallory", settings=None)
        admission.created(f"s{n}", address)
    assert made == 4
    admission.admit("192.0.2.9", "alice")


def test_the_memory_budget_counts_requests_not_limits():
    # The host: 24 GiB, sessions limited to 4 GiB each; they were
    # counted at their limits, and a fifth was refused.  Counted at a 64 MiB
    # request, 24 GiB holds 384 of them.
    shell = SimpleNamespace(name="shell", request=64 * MIB, memory=4 * GIB)
    manager, admission = control(max_sessions=1000, max_per_client=1000,
                                 session_request=64 * MIB, memory_budget=24 * GIB)
    manager.profiles = {"shell": shell}
    for _ in range(384):
        manager.make(admission, "a")
    assert admission.committed_memory() == 24 * GIB
    code, message = refused(admission, "b")
    assert code == SERVER_FULL
    assert message == ("the server is full: its memory is promised to other sessions"
                       " (24576 of 24576 MiB): try again later")
    # A session that ends gives its request back.
    del manager.sessions["s1"]
    manager.make(admission, "b")
    assert refused(admission, "b")[0] == SERVER_FULL


def test_a_session_counts_at_its_measured_use_when_that_is_more():
    host = Host()
    manager, admission = control(max_sessions=100, max_per_client=100,
                                 session_request=100 * MIB, memory_budget=1000 * MIB, host=host)
    for n in range(5):
        manager.sessions[manager.make(admission, "a")].container_id = f"c{n}"
    assert admission.committed_memory() == 500 * MIB
    # One measured under its request still counts at its request; one over
    # it, at its use.
    host.measured = {"c0": 10 * MIB, "c1": 450 * MIB}
    assert admission.committed_memory() == 850 * MIB
    manager.make(admission, "a")
    assert refused(admission, "a")[0] == SERVER_FULL
    host.measured = {}
    manager.make(admission, "a")


def test_each_session_counts_at_its_profiles_request():
    shell, claude = profile("shell", 64 * MIB), profile("claude", 512 * MIB)
    manager, admission = control(max_sessions=100, max_per_client=100,
                                 session_request=64 * MIB, memory_budget=1200 * MIB)
    manager.profiles = {"shell": shell, "claude": claude}
    manager.make(admission, "a", claude)
    manager.make(admission, "a", claude)
    assert admission.committed_memory() == 1024 * MIB
    code, message = refused_for(admission, "b", claude)
    assert code == SERVER_FULL and "memory" in message
    # A shell session still fits (no profile named: shell), twice, not three times.
    manager.make(admission, "b")
    manager.make(admission, "b", shell)
    assert admission.committed_memory() == 1152 * MIB
    assert refused_for(admission, "b", shell)[0] == SERVER_FULL


def test_the_host_under_its_reserve_refuses_new_sessions_and_says_why():
    host = Host(available=8 * GIB)
    manager, admission = control(max_sessions=100, max_per_client=100,
                                 session_request=64 * MIB, memory_budget=None,
                                 reserve=2 * GIB, host=host)
    manager.make(admission, "a")
    host.available = 2 * GIB - 1
    code, message = refused(admission, "a")
    assert code == SERVER_FULL
    assert message == ("the server is full: the host has 2047 MiB of memory available, under"
                       " its reserve of 2048 MiB: try again later")
    assert len(manager.sessions) == 1
    # Not read (yet): no refusal on that account.
    host.available = None
    manager.make(admission, "a")
    host.available = 2 * GIB
    manager.make(admission, "a")


def test_the_reserve_refusal_comes_before_the_rate_is_spent():
    host = Host(available=GIB)
    clock = Clock()
    manager, admission = control(clock, max_sessions=100, max_per_client=100, rate=(2, 60.0),
                                 session_request=64 * MIB, reserve=2 * GIB, host=host)
    for _ in range(5):
        assert refused(admission, "a")[0] == SERVER_FULL
    host.available = 4 * GIB
    manager.make(admission, "a")
    manager.make(admission, "a")


def test_warm_sessions_count_at_their_request_and_never_refuse_a_user():
    shell = profile("shell", 100 * MIB)
    manager, admission = control(max_sessions=100, max_per_client=100,
                                 session_request=100 * MIB, memory_budget=500 * MIB)
    manager.profiles = {"shell": shell}
    manager.pool.ready = [warm(shell), warm(shell)]
    manager.pool.making = [warm(shell)]
    for _ in range(2):
        manager.make(admission, "a")
    # Two live (warm ones taken), one warm being made: 300 MiB of 500.
    assert admission.committed_memory() == 300 * MIB
    # The budget is full with warm ones; users still get theirs.
    manager.pool.ready = [warm(shell), warm(shell)]
    assert admission.committed_memory() == 500 * MIB
    manager.make(admission, "b")
    manager.make(admission, "b")
    manager.make(admission, "b")
    # Five live sessions: now the budget is full of users' sessions.
    assert refused(admission, "b")[0] == SERVER_FULL


def test_no_budget_no_memory_check():
    manager, admission = control(max_sessions=100, max_per_client=100,
                                 session_request=64 * GIB, memory_budget=None)
    for _ in range(10):
        manager.make(admission, "a")


def refused_for(admission, address, profile) -> tuple[str, str]:
    with pytest.raises(AdmissionRefused) as caught:
        admission.admit(address, profile=profile)
    return caught.value.code, caught.value.message


# -- the WebSocket endpoint, in memory ----------------------------------------------------

LOCAL = [parse_network("127.0.0.1/32")]


@pytest.fixture
def factory(manager, clock):
    admission = AdmissionControl(
        manager, clock, AdmissionPolicy(max_sessions=3, max_per_client=2, rate=None),
        trusted_proxies=LOCAL)
    return CapsuleServerFactory(manager, clock, max_message_size=1024,
                                sessions=SessionService(manager, admission))


class Client(Link):
    """
    Autobahn's client from 127.0.0.1, speaking for C{forwarded} through
    X-Forwarded-For.
    """

    def __init__(self, clock, factory, forwarded: str | None = None, query: str = "") -> None:
        super().__init__(clock, factory, query,
                         headers={"X-Forwarded-For": forwarded} if forwarded else None)

    def start(self) -> dict:
        self.send({"type": "resize", "cols": 80, "rows": 24})
        [message] = self.messages
        return message


def test_the_third_session_of_a_client_is_refused_with_4429(clock, factory, manager, docker):
    first = Client(clock, factory, "198.51.100.1")
    assert first.start()["type"] == "connected"
    assert Client(clock, factory, "198.51.100.1").start()["type"] == "connected"
    made = (set(manager.sessions), len(docker.processes))
    third = Client(clock, factory, "198.51.100.1")
    message = third.start()
    assert message["type"] == "error" and message["code"] == "quota_exceeded"
    assert "198.51.100.1" in message["message"]
    assert third.client.closed[:2] == (True, 4429)
    assert (set(manager.sessions), len(docker.processes)) == made
    # Another client still gets one; then the server is full for everyone.
    assert Client(clock, factory, "198.51.100.2").start()["type"] == "connected"
    fourth = Client(clock, factory, "198.51.100.3")
    message = fourth.start()
    assert message["type"] == "error" and message["code"] == "server_full"
    assert fourth.client.closed[:2] == (True, 4503)
    assert len(manager.sessions) == 3


def test_a_reconnect_is_not_a_new_session(clock, factory, manager):
    first = Client(clock, factory, "198.51.100.1")
    session_id = first.start()["session_id"]
    Client(clock, factory, "198.51.100.1").start()
    # The creator's third connection, to a session it has: allowed.
    again = Client(clock, factory, "198.51.100.1", query=f"session_id={session_id}")
    again.flush()
    [message] = again.messages
    assert message["type"] == "connected" and message["resumed"] is True
    assert len(manager.sessions) == 2


def test_an_ended_session_frees_its_creators_place(clock, factory, manager, docker):
    first = Client(clock, factory, "198.51.100.1")
    session_id = first.start()["session_id"]
    Client(clock, factory, "198.51.100.1").start()
    docker.processes[0].exit(0)
    first.pump.flush()
    assert session_id not in manager.sessions
    assert Client(clock, factory, "198.51.100.1").start()["type"] == "connected"


def test_without_a_trusted_proxy_the_header_is_ignored(clock, factory, manager):
    factory.sessions.admission.trusted_proxies = ()
    for forwarded in ("198.51.100.1", "198.51.100.2"):
        assert Client(clock, factory, forwarded).start()["type"] == "connected"
    message = Client(clock, factory, "198.51.100.3").start()
    assert message["code"] == "quota_exceeded" and "127.0.0.1" in message["message"]


# -- options and wiring ------------------------------------------------------------------

def parse(*args):
    from capsule.tap import Options
    options = Options()
    options.parseOptions(list(args))
    return options


def test_the_defaults_are_what_the_host_holds(monkeypatch):
    from twisted.internet.testing import MemoryReactorClock

    from capsule import tap
    from capsule.tap import makeService
    # The host: 24 GiB, 2 CPUs, pid_max 32768.
    monkeypatch.setattr(tap, "host_facts", lambda: (24 * GIB, 2, 32768))
    options = parse()
    # (24 GiB - 2.4 GiB reserve) / 64 MiB; pid_max / 16 = 2048; 2 * 256 = 512.
    assert (options["max-sessions"], options["max-sessions-per-client"],
            options["session-rate"], options["memory-budget"],
            options["trusted-proxy"]) == (345, 8, (10, 60.0), None, [])
    service = makeService(options, MemoryReactorClock())
    admission = service.websocket_factory.sessions.admission
    assert admission.policy == AdmissionPolicy(max_sessions=345, max_per_client=8,
                                               rate=(10, 60.0))
    assert admission.trusted_proxies == ()
    memory = admission.memory
    # Until the engine says its memory: no budget, no reserve.
    assert (memory.default_request, memory.budget, memory.reserve) == (64 * MIB, None, None)
    assert service.manager.profiles["shell"].request == 64 * MIB
    assert service.manager.profiles["claude"].request == 512 * MIB
    # A smaller host: a little memory, or few processes, or one CPU.
    monkeypatch.setattr(tap, "host_facts", lambda: (4 * GIB, 8, None))
    assert parse()["max-sessions"] == 48
    monkeypatch.setattr(tap, "host_facts", lambda: (64 * GIB, 8, 4096))
    assert parse()["max-sessions"] == 256
    monkeypatch.setattr(tap, "host_facts", lambda: (64 * GIB, 1, None))
    assert parse()["max-sessions"] == 256
    monkeypatch.setattr(tap, "host_facts", lambda: (24 * GIB, 2, 32768))
    assert parse("--memory-request", "256m")["max-sessions"] == 86
    assert parse("--memory-reserve", "8g")["max-sessions"] == 256


def test_the_default_max_sessions_formula():
    assert default_reserve(24 * GIB) == int(2.4 * GIB)
    assert default_reserve(4 * GIB) == GIB
    assert host_capacity(24 * GIB, 64 * MIB) == 345
    assert host_capacity(24 * GIB, 64 * MIB, reserve=0) == 384
    assert host_capacity(24 * GIB, 64 * MIB, cpus=1) == 256
    assert host_capacity(24 * GIB, 64 * MIB, pid_max=1600) == 100
    # A host too small for one session still has one.
    assert host_capacity(GIB, 64 * MIB) == 1


def test_the_options_reach_admission_control():
    from twisted.internet.testing import MemoryReactorClock

    from capsule.tap import makeService
    options = parse("--max-sessions", "5", "--max-sessions-per-client", "2",
                    "--session-rate", "3/30", "--memory", "1g", "--memory-budget", "3g",
                    "--memory-request", "100m", "--memory-reserve", "2g",
                    "--trusted-proxy", "127.0.0.1/32", "--trusted-proxy", "fd00::/8")
    service = makeService(options, MemoryReactorClock())
    admission = service.websocket_factory.sessions.admission
    assert admission.policy == AdmissionPolicy(max_sessions=5, max_per_client=2, rate=(3, 30.0))
    assert (admission.memory.default_request, admission.memory.budget,
            admission.memory.reserve) == (100 * MIB, 3 * GIB, 2 * GIB)
    assert admission.trusted_proxies == (ipaddress.ip_network("127.0.0.1/32"),
                                         ipaddress.ip_network("fd00::/8"))
    off = makeService(parse("--memory-budget", "off", "--memory-reserve", "off"),
                      MemoryReactorClock()).websocket_factory.sessions.admission.memory
    assert (off.budget, off.reserve) == (None, None)
    # Given explicitly, neither follows the engine's memory.
    off.host_is(24 * GIB)
    assert (off.budget, off.reserve) == (None, None)


@pytest.mark.parametrize("args", [
    ["--max-sessions", "0"], ["--max-sessions-per-client", "-1"], ["--session-rate", "10"],
    ["--session-rate", "0/60"], ["--memory-budget", "lots"], ["--memory-budget", "0"],
    ["--trusted-proxy", "10.0.0.0/33"], ["--trusted-proxy", "proxy.example"],
    ["--memory-request", "lots"], ["--memory-request", "0"],
    ["--memory", "1g", "--memory-request", "2g"], ["--memory-reserve", "some"],
    ["--memory-reserve", "0"],
    ["--max-sessions-per-user", "0"], ["--max-sessions-per-user", "none"],
])
def test_bad_admission_options(args):
    from twisted.python import usage
    with pytest.raises(usage.UsageError):
        parse(*args)


def engine_service(clock, docker, admission, host=None):
    from capsule.services import SessionService
    service = SessionService(SimpleNamespace(), clock, None, admission, docker, host=host)
    service._recover = lambda: _nothing()
    return service


def fake_meminfo(total: int, available: int):
    def read(path):
        if path == "/proc/meminfo":
            return (f"MemTotal: {total // 1024} kB\nMemFree: 1 kB\n"
                    f"MemAvailable: {available // 1024} kB\n")
        return None
    return read


def test_the_budget_and_reserve_follow_the_engines_memory_once_it_answers():
    from twisted.internet.defer import succeed

    from capsule.services import SessionService
    from capsule.sessions.host_memory import HostMemory
    clock = Clock()
    docker = FakeDockerAPI()
    docker.host = "unix:///var/run/docker.sock"
    docker.info = lambda: docker._check() or succeed({"MemTotal": 24 * GIB})
    docker.reachable = False
    host = HostMemory(clock, lambda: [], interval=5.0, read=fake_meminfo(24 * GIB, 20 * GIB))
    memory = MemoryBudget(64 * MIB, reading=host, budget_from_host=True,
                          reserve_from_host=True)
    admission = AdmissionControl(Counted(), clock, AdmissionPolicy(rate=None), memory=memory)
    service = engine_service(clock, docker, admission, host)
    service.startService()
    assert (memory.budget, memory.reserve, host.available) == (None, None, None)
    docker.reachable = True
    clock.advance(SessionService.RECOVERY_RETRY)
    reserve = int(2.4 * GIB)
    assert (memory.reserve, memory.budget) == (reserve, 24 * GIB - reserve)
    # The engine is this host: its available memory is read, now and every 5 s.
    assert host.available == 20 * GIB
    host._read = fake_meminfo(24 * GIB, 2 * GIB)
    admission.admit("a")
    clock.advance(5.0)
    assert host.available == 2 * GIB
    with pytest.raises(AdmissionRefused) as caught:
        admission.admit("a")
    assert caught.value.code == SERVER_FULL and "under its reserve of 2457 MiB" in str(
        caught.value)
    service.stopService()
    assert clock.getDelayedCalls() == []


def test_an_engine_on_another_host_has_no_reserve_watched():
    from twisted.internet.defer import succeed

    from capsule.sessions.host_memory import HostMemory
    clock = Clock()
    for docker_host, total in [("tcp://10.0.0.5:2375", 24 * GIB),
                               ("unix:///var/run/docker.sock", 64 * GIB)]:
        docker = FakeDockerAPI()
        docker.host = docker_host
        docker.info = lambda: succeed({"MemTotal": total})
        host = HostMemory(clock, lambda: [], read=fake_meminfo(24 * GIB, GIB))
        memory = MemoryBudget(64 * MIB, reading=host, budget_from_host=True,
                              reserve_from_host=True)
        admission = AdmissionControl(Counted(), clock, AdmissionPolicy(rate=None),
                                     memory=memory)
        engine_service(clock, docker, admission, host).startService()
        assert memory.reserve is None and host.available is None
        # The budget is the engine's memory less the reserve it would have.
        assert memory.budget == total - default_reserve(total)
        admission.admit("a")
        assert clock.getDelayedCalls() == []


def test_an_engine_that_does_not_say_its_memory_means_no_budget():
    clock = Clock()
    docker = FakeDockerAPI()
    admission = AdmissionControl(Counted(), clock, AdmissionPolicy(),
                                 memory=MemoryBudget(64 * MIB, budget_from_host=True))
    engine_service(clock, docker, admission).startService()
    assert admission.memory.budget is None
    assert clock.getDelayedCalls() == []


async def _nothing():
    return None


def test_no_new_session_while_the_engine_is_behind_on_removals():
    # A flood of short sessions: each one ended queues a removal on the
    # engine.  Past max_removing, new sessions wait for it to catch up
    # (the fuzz run once left 213 removals queued, and a stop waited for them).
    manager = Counted()
    admission = AdmissionControl(manager, Clock(), AdmissionPolicy(max_removing=4, rate=None))
    manager.removing = 3
    manager.make(admission, "192.0.2.1")
    manager.removing = 4
    with pytest.raises(AdmissionRefused) as refused:
        manager.make(admission, "192.0.2.2")
    assert refused.value.code == SERVER_FULL
    assert "still removing 4 containers of ended sessions" in refused.value.message
    manager.removing = 0
    manager.make(admission, "192.0.2.2")
