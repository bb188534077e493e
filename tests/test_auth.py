"""
capsule.auth: checkers, the login store, the failed-login buckets, who a
request is (and capsule.web.login's safe next page); the owners file; the options that choose users and where to
listen.
"""

from __future__ import annotations

import base64
import json
import os

import bcrypt
import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python import usage

from capsule.core.admission import QUOTA_EXCEEDED, AdmissionControl, AdmissionPolicy, \
    AdmissionRefused, parse_network
from capsule.auth.gate import Authenticator, AuthRefused
from capsule.auth.logins import COOKIE_NAME, LoginSessions
from capsule.auth.stores import parse_htpasswd, parse_tokens
from capsule.auth.throttle import LoginLimiter
from capsule.web.http import ClientAddresses
from capsule.web.login import safe_next
from capsule.sessions.owners import OwnerFile
from capsule.tap import LOOPBACK_LISTEN, Options, loopback_only


def htpasswd_line(user: str, password: str) -> str:
    # What `htpasswd -B` writes: a $2y$ bcrypt hash (cost 4 keeps tests fast).
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()
    return f"{user}:$2y${hashed[4:]}\n"


class Request:
    """
    What Authenticator reads of an Autobahn ConnectionRequest.
    """

    def __init__(self, peer: str = "tcp4:127.0.0.1:5555", **headers: str) -> None:
        self.peer = peer
        self.headers = {k.replace("_", "-").lower(): v for k, v in headers.items()}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def result(d):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred did not fire"
    if hasattr(out[0], "value"):
        raise out[0].value
    return out[0]


@pytest.fixture
def files(tmp_path):
    passwords = tmp_path / "htpasswd"
    passwords.write_text(htpasswd_line("alice", "wonderland") + htpasswd_line("bob", "builder"))
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:" + "a" * 32 + "\n")
    return passwords, tokens


@pytest.fixture
def auth(files):
    passwords, tokens = files
    return Authenticator(Clock(), addresses=ClientAddresses(), htpasswd=str(passwords),
                         tokens=str(tokens))


def test_htpasswd_takes_bcrypt_hashes_only():
    users = parse_htpasswd("alice:$2y$05$" + "x" * 53 + "\nbob:{SHA}abc\n# c\n\nbad name:$2y$x\n")
    assert list(users) == ["alice"]


def test_tokens_shorter_than_16_are_skipped():
    assert parse_tokens("alice:short\nbob:" + "b" * 16 + "\n") == {"b" * 16: "bob"}


def test_basic_with_the_right_password_is_the_user(auth):
    assert result(auth.user_of(Request(authorization=basic("alice", "wonderland")))) == "alice"


def test_a_wrong_password_and_an_unknown_user_are_refused_alike(auth):
    for user, password in [("alice", "nope"), ("mallory", "wonderland")]:
        with pytest.raises(AuthRefused) as e:
            result(auth.user_of(Request(authorization=basic(user, password))))
        assert (e.value.status, e.value.message) == (401, "wrong user name, password or token")


def test_no_credentials_is_401(auth):
    with pytest.raises(AuthRefused) as e:
        result(auth.user_of(Request()))
    assert e.value.status == 401


def test_bearer_token(auth):
    assert result(auth.user_of(Request(authorization="Bearer " + "a" * 32))) == "alice"
    with pytest.raises(AuthRefused):
        result(auth.user_of(Request(authorization="Bearer " + "b" * 32)))


def test_the_htpasswd_file_is_read_again_when_it_changes(files, auth):
    passwords, _ = files
    passwords.write_text(htpasswd_line("alice", "changed"))
    # A different size: seen even within the file system's time resolution.
    assert result(auth.user_of(Request(authorization=basic("alice", "changed")))) == "alice"
    with pytest.raises(AuthRefused):
        result(auth.user_of(Request(authorization=basic("alice", "wonderland"))))
    with pytest.raises(AuthRefused):
        result(auth.user_of(Request(authorization=basic("bob", "builder"))))


def test_a_file_that_goes_away_keeps_its_last_users(files, auth):
    passwords, _ = files
    passwords.unlink()
    assert result(auth.user_of(Request(authorization=basic("bob", "builder")))) == "bob"


