"""
The admin API (in memory: the real Site over a StringTransport, the fake
engine, a Clock), the drain, and the admin command's parts that need no
server.
"""

import io

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, RaisingMemoryReactor
from twisted.logger import formatEvent, globalLogPublisher

from capsule.admin import AdminClient, AdminError, do_cleanup, format_sessions, main
from capsule.sessions.drain import DEADLINE_ENDED, DRAINING, ENDED_BY_ADMIN
from capsule.auth.gate import Authenticator
from capsule.web.http import ClientAddresses
from capsule.core.spec import ContainerSpec
from capsule.sessions.manager import SessionManager
from capsule.sessions.session import SessionConfig
from capsule.tap import Options
from capsule.services import ListenerService, listening_url
from tests.support.fakes import FakeDockerAPI, RecordingClient
from tests.support.httpclient import ask
from capsule.web.site import make_site


TOKEN = "a" * 32
LOOPBACK = IPv4Address("TCP", "127.0.0.1", 40000)
REMOTE = IPv4Address("TCP", "203.0.113.9", 40000)


class Admin:
    def __init__(self, www, authenticator=None, users=(), **site_options) -> None:
        self.reactor = MemoryReactorClock()
        self.docker = FakeDockerAPI()
        self.manager = SessionManager(self.docker, self.reactor, SessionConfig(
            spec=ContainerSpec(image="capsule-runtime:latest"), instance="admin-test"))
        self.site = make_site(self.manager, self.docker, self.reactor, str(www),
                              authenticator=authenticator, admin_token=TOKEN,
                              admin_users=users, **site_options)

    def request(self, path: str, method: str = "GET", peer=LOOPBACK, headers=()):
        response = ask(self.site, method, path, headers, peer=peer)
        return response.status, response.json()

    def session(self, user=None):
        client = RecordingClient()
        return self.manager.create(client, 80, 24, user=user), client


@pytest.fixture
def admin(tmp_path):
    (tmp_path / "index.html").write_text("<html></html>")
    return Admin(tmp_path)


def test_list_says_owner_state_container_client_and_bytes(admin):
    session, _ = admin.session()
    admin.docker.processes[0].emit(b"hello")
    admin.reactor.advance(7)
    status, body = admin.request("/api/admin/sessions")
    assert status == 200
    assert body == {"instance": "admin-test", "draining": False, "sessions": [{
        "id": session.id, "owner": None, "state": "running", "created": 0.0, "age": 7.0,
        "idle": 7.0, "container": session.container_id, "client_attached": True,
        "bytes_out": 5}], "kept": []}


def test_the_list_says_what_other_parts_count_of_a_session(tmp_path):
    # The egress proxy's refusals per session (capsule.gateway.egress).
    (tmp_path / "index.html").write_text("<html></html>")
    counts = {}
    admin = Admin(tmp_path, admin_session_facts=lambda session_id: {
        "egress_refusals": counts.get(session_id, 0)})
    session, _ = admin.session()
    counts[session.id] = 3
    _, body = admin.request("/api/admin/sessions")
    assert body["sessions"][0]["egress_refusals"] == 3


def test_end_one_by_prefix_tells_its_client(admin):
    session, client = admin.session()
    other, other_client = admin.session()
    status, body = admin.request(f"/api/admin/sessions/{session.id[:8]}", "DELETE")
    assert (status, body) == (200, {"ended": session.id})
    assert client.events[-1] == ("ended", None, ENDED_BY_ADMIN)
    assert list(admin.manager.sessions) == [other.id]
    assert other_client.kinds() == ["started"]


def test_end_unknown_or_too_short(admin):
    session, _ = admin.session()
    assert admin.request("/api/admin/sessions/" + "0" * 36, "DELETE")[0] == 404
    assert admin.request("/api/admin/sessions/" + session.id[:2], "DELETE")[0] == 404
    assert list(admin.manager.sessions) == [session.id]


def test_end_all(admin):
    clients = [admin.session()[1] for _ in range(3)]
    assert admin.request("/api/admin/sessions", "DELETE") == (200, {"ended": 3})
    assert admin.manager.sessions == {}
    assert [c.events[-1] for c in clients] == [("ended", None, ENDED_BY_ADMIN)] * 3