def test_failed_logins_are_limited_per_address_and_per_user(files):
    passwords, _ = files
    clock = Clock()
    auth = Authenticator(clock, addresses=ClientAddresses(), htpasswd=str(passwords),
                         limiter=LoginLimiter(clock, per_address=(3, 60.0), per_user=(2, 60.0)))
    wrong = Request(authorization=basic("alice", "nope"))
    for _ in range(2):
        with pytest.raises(AuthRefused) as e:
            result(auth.user_of(wrong))
        assert e.value.status == 401
    # alice's bucket is empty: even her right password is not tried.
    with pytest.raises(AuthRefused) as e:
        result(auth.user_of(Request(authorization=basic("alice", "wonderland"))))
    assert (e.value.status, e.value.retry_after) == (429, 30)
    # bob from the same address still may, once more (the address's third).
    with pytest.raises(AuthRefused):
        result(auth.user_of(Request(authorization=basic("bob", "nope"))))
    with pytest.raises(AuthRefused) as e:
        result(auth.user_of(Request(authorization=basic("bob", "builder"))))
    assert e.value.status == 429
    # Another address, another user: allowed.
    assert result(auth.user_of(Request("tcp4:192.0.2.7:1", authorization=basic(
        "bob", "builder")))) == "bob"
    clock.advance(30)
    assert result(auth.user_of(Request(authorization=basic("alice", "wonderland")))) == "alice"


def test_login_sessions_expire_and_end():
    clock = Clock()
    logins = LoginSessions(clock, ttl=100)
    value = logins.new("alice")
    assert len(value) >= 40 and logins.user(value) == "alice"
    logins.end(value)
    assert logins.user(value) is None
    value = logins.new("alice")
    clock.advance(100)
    assert logins.user(value) is None and len(logins) == 0


def test_the_cookie_names_its_user(auth):
    value = auth.logins.new("bob")
    assert result(auth.user_of(Request(cookie=f"x=1; {COOKIE_NAME}={value}"))) == "bob"
    with pytest.raises(AuthRefused):
        result(auth.user_of(Request(cookie=f"{COOKIE_NAME}=forged")))


def test_a_user_removed_from_the_file_loses_its_logins(auth, files):
    passwords, _ = files
    value = auth.logins.new("bob")
    assert result(auth.user_of(Request(cookie=f"{COOKIE_NAME}={value}"))) == "bob"
    passwords.write_text(htpasswd_line("alice", "wonderland"))
    os.utime(passwords, ns=(1, 1))
    with pytest.raises(AuthRefused):
        result(auth.user_of(Request(cookie=f"{COOKIE_NAME}={value}")))
    assert auth.logins.user(value) is None


def test_a_login_rotates_the_cookie(auth):
    old = auth.logins.new("alice")
    request = Request(cookie=f"{COOKIE_NAME}={old}")
    new = result(auth.log_in(request, "alice", "wonderland"))
    assert new != old and auth.logins.user(old) is None and auth.logins.user(new) == "alice"


def test_a_logout_ends_the_login_its_cookie_names(auth):
    value = auth.logins.new("alice")
    other = auth.logins.new("alice")
    auth.log_out(Request(cookie=f"{COOKIE_NAME}={value}"))
    auth.log_out(Request())
    assert auth.logins.user(value) is None and auth.logins.user(other) == "alice"


def test_which_requests_carry_credentials_a_user_may_have(auth):
    value = auth.logins.new("alice")
    assert auth.has_credentials_for(Request(cookie=f"{COOKIE_NAME}={value}"), "alice")
    assert not auth.has_credentials_for(Request(cookie=f"{COOKIE_NAME}={value}"), "bob")
    # Checked later, once the request is in: any Authorization may be anyone.
    assert auth.has_credentials_for(Request(authorization="Bearer x"), "bob")
    assert not auth.has_credentials_for(Request(), "alice")
    assert not auth.has_credentials_for(Request(x_forwarded_user="alice"), "alice")
    proxied = Authenticator(Clock(), addresses=ClientAddresses(), user_header="X-Forwarded-User")
    assert proxied.has_credentials_for(Request(x_forwarded_user="alice"), "bob")


def test_cookie_flags(files):
    passwords, _ = files
    plain = Authenticator(Clock(), addresses=ClientAddresses(), htpasswd=str(passwords))
    header = plain.cookie_header(Request(), "v").decode()
    assert header == f"{COOKIE_NAME}=v; Path=/; HttpOnly; SameSite=Strict; Max-Age=43200"
    behind_tls = Authenticator(Clock(), addresses=ClientAddresses(), htpasswd=str(passwords),
                               public_url="https://capsule.example")
    assert behind_tls.cookie_header(Request(), "v").decode().endswith("; Secure")


def test_the_proxy_header_counts_from_a_trusted_proxy_only(files):
    auth = Authenticator(Clock(), user_header="X-Forwarded-User",
                         addresses=ClientAddresses((parse_network("10.0.0.0/8"),)))
    assert result(auth.user_of(Request("tcp4:10.1.2.3:80", x_forwarded_user="carol"))) == "carol"
    with pytest.raises(AuthRefused):
        result(auth.user_of(Request("tcp4:192.0.2.1:80", x_forwarded_user="carol")))
    with pytest.raises(AuthRefused):
        result(auth.user_of(Request("tcp4:10.1.2.3:80", x_forwarded_user="not a name")))


def test_same_origin_with_a_public_url_and_its_default_port(files):
    passwords, _ = files
    auth = Authenticator(Clock(), addresses=ClientAddresses(), htpasswd=str(passwords),
                         public_url="https://capsule.example:443/terminal/")
    assert auth.same_origin(Request(origin="https://capsule.example"))
    assert auth.same_origin(Request(origin="https://Capsule.example:443"))
    assert not auth.same_origin(Request(origin="http://capsule.example"))
    assert not auth.same_origin(Request(origin="null"))


def test_same_origin(auth):
    assert auth.same_origin(Request(host="c.example:3001"))
    assert auth.same_origin(Request(host="c.example:3001", origin="http://c.example:3001"))
    assert not auth.same_origin(Request(host="c.example:3001", origin="http://evil.example"))
    assert not auth.same_origin(Request(host="c.example:3001", sec_fetch_site="cross-site"))


@pytest.mark.parametrize("value, expected", [
    ("/", "/"), ("/?session_id=x", "/?session_id=x"), ("//evil.example/", "/"),
    ("https://evil.example/", "/"), ("/\\evil.example", "/"), (None, "/"),
    # Issue 19: browsers drop tabs and newlines, and read a backslash as a slash.
    ("/\t/evil.example/phish", "/"), ("/\n/evil.example", "/"), ("/\r/evil.example", "/"),
    ("/ /evil.example", "/"), ("/%09/evil.example", "/"), ("/%2F/evil.example", "/"),
    ("/%2f%2fevil.example", "/"), ("/%5Cevil.example", "/"), ("/\x7f/evil.example", "/"),
    ("/\u2028/evil.example", "/"), ("javascript:alert(1)", "/"), ("", "/"),
    ("/sessions/a%20b?x=%C3%A9", "/sessions/a%20b?x=%C3%A9"), ("/a/b/", "/a/b/"),
])
def test_next_is_a_local_path(value, expected):
    assert safe_next(value) == expected


class Session:
    def __init__(self, user):
        self.core = type("Core", (), {"user": user})()


def test_the_owners_file_keeps_live_owned_sessions(tmp_path):
    owners = OwnerFile(str(tmp_path / "state"), "one")
    owners.save({"s1": Session("alice"), "s2": Session(None), "s3": Session("bob")})
    assert json.loads(owners.path.read_text()) == {"s1": "alice", "s3": "bob"}
    assert os.listdir(tmp_path / "state") == ["owners-one.json"]
    again = OwnerFile(str(tmp_path / "state"), "one")
    assert (again.get("s1"), again.get("s2"), again.get("s3")) == ("alice", None, "bob")
    again.save({"s3": Session("bob")})
    assert OwnerFile(str(tmp_path / "state"), "one").get("s1") is None
    assert OwnerFile(str(tmp_path / "state"), "other").get("s3") is None


def test_a_user_past_max_sessions_per_user_is_refused():
    class Manager:
        sessions = {"a": Session("alice"), "b": Session("alice"), "c": Session("bob")}

        def of_user(self, user):
            return [s for s in self.sessions.values() if s.core.user == user]

    admission = AdmissionControl(Manager(), Clock(), AdmissionPolicy(max_per_user=2))
    with pytest.raises(AdmissionRefused) as e:
        admission.admit("192.0.2.1", "alice")
    assert e.value.code == QUOTA_EXCEEDED and "alice" in e.value.message
    admission.admit("192.0.2.1", "bob")
    admission.admit("192.0.2.1")


@pytest.mark.parametrize("description, loopback", [
    ("tcp:3001", False), (LOOPBACK_LISTEN, True), ("tcp:3001:interface=0.0.0.0", False),
    ("tcp6:3001:interface=\\:\\:1", True), ("ssl:3443:privateKey=k:certKey=c", False),
    ("unix:/run/capsule.sock", True), ("systemd:domain=INET:index=0", False),
])
def test_loopback_only(description, loopback):
    assert loopback_only(description) is loopback