def test_drain_tells_clients_health_says_draining_and_the_deadline_ends_the_rest(admin):
    session, client = admin.session()
    status, body = admin.request("/api/admin/drain?deadline=60", "POST")
    assert (status, body) == (200, {"draining": True, "since": 0.0, "deadline_in": 60.0,
                                    "sessions": 1})
    assert client.events[-1] == ("notice", DRAINING)
    assert admin.site.drain.active and admin.site.websocket_factory.sessions.drain is admin.site.drain
    status, health = admin.request("/health")
    assert (status, health["status"], health["draining"]["draining"]) == (503, "draining", True)
    admin.reactor.advance(59)
    assert session.status() == "running"
    admin.reactor.advance(1)
    assert client.events[-1] == ("ended", None, DEADLINE_ENDED)
    assert admin.manager.sessions == {}


def test_drain_without_deadline_then_cancelled(admin):
    session, _ = admin.session()
    assert admin.request("/api/admin/drain", "POST")[1]["deadline_in"] is None
    admin.reactor.advance(10 ** 6)
    assert session.status() == "running"
    assert admin.request("/api/admin/drain", "DELETE")[1]["draining"] is False
    status, health = admin.request("/health")
    assert (status, health["status"]) == (200, "ok")


def test_drain_refuses_a_bad_deadline(admin):
    assert admin.request("/api/admin/drain?deadline=soon", "POST")[0] == 400
    assert not admin.site.drain.active


def test_from_elsewhere_refused_without_the_token(admin):
    admin.session()
    status, body = admin.request("/api/admin/sessions", peer=REMOTE)
    assert (status, body["code"]) == (401, "unauthenticated")
    status, _ = admin.request("/api/admin/sessions", peer=REMOTE,
                              headers=[("Authorization", "Bearer " + "b" * 32)])
    assert status == 401
    status, body = admin.request("/api/admin/sessions", peer=REMOTE,
                                 headers=[("Authorization", "Bearer " + TOKEN)])
    assert status == 200 and len(body["sessions"]) == 1


def test_loopback_through_a_proxy_is_not_loopback(admin):
    status, _ = admin.request("/api/admin/sessions", "DELETE",
                              headers=[("X-Forwarded-For", "203.0.113.9")])
    assert status == 401


def test_loopback_through_any_proxy_header_is_not_loopback(admin):
    for name in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
        assert admin.request("/api/admin/sessions", headers=[(name, "203.0.113.9")])[0] == 401


@pytest.mark.parametrize("site_options, users, status", [
    ({}, (), 401), ({}, ["ops"], 401), ({"admin_loopback": True}, (), 200),
])
def test_with_users_loopback_is_not_admin_unless_the_operator_says(
        tmp_path, site_options, users, status):
    # Issue 19: with users, anyone on the machine listed every user's full
    # session ids and ended any session through loopback.
    (tmp_path / "index.html").write_text("<html></html>")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ops:{'o' * 32}\nann:{'n' * 32}\n")
    admin = Admin(tmp_path, Authenticator(MemoryReactorClock(), addresses=ClientAddresses(),
                                          tokens=str(tokens)), users=users, **site_options)
    session, _ = admin.session(user="ann")
    answer = admin.request("/api/admin/sessions", "DELETE")
    assert answer[0] == status, answer
    if status != 200:
        assert answer[1]["code"] == "unauthenticated"
        assert list(admin.manager.sessions) == [session.id]
        # The admin token, or an admin user, from loopback as from anywhere.
        assert admin.request("/api/admin/sessions",
                             headers=[("Authorization", "Bearer " + TOKEN)])[0] == 200
    if users:
        assert admin.request("/api/admin/sessions",
                             headers=[("Authorization", "Bearer " + "o" * 32)])[0] == 200
        assert admin.request("/api/admin/sessions",
                             headers=[("Authorization", "Bearer " + "n" * 32)])[0] == 403


def test_with_users_and_no_token_the_admin_api_says_how_to_open_it(tmp_path):
    (tmp_path / "index.html").write_text("<html></html>")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ann:{'n' * 32}\n")
    reactor = MemoryReactorClock()
    manager = SessionManager(FakeDockerAPI(), reactor, SessionConfig(
        spec=ContainerSpec(image="capsule-runtime:latest"), instance="admin-test"))
    site = make_site(manager, FakeDockerAPI(), reactor, str(tmp_path),
                     authenticator=Authenticator(reactor, addresses=ClientAddresses(),
                                                 tokens=str(tokens)))
    response = ask(site, "GET", "/api/admin/sessions", peer=LOOPBACK)
    assert (response.status, response.json()) == (403, {
        "error": "the admin API is closed: with users it needs --admin-token, --admin-user"
                 " or --admin-loopback", "code": "forbidden"})