def parse(*args):
    options = Options()
    options.parseOptions(list(args))
    return options


def test_without_users_the_default_listen_is_loopback():
    assert parse()["listen"] == [LOOPBACK_LISTEN]
    assert parse("--insecure-no-auth")["listen"] == ["tcp:3001"]


def test_with_users_the_default_listen_is_every_interface(files):
    passwords, _ = files
    assert parse("--auth", str(passwords))["listen"] == ["tcp:3001"]


def test_a_listen_others_can_reach_without_users_is_a_usage_error():
    with pytest.raises(usage.UsageError) as e:
        parse("--listen", "tcp:3001")
    message = str(e.value)
    for advice in ("--auth FILE", "--user-header", "--insecure-no-auth", LOOPBACK_LISTEN):
        assert advice in message


def test_user_header_needs_a_trusted_proxy():
    with pytest.raises(usage.UsageError, match="--trusted-proxy"):
        parse("--user-header", "X-Forwarded-User")
    assert parse("--user-header", "X-Forwarded-User", "--trusted-proxy", "10.0.0.0/8",
                 "-l", "tcp:3001")["users"]


@pytest.mark.parametrize("args, problem", [
    (["--auth", "/nonexistent"], "--auth: no such file"),
    (["--public-url", "capsule.example"], "--public-url: not an http"),
    (["--max-sessions-per-user", "0"], ""),
])
def test_bad_user_options(args, problem):
    with pytest.raises(usage.UsageError, match=problem):
        parse(*args)


def test_a_right_password_is_hashed_once_until_the_file_changes(files):
    passwords, _ = files
    calls = []

    def run(f, *args):
        calls.append(args[0])
        return succeed(f(*args))

    auth = Authenticator(Clock(), addresses=ClientAddresses(), htpasswd=str(passwords),
                         run_blocking=run)
    alice = Request(authorization=basic("alice", "wonderland"))
    assert [result(auth.user_of(alice)) for _ in range(3)] == ["alice"] * 3
    assert len(calls) == 1
    with pytest.raises(AuthRefused):
        result(auth.user_of(Request(authorization=basic("alice", "wonderland!"))))
    assert len(calls) == 2
    passwords.write_text(htpasswd_line("alice", "wonderland") + "\n")
    assert result(auth.user_of(alice)) == "alice" and len(calls) == 3
    passwords.write_text(htpasswd_line("alice", "other"))
    with pytest.raises(AuthRefused):
        result(auth.user_of(alice))


def test_an_unknown_users_password_costs_a_bcrypt_check_too(files):
    passwords, _ = files
    hashes = []

    def run(f, password, hashed):
        hashes.append(hashed)
        return succeed(f(password, hashed))

    auth = Authenticator(Clock(), addresses=ClientAddresses(), htpasswd=str(passwords),
                         run_blocking=run)
    with pytest.raises(AuthRefused):
        result(auth.user_of(Request(authorization=basic("mallory", "wonderland"))))
    assert hashes == [parse_htpasswd(passwords.read_text())["alice"]]