def test_another_sites_page_is_refused(admin):
    session, _ = admin.session()
    status, _ = admin.request("/api/admin/sessions", headers=[("Sec-Fetch-Site", "cross-site")])
    assert status == 403
    assert list(admin.manager.sessions) == [session.id]


def test_unknown_path_and_method(admin):
    assert admin.request("/api/admin/nothing")[0] == 404
    assert admin.request("/api/admin/sessions", "PUT") == (405, {
        "error": "PUT is not allowed here; use GET, HEAD, DELETE", "code": "method_not_allowed"})
    assert admin.request("/api/admin/drain", "PATCH") == (405, {
        "error": "PATCH is not allowed here; use GET, HEAD, POST, DELETE",
        "code": "method_not_allowed"})


def test_admin_users_with_authentication(tmp_path):
    (tmp_path / "index.html").write_text("<html></html>")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ops:{'o' * 32}\nann:{'n' * 32}\n")
    reactor = MemoryReactorClock()
    admin = Admin(tmp_path, Authenticator(reactor, addresses=ClientAddresses(),
                                             tokens=str(tokens)), users=["ops"])
    session, _ = admin.session(user="ann")
    status, body = admin.request("/api/admin/sessions", peer=REMOTE,
                                 headers=[("Authorization", "Bearer " + "o" * 32)])
    assert status == 200 and body["sessions"][0]["owner"] == "ann"
    status, body = admin.request("/api/admin/sessions", "DELETE", peer=REMOTE,
                                 headers=[("Authorization", "Bearer " + "n" * 32)])
    assert (status, body["code"]) == (403, "forbidden")
    # The admin token passes the login gate, which knows no such user.
    status, _ = admin.request("/api/admin/sessions", peer=REMOTE,
                              headers=[("Authorization", "Bearer " + TOKEN)])
    assert status == 200
    assert list(admin.manager.sessions) == [session.id]


# -- options ------------------------------------------------------------------------


def options(*args):
    o = Options()
    o.parseOptions(list(args))
    return o