class Checks:
    """
    The bcrypt threads, held: each check waits until the test lets it go.
    """

    def __init__(self) -> None:
        self.waiting: list = []

    def __call__(self, f, *args):
        d = Deferred()
        self.waiting.append((d, f, args))
        return d

    def finish(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d, f, args in waiting:
            d.callback(f(*args))


def outcome(d) -> list:
    """
    What C{d} fires with, once it does: [] until then, then [user] or
    [status] of the refusal.
    """
    out: list = []

    def refused(failure):
        failure.trap(AuthRefused)
        out.append(failure.value.status)
    d.addCallbacks(out.append, refused)
    return out


def test_guesses_sent_at_once_take_their_tokens_as_they_start(files):
    # Issue 19: 60 guesses at once all passed the bucket before the first
    # was checked and charged.
    passwords, _ = files
    clock, checks = Clock(), Checks()
    auth = Authenticator(clock, addresses=ClientAddresses(), htpasswd=str(passwords),
                         run_blocking=checks)
    answers = []
    for burst in range(3):
        outcomes = [outcome(auth.user_of(Request(authorization=basic("alice", f"guess{i}"))))
                    for i in range(60)]
        # At most two of alice's are checked at once; the others are refused
        # at once, without a check.
        assert len(checks.waiting) <= 2
        checks.finish()
        answers += [o[0] for o in outcomes]
    assert answers.count(401) == 5 and answers.count(429) == 175
    # Her bucket is empty: her own password is not tried.
    assert outcome(auth.user_of(Request(authorization=basic("alice", "wonderland")))) == [429]
    assert checks.waiting == []


def test_attempts_in_flight_are_capped_per_address_per_user_and_in_all(files):
    passwords, _ = files
    checks = Checks()
    auth = Authenticator(Clock(), addresses=ClientAddresses(), htpasswd=str(passwords),
                         run_blocking=checks)

    def attempt(address, user, password="nope"):
        return outcome(auth.user_of(Request(f"tcp4:{address}:1",
                                            authorization=basic(user, password))))

    # One address: two at once.
    first = [attempt("192.0.2.1", f"user{i}") for i in range(3)]
    assert len(checks.waiting) == 2 and first[2] == [429]
    # Every address and user its own: eight at once in all.
    many = [attempt(f"192.0.2.{10 + i}", f"other{i}") for i in range(10)]
    assert len(checks.waiting) == 8 and many[6:] == [[429]] * 4 and many[5] == []
    checks.finish()
    assert [o[0] for o in first[:2] + many[:6]] == [401] * 8
    # Done: room again, for bob's right password from an address of his own.
    bob = attempt("198.51.100.4", "bob", "builder")
    checks.finish()
    assert bob == ["bob"]


def test_one_password_sent_on_many_requests_at_once_is_checked_once(files):
    passwords, _ = files
    checks = Checks()
    auth = Authenticator(Clock(), addresses=ClientAddresses(), htpasswd=str(passwords),
                         run_blocking=checks)
    outcomes = [outcome(auth.user_of(Request(authorization=basic("bob", "builder"))))
                for _ in range(10)]
    assert len(checks.waiting) == 1
    checks.finish()
    assert outcomes == [["bob"]] * 10
    # The same wrong password too: one check, one failure counted.
    outcomes = [outcome(auth.user_of(Request(authorization=basic("bob", "nope"))))
                for _ in range(10)]
    assert len(checks.waiting) == 1
    checks.finish()
    assert outcomes == [[401]] * 10
    assert auth.limiter.retry_after("127.0.0.1", "bob") == 0


def test_a_right_password_gives_its_token_back(files):
    passwords, _ = files
    clock = Clock()
    auth = Authenticator(clock, addresses=ClientAddresses(), htpasswd=str(passwords),
                         limiter=LoginLimiter(clock, per_address=(3, 60.0), per_user=(2, 60.0)))
    for _ in range(10):
        assert result(auth.log_in(Request(), "bob", "builder"))
    for _ in range(2):
        with pytest.raises(AuthRefused) as e:
            result(auth.user_of(Request(authorization=basic("bob", "nope"))))
        assert e.value.status == 401
    with pytest.raises(AuthRefused) as e:
        result(auth.user_of(Request(authorization=basic("bob", "builder"))))
    assert e.value.status == 429


def test_a_password_change_ends_the_logins_made_with_the_old_one(auth, files):
    passwords, _ = files
    alice = result(auth.log_in(Request(), "alice", "wonderland"))
    bob = result(auth.log_in(Request(), "bob", "builder"))
    for value, user in ((alice, "alice"), (bob, "bob")):
        assert result(auth.user_of(Request(cookie=f"{COOKIE_NAME}={value}"))) == user
    # Another user added, alice's line as it was: her login holds.
    lines = passwords.read_text().splitlines(True)
    passwords.write_text("".join(lines) + htpasswd_line("carol", "c"))
    os.utime(passwords, ns=(1, 1))
    assert result(auth.user_of(Request(cookie=f"{COOKIE_NAME}={alice}"))) == "alice"
    # Her password changes: the login made with the old one ends at once.
    passwords.write_text(htpasswd_line("alice", "looking glass") + lines[1])
    os.utime(passwords, ns=(2, 2))
    with pytest.raises(AuthRefused):
        result(auth.user_of(Request(cookie=f"{COOKIE_NAME}={alice}")))
    assert auth.logins.user(alice) is None
    assert result(auth.user_of(Request(cookie=f"{COOKIE_NAME}={bob}"))) == "bob"
    # The new password makes a login that holds.
    again = result(auth.log_in(Request(), "alice", "looking glass"))
    assert result(auth.user_of(Request(cookie=f"{COOKIE_NAME}={again}"))) == "alice"


def test_a_login_checked_against_a_password_that_changed_meanwhile_is_not_shared(files):
    # Two attempts share one check only against the same hash of the user's.
    passwords, _ = files
    checks = Checks()
    auth = Authenticator(Clock(), addresses=ClientAddresses(), htpasswd=str(passwords),
                         run_blocking=checks)
    first = outcome(auth.log_in(Request(), "alice", "wonderland"))
    passwords.write_text(htpasswd_line("alice", "wonderland") + htpasswd_line("bob", "b"))
    os.utime(passwords, ns=(3, 3))
    second = outcome(auth.log_in(Request(), "alice", "wonderland"))
    assert len(checks.waiting) == 2
    checks.finish()
    first_value, second_value = first[0], second[0]
    with pytest.raises(AuthRefused):
        result(auth.user_of(Request(cookie=f"{COOKIE_NAME}={first_value}")))
    assert result(auth.user_of(Request(cookie=f"{COOKIE_NAME}={second_value}"))) == "alice"


# -- a --trusted-proxy range that holds the sessions (issue 19) --------------------------


def session_service(trusted, user_header="X-Forwarded-User"):
    from capsule.core.spec import ContainerSpec
    from capsule.engine.network import SessionNetwork
    from capsule.services import SessionService
    from capsule.sessions.manager import SessionManager
    from capsule.sessions.session import SessionConfig
    from tests.support.fakes import FakeDockerAPI

    docker, clock = FakeDockerAPI(), Clock()
    manager = SessionManager(docker, clock, SessionConfig(
        spec=ContainerSpec(image="capsule-runtime:latest"), instance="t", pool_size=1))
    net = SessionNetwork(docker, clock, "capsule")
    refusals = []
    sessions = SessionService(manager, clock, network=net, user_header=user_header,
                              trusted_proxies=[parse_network(t) for t in trusted],
                              refuse=refusals.append)
    return sessions, docker, refusals


@pytest.mark.parametrize("trusted", [["172.16.0.0/12"], ["10.0.0.5/32", "172.20.9.9/32"],
                                     ["0.0.0.0/0"]])
def test_a_trusted_proxy_range_holding_the_sessions_stops_the_start(trusted):
    sessions, docker, refusals = session_service(trusted)
    sessions.startService()
    # The fake engine's capsule network is 172.20.0.0/16.
    assert docker.networks["capsule"]["subnets"] == ["172.20.0.0/16"]
    [message] = refusals
    assert message.startswith(
        f"--trusted-proxy {trusted[-1]} holds addresses of the sessions' network capsule"
        " (172.20.0.0/16): any session could name any user in X-Forwarded-User.")
    # Never ready: the listeners do not open, no warm container is made.
    assert not sessions.ready.called and docker.containers == {}
    sessions.stopService()


def test_a_trusted_proxy_range_elsewhere_starts():
    sessions, docker, refusals = session_service(["10.0.0.5/32", "127.0.0.1/32"])
    sessions.startService()
    assert refusals == [] and sessions.ready.called and len(docker.containers) == 1
    sessions.stopService()


def test_without_a_user_header_the_range_is_refused_too():
    sessions, _, refusals = session_service(["172.20.0.0/16"], user_header=None)
    sessions.startService()
    assert refusals and "any session could claim any client address in X-Forwarded-For" \
        in refusals[0]
    sessions.stopService()


def test_proxy_headers_from_a_sessions_address_are_never_believed(files):
    sessions = [parse_network("172.20.0.0/16")]
    addresses = ClientAddresses((parse_network("172.16.0.0/12"),), lambda: sessions)
    auth = Authenticator(Clock(), user_header="X-Forwarded-User", addresses=addresses)
    from_session = Request("tcp4:172.20.0.7:80", x_forwarded_user="carol",
                           x_forwarded_for="192.0.2.99")
    from_proxy = Request("tcp4:172.17.0.2:80", x_forwarded_user="carol",
                         x_forwarded_for="192.0.2.99")
    assert not addresses.from_trusted_proxy(from_session)
    assert addresses(from_session) == "172.20.0.7"
    with pytest.raises(AuthRefused):
        result(auth.user_of(from_session))
    assert addresses.from_trusted_proxy(from_proxy)
    assert addresses(from_proxy) == "192.0.2.99"
    assert result(auth.user_of(from_proxy)) == "carol"