def test_admin_options(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert options("--admin-token-file", str(token_file))["admin-token"] == TOKEN
    from twisted.python.usage import UsageError
    with pytest.raises(UsageError, match="16 characters"):
        options("--admin-token", "short")
    with pytest.raises(UsageError, match="--admin-user needs users"):
        options("--admin-user", "ops")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ops:{'o' * 32}\n")
    assert options("--tokens", str(tokens), "--admin-loopback").config.admin_loopback
    assert not options("--tokens", str(tokens)).config.admin_loopback


def test_listening_url():
    class Port:
        def __init__(self, address):
            self.address = address

        def getHost(self):
            return self.address
    assert listening_url(Port(IPv4Address("TCP", "127.0.0.1", 3001)), False) == \
        "http://127.0.0.1:3001/"
    assert listening_url(Port(IPv4Address("TCP", "0.0.0.0", 3443)), True) == \
        "https://127.0.0.1:3443/"


# -- the command ------------------------------------------------------------------


def test_format_sessions():
    text = format_sessions({"instance": "default", "draining": True, "sessions": [{
        "id": "4afc562d-7933-4bb1-9a30-ade0a7ee03de", "owner": "ann", "state": "running",
        "age": 3725, "idle": 61, "container": "30d776e553bc0123", "client_attached": True,
        "bytes_out": 363}]})
    assert text.splitlines() == [
        "SESSION   OWNER  STATE    AGE    IDLE   CONTAINER     CLIENT    BYTES OUT",
        "4afc562d  ann    running  1h02m  1m01s  30d776e553bc  attached  363",
        "1 session of instance default (draining)"]


def test_format_sessions_lists_the_kept_ones_after_the_live_ones():
    text = format_sessions({"instance": "default", "draining": False, "sessions": [], "kept": [{
        "id": "6f9619ff-8b86-4011-b42d-00c04fc964ff", "owner": "ann", "state": "kept",
        "age": 7200, "container": "0123456789abcdef", "kept_at": 1.0}]})
    assert text.splitlines() == [
        "SESSION   OWNER  STATE  AGE    IDLE  CONTAINER     CLIENT  BYTES OUT",
        "6f9619ff  ann    kept   2h00m  -     0123456789ab  -       -",
        "0 sessions and 1 kept of instance default"]


def test_end_needs_an_id_or_all():
    out, err = io.StringIO(), io.StringIO()
    assert main(["--url", "http://127.0.0.1:9", "end"], out, err) == 1
    assert "give a session id, or --all" in err.getvalue()


class FakeAPI:
    def __init__(self, containers, running_execs=()) -> None:
        self._containers = containers
        self._running = set(running_execs)
        self.removed = []
        self.api = self

    def containers(self, all, filters):
        assert all and filters == {"label": ["io.capsule.managed=true",
                                             "io.capsule.instance=old"]}
        return self._containers

    def inspect_container(self, container_id):
        return {"ExecIDs": [f"exec-{container_id}"]}

    def exec_inspect(self, exec_id):
        return {"Running": exec_id in self._running}

    def remove_container(self, container_id, force, v):
        self.removed.append(container_id)


class Args:
    instance = "old"
    dry_run = False
    force = False


class Health(AdminClient):
    def __init__(self, answer) -> None:
        super().__init__("http://127.0.0.1:3001")
        self._answer = answer

    def health(self):
        return self._answer


CONTAINERS = [{"Id": "c1", "Names": ["/capsule-1"], "State": "running"},
              {"Id": "c2", "Names": ["/capsule-2"], "State": "exited"}]


def test_cleanup_removes_the_containers_of_a_stopped_instance():
    docker, out = FakeAPI(CONTAINERS), io.StringIO()
    assert do_cleanup(Health(None), Args(), out, docker) == 0
    assert docker.removed == ["c1", "c2"]
    assert out.getvalue().splitlines()[-1] == "removed 2 container(s) of instance old"


def test_cleanup_refused_while_the_instance_answers():
    docker = FakeAPI(CONTAINERS)
    with pytest.raises(AdminError, match="capsule instance old is running"):
        do_cleanup(Health({"instance": "old"}), Args(), io.StringIO(), docker)
    assert docker.removed == []
    # Another instance at that address is no reason to refuse.
    do_cleanup(Health({"instance": "other"}), Args(), io.StringIO(), docker)
    assert docker.removed == ["c1", "c2"]


def test_cleanup_refused_while_a_capsule_is_attached():
    docker = FakeAPI(CONTAINERS, running_execs=["exec-c1"])
    with pytest.raises(AdminError, match="capsule-1 has a running exec"):
        do_cleanup(Health(None), Args(), io.StringIO(), docker)
    assert docker.removed == []
    forced = Args()
    forced.force = True
    do_cleanup(Health(None), forced, io.StringIO(), docker)
    assert docker.removed == ["c1", "c2"]


# -- the ready line -------------------------------------------------------------------


def ready_lines(recovered, public_url=None, fail_listen=False):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        ready = Deferred()
        listeners = ListenerService(ready, lambda: recovered, public_url)
        reactor = RaisingMemoryReactor(OSError("in use")) if fail_listen else MemoryReactor()
        StreamServerEndpointService(TCP4ServerEndpoint(reactor, 3001), Factory()
                                    ).setServiceParent(listeners)
        listeners.startService()
        before = [e for e in events if "ready" in e.get("log_format", "")]
        ready.callback(None)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert before == []
    return [formatEvent(e) for e in events if e.get("log_namespace") == "capsule.tap"]


def test_the_ready_line_once_the_ports_are_open():
    assert ready_lines(0) == ["capsule is ready: http://127.0.0.1:3001/ (0 sessions recovered)"]
    assert ready_lines(1, "https://capsule.example") == [
        "capsule is ready: https://capsule.example/ (1 session recovered)"]
    assert ready_lines(None) == ["capsule is ready: http://127.0.0.1:3001/ (the sessions of"
                                 " an earlier run are not known yet)"]


def test_no_ready_line_when_no_port_opens():
    assert ready_lines(0, fail_listen=True) == [
        "capsule could not open any of its --listen ports"]
