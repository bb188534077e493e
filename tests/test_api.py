"""
The session API in memory: requests through the real Site over a
StringTransport, against the fake engine; and the archive check.
"""

import base64
import io
import json
import tarfile

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from capsule.core.admission import AdmissionControl, AdmissionPolicy
from capsule.web.exec import EXECS_PER_SESSION, exec_request, timed_argv
from capsule.web.upload import UPLOAD_MAX_BYTES
from capsule.auth.gate import Authenticator
from capsule.web.http import ClientAddresses
from capsule.engine.command import OutputCollector, utf8_text
from capsule.core.spec import ContainerSpec
from capsule.web.openapi import ROUTES, document
from capsule.core.shares import ShareStore
from capsule.sessions.manager import SessionManager
from capsule.sessions.spectators import Spectators
from capsule.sessions.session import SessionConfig
from capsule.core.tarcheck import ArchiveRefused, check, kind_of, rewrite
from tests.support.fakes import FakeDockerAPI
from tests.support.httpclient import answered, send

from .in_memory import parse_response

ALICE, BOB = "a" * 32, "b" * 32
PEER = IPv4Address("TCP", "127.0.0.1", 40000)


class Api:
    def __init__(self, www, authenticator=None, public_url=None, policy=None) -> None:
        from capsule.web.site import make_site
        self.reactor = MemoryReactorClock()
        self.docker = FakeDockerAPI()
        self.spectators = Spectators(self.reactor, ShareStore(self.reactor, 3600, 7200))
        self.manager = SessionManager(self.docker, self.reactor, SessionConfig(
            spec=ContainerSpec(image="capsule-runtime:latest"), instance="api-test"),
            observers=[self.spectators])
        self.admission = None if policy is None else AdmissionControl(
            self.manager, self.reactor, policy)
        self.site = make_site(self.manager, self.docker, self.reactor, str(www),
                              authenticator=authenticator, public_url=public_url,
                              admission=self.admission, spectators=self.spectators)
        self.factory = self.site.websocket_factory

    def send(self, path: str, method: str = "GET", body: bytes | None = None,
             token: str | None = None, content_type: str = "application/json",
             length: int | None = None) -> StringTransport:
        headers = []
        if token is not None:
            headers.append(("Authorization", f"Bearer {token}"))
        if body is not None:
            headers += [("Content-Type", content_type),
                        ("Content-Length", len(body) if length is None else length)]
        return send(self.site, method, path, headers, body, peer=PEER)

    def request(self, path: str, method: str = "GET", body=None, **kwargs):
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        response = answered(self.send(path, method, body, **kwargs), method,
                            f"{method} {path}", clock=self.reactor)
        return response.status, response.headers, response.json()

    def create(self, **kwargs):
        status, _, body = self.request("/api/sessions", "POST", {"cols": 100, "rows": 30},
                                       **kwargs)
        assert status == 201, body
        return body


@pytest.fixture
def www(tmp_path):
    (tmp_path / "index.html").write_text("<html></html>")
    return tmp_path


@pytest.fixture
def api(www):
    return Api(www)


@pytest.fixture
def authed(www, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    return Api(www, Authenticator(MemoryReactorClock(), addresses=ClientAddresses(),
                             tokens=str(tokens)),
               public_url="https://capsule.example")


def test_create_answers_once_the_session_runs_without_a_client(api):
    body = api.create()
    session = api.manager.sessions[body["id"]]
    assert body == {"id": session.id, "status": "detached", "state": "detached",
                    "created": session.core.created_at, "client_attached": False,
                    "profile": "shell", "url": f"/?session_id={session.id}", "user": None}
    assert session.core.size == (100, 30)
    assert session.client is None


def test_list_get_and_delete(api):
    first, second = api.create(), api.create()
    status, _, body = api.request("/api/sessions")
    assert status == 200
    assert [s["id"] for s in body["sessions"]] == [first["id"], second["id"]]
    assert body["user"] is None
    status, _, body = api.request(f"/api/sessions/{first['id']}")
    assert (status, body["id"], body["status"]) == (200, first["id"], "detached")
    status, _, body = api.request(f"/api/sessions/{first['id']}", "DELETE")
    assert (status, body) == (200, {"id": first["id"], "ended": True})
    assert list(api.manager.sessions) == [second["id"]]
    status, _, body = api.request(f"/api/sessions/{first['id']}")
    assert (status, body["code"]) == (404, "session_not_found")


def test_head_is_get_without_its_body(api):
    session = api.create()
    transport = api.send(f"/api/sessions/{session['id']}", "HEAD")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"content-type: application/json" in head.lower()
    assert body == b""


def test_unknown_routes_and_methods_are_json(api):
    session = api.create()
    for path in ("/api/nothing", "/api/sessions/not-an-id",
                 f"/api/sessions/{session['id']}/nothing", "/api/sessions/"
                 "00000000-0000-4000-8000-000000000000"):
        status, headers, body = api.request(path)
        assert (status, headers["content-type"]) == (404, "application/json"), path
        assert body["code"] in ("not_found", "session_not_found")
    status, headers, body = api.request("/api/sessions", "PUT", {})
    assert (status, body["code"], headers["allow"]) == (405, "method_not_allowed", "GET, POST")
    status, headers, body = api.request(f"/api/sessions/{session['id']}/exec")
    assert (status, headers["allow"]) == (405, "POST")


def test_a_method_a_route_lacks_is_a_405_with_a_small_body_too(api):
    session = api.create()
    for path, allow in [(f"/api/sessions/{session['id']}", "GET, DELETE"),
                        ("/api/profiles", "GET"), ("/api/openapi.json", "GET")]:
        for method in ("PUT", "PATCH", "POST"):
            status, headers, body = api.request(path, method, {"a": 1})
            assert (status, body["code"], headers["allow"]) == (
                405, "method_not_allowed", allow), (method, path)
        status, _, body = api.request(path, "PUT", b"x" * 5000)
        assert (status, body["code"], body["limit"]) == (413, "body_too_large", 4096)
    assert list(api.manager.sessions) == [session["id"]]


def test_create_refuses_bad_bodies(api):
    cases = [({"cols": 0}, 400), ({"cols": "80"}, 400), ({"rows": 1001}, 400),
             ({"shell": "zsh"}, 400), ([1, 2], 400)]
    for body, status in cases:
        assert api.request("/api/sessions", "POST", body)[0] == status, body
    assert api.request("/api/sessions", "POST", b"{nope")[0] == 400
    status, _, body = api.request("/api/sessions", "POST", b"{}", content_type="text/plain")
    assert (status, body["code"]) == (415, "unsupported_media_type")
    assert api.request(f"/api/sessions/{api.create()['id']}/exec", "POST", b"")[0] == 400
    assert len(api.manager.sessions) == 1


def test_json_nested_too_deeply_is_a_400_not_a_500(api):
    deep = b"[" * 30000 + b"]" * 30000
    status, _, body = api.request("/api/sessions", "POST", deep)
    assert (status, body) == (400, {"error": "the body's JSON nests too deeply",
                                    "code": "bad_request"})
    session = api.create()
    status, _, body = api.request(f"/api/sessions/{session['id']}/exec", "POST",
                                  b'{"argv": ' + deep + b"}")
    assert (status, body["code"]) == (400, "bad_request")
    assert list(api.manager.sessions) == [session["id"]]
    assert api.docker.commands_run == []


def test_create_without_a_body_takes_the_defaults(api):
    status, _, body = api.request("/api/sessions", "POST", b"", content_type="text/plain")
    assert status == 201
    assert api.manager.sessions[body["id"]].core.size == (80, 24)


def test_create_body_over_its_limit_is_refused_before_it_is_read(api):
    transport = api.send("/api/sessions", "POST", b"{}", length=10 * 1024 * 1024)
    status, _, body = parse_response(transport.value())
    assert (status, body["code"]) == (413, "body_too_large")
    assert api.manager.sessions == {}


def test_admission_and_drain_apply(www):
    api = Api(www, policy=AdmissionPolicy(max_sessions=10, max_per_client=1, rate=None))
    api.create()
    status, headers, body = api.request("/api/sessions", "POST", {})
    assert (status, body["code"], headers["retry-after"]) == (429, "quota_exceeded", "5")
    api.admission.policy.max_per_client = 5
    api.admission.policy.max_sessions = 1
    status, _, body = api.request("/api/sessions", "POST", {})
    assert (status, body["code"]) == (503, "server_full")
    api.admission.policy.max_sessions = 5
    api.site.drain.active = True
    status, _, body = api.request("/api/sessions", "POST", {})
    assert (status, body["code"]) == (503, "draining")
    assert len(api.manager.sessions) == 1


def test_a_refused_profile_or_repository_costs_no_admission(www):
    api = Api(www, policy=AdmissionPolicy(max_sessions=10, max_per_client=10, rate=(1, 3600)))
    for body, code in [({"profile": "nope"}, "unknown_profile"),
                       ({"repository": "http://example.com/r.git"}, "bad_repository"),
                       ({"repository": "https://u:p@example.com/r.git"}, "bad_repository")]:
        status, _, answer = api.request("/api/sessions", "POST", body)
        assert (status, answer["code"]) == (400, code), body
    assert api.manager.sessions == {}
    api.create()
    status, _, answer = api.request("/api/sessions", "POST", {})
    assert (status, answer["code"]) == (429, "quota_exceeded")


def test_an_unknown_profile_is_refused_with_the_known_ones(api):
    status, _, body = api.request("/api/sessions", "POST", {"profile": "nope"})
    assert (status, body["code"]) == (400, "unknown_profile")
    assert body["profiles"] == sorted(api.manager.profiles)
    assert api.manager.sessions == {}
    assert api.create()["profile"] == "shell"


def test_the_profiles_are_listed_with_their_descriptions_only(www, tmp_path):
    from capsule.core.profiles import builtin_profiles, load_profiles
    path = tmp_path / "profiles.toml"
    path.write_text('[profiles.offline]\ndescription = "no network"\nnetwork = "none"\n'
                    'secrets = ["ANTHROPIC_API_KEY"]\n')
    api = Api(www)
    api.manager.profiles = load_profiles(str(path), builtin_profiles(
        api.manager.profiles["shell"]))
    status, _, body = api.request("/api/profiles")
    assert (status, body) == (200, {"default": "shell", "profiles": [
        {"name": "claude", "description": "Claude Code in /workspace, then a login shell"},
        {"name": "offline", "description": "no network"},
        {"name": "shell", "description": "a login shell"}]})
    status, headers, body = api.request("/api/profiles", "DELETE")
    assert (status, body["code"], headers["allow"]) == (405, "method_not_allowed", "GET")
    assert api.request("/api/profiles/offline")[0] == 404


def test_the_profiles_need_a_user_like_every_endpoint(authed):
    assert authed.request("/api/profiles")[0] == 401
    assert authed.request("/api/profiles", token=ALICE)[0] == 200


def test_a_failed_start_is_a_503(api):
    api.docker.images.clear()
    status, _, body = api.request("/api/sessions", "POST", {})
    assert (status, body["code"]) == (503, "start_failed")
    assert "missing" in body["error"]


def test_other_users_sessions_are_404_like_missing_ones(authed):
    mine = authed.create(token=ALICE)
    assert mine["user"] == "alice"
    assert mine["url"] == f"https://capsule.example/?session_id={mine['id']}"
    for method, path, body in [("GET", "", None), ("DELETE", "", None),
                               ("POST", "/exec", {"argv": ["true"]})]:
        status, _, answer = authed.request(f"/api/sessions/{mine['id']}{path}", method, body,
                                           token=BOB)
        assert (status, answer["code"]) == (404, "session_not_found"), (method, path)
    assert authed.request("/api/sessions", token=BOB)[2]["sessions"] == []
    assert authed.request("/api/sessions")[0] == 401
    assert authed.docker.commands_run == []
    assert list(authed.manager.sessions) == [mine["id"]]


def test_exec_runs_as_developer_under_timeout(api):
    session = api.create()
    argv = ("timeout", "-s", "KILL", "--", "5", "sh", "-c", "cat; exit 3")
    api.docker.commands[argv] = lambda stdin: (b"out:" + stdin, b"err", 3)
    status, _, body = api.request(f"/api/sessions/{session['id']}/exec", "POST", {
        "argv": ["sh", "-c", "cat; exit 3"], "stdin": "h\u00e9", "timeout": 5,
        "env": {"A": "1"}, "cwd": "/tmp"})
    assert status == 200
    assert body == {"stdout": "out:h\u00e9", "stderr": "err", "exit_code": 3,
                    "timed_out": False, "truncated": {"stdout": False, "stderr": False},
                    "duration": body["duration"], "stdout_encoding": "utf-8",
                    "stderr_encoding": "utf-8"}
    run, = api.docker.commands_run
    assert (run["argv"], run["user"], run["workdir"], run["stdin"]) == (
        argv, "developer", "/tmp", "h\u00e9".encode())
    assert run["env"]["A"] == "1" and run["env"]["TERM"] == "xterm-256color"


def test_exec_stdin_may_hold_nul_and_must_be_a_string(api):
    session = api.create()
    argv = tuple(timed_argv(["cat"], 60))
    api.docker.commands[argv] = lambda stdin: (stdin, b"", 0)
    path = f"/api/sessions/{session['id']}/exec"
    status, _, body = api.request(path, "POST", {"argv": ["cat"], "stdin": "a\u0000b"})
    assert (status, body["stdout"]) == (200, "a\u0000b")
    assert api.docker.commands_run[-1]["stdin"] == b"a\0b"
    for stdin in (5, 0, False, [], ["a"], {"a": "b"}):
        status, _, body = api.request(path, "POST", {"argv": ["cat"], "stdin": stdin})
        assert (status, body) == (400, {"error": "stdin must be a string",
                                        "code": "bad_request"}), stdin


def test_exec_output_cap_never_splits_a_character(api):
    session = api.create()
    argv = tuple(timed_argv(["emit"], 60))
    api.docker.commands[argv] = lambda stdin: (("\u00e9" * 3 + "x").encode() + b"\xff", b"", 0)
    status, _, body = api.request(f"/api/sessions/{session['id']}/exec", "POST", {
        "argv": ["emit"], "max_output": 5})
    assert status == 200
    # 5 bytes: two whole é and the first byte of the third, which is left out.
    assert (body["stdout"], body["truncated"]) == ("\u00e9\u00e9",
                                                   {"stdout": True, "stderr": False})
    status, _, body = api.request(f"/api/sessions/{session['id']}/exec", "POST", {
        "argv": ["emit"]})
    # Whole, it is not UTF-8: it comes as base64, every byte of it.
    assert (body["stdout"], body["stdout_encoding"]) == (
        base64.b64encode(("\u00e9" * 3 + "x").encode() + b"\xff").decode(), "base64")


def test_exec_bad_requests(api):
    session = api.create()
    path = f"/api/sessions/{session['id']}/exec"
    for body in [{}, {"argv": []}, {"argv": "ls"}, {"argv": [1]}, {"argv": ["a\0"]},
                 {"argv": ["ls"], "timeout": 601}, {"argv": ["ls"], "timeout": 0},
                 {"argv": ["ls"], "max_output": 16 * 1024 * 1024 + 1},
                 {"argv": ["ls"], "env": {"A=B": "c"}}, {"argv": ["ls"], "cwd": "rel"},
                 {"argv": ["ls"], "user": "root"}, {"argv": ["ls"], "cwd": ""},
                 {"argv": ["ls"], "env": []}, {"argv": ["ls"], "env": False},
                 {"argv": ["ls"], "env": ""}]:
        status, _, answer = api.request(path, "POST", body)
        assert (status, answer["code"]) == (400, "bad_request"), body
    assert api.docker.commands_run == []


def test_exec_limit_per_session(api):
    from twisted.internet.defer import Deferred
    session = api.create()
    held = []
    argv = tuple(timed_argv(["slow"], 60))

    def slow(stdin):
        d = Deferred()
        held.append(d)
        return d
    api.docker.commands[argv] = slow
    path = f"/api/sessions/{session['id']}/exec"
    pending = [api.send(path, "POST", b'{"argv": ["slow"]}') for _ in range(EXECS_PER_SESSION)]
    status, headers, body = api.request(path, "POST", {"argv": ["slow"]})
    assert (status, body["code"]) == (429, "too_many_execs")
    for d in held:
        d.callback((b"done", b"", 0))
    assert [parse_response(t.value())[2]["stdout"] for t in pending] == ["done"] * EXECS_PER_SESSION
    assert api.site.session_api.execs == {}


def test_an_exec_in_a_session_ended_meanwhile_is_a_404_saying_so(api):
    from twisted.internet.defer import Deferred
    session = api.create()
    held = []
    api.docker.commands[tuple(timed_argv(["slow"], 60))] = (
        lambda stdin: held.append(Deferred()) or held[-1])
    pending = api.send(f"/api/sessions/{session['id']}/exec", "POST", b'{"argv": ["slow"]}')
    api.request(f"/api/sessions/{session['id']}", "DELETE")
    held[0].callback((b"", b"", 137))
    for _ in range(10):
        api.reactor.advance(0.05)
    status, _, body = parse_response(pending.value())
    assert (status, body) == (404, {
        "error": f"session {session['id']} ended while the command ran: the session was"
                 " ended through the API", "code": "session_not_found"})
    assert api.site.session_api.execs == {}


def test_an_exec_whose_cwd_cannot_be_entered_is_a_400(api):
    session = api.create()
    argv = tuple(timed_argv(["pwd"], 60))
    api.docker.commands[argv] = lambda stdin: (
        b'OCI runtime exec failed: exec failed: unable to start container process: chdir to'
        b' cwd ("/nope") set in config.json failed: no such file or directory: unknown\r\n',
        b"", 126)
    status, _, body = api.request(f"/api/sessions/{session['id']}/exec", "POST", {
        "argv": ["pwd"], "cwd": "/nope"})
    assert (status, body) == (400, {
        "error": "cwd /nope: the command cannot be run there (no such file or directory)",
        "code": "bad_cwd"})
    # A command of the caller's that exits 126 is only that.
    api.docker.commands[argv] = lambda stdin: (b"chdir to cwd failed: x", b"", 126)
    status, _, body = api.request(f"/api/sessions/{session['id']}/exec", "POST", {
        "argv": ["pwd"]})
    assert (status, body["exit_code"]) == (200, 126)


def test_exec_output_held_at_once_is_bounded_server_wide(api):
    from twisted.internet.defer import Deferred

    from capsule.web.exec import EXEC_MAX_OUTPUT, EXEC_OUTPUT_BUDGET, answer_bound
    held = []
    argv = tuple(timed_argv(["slow"], 60))
    api.docker.commands[argv] = lambda stdin: held.append(Deferred()) or held[-1]
    request = json.dumps({"argv": ["slow"], "max_output": EXEC_MAX_OUTPUT}).encode()
    fits = EXEC_OUTPUT_BUDGET // answer_bound(EXEC_MAX_OUTPUT)
    sessions = [api.create()["id"] for _ in range(fits // EXECS_PER_SESSION + 1)]
    pending = [api.send(f"/api/sessions/{sessions[i // EXECS_PER_SESSION]}/exec", "POST",
                        request) for i in range(fits)]
    status, headers, body = api.request(f"/api/sessions/{sessions[-1]}/exec", "POST",
                                        {"argv": ["slow"], "max_output": EXEC_MAX_OUTPUT})
    assert (status, body["code"], headers["retry-after"]) == (503, "busy", "5")
    held[0].callback((b"", b"", 0))
    assert parse_response(pending[0].value())[0] == 200
    assert api.site.session_api.output_reserved == (fits - 1) * answer_bound(EXEC_MAX_OUTPUT)
    api.send(f"/api/sessions/{sessions[-1]}/exec", "POST", request)
    assert len(held) == fits + 1
    for d in held[1:]:
        d.callback((b"", b"", 0))
    assert api.site.session_api.output_reserved == 0


def _held_exec(api, stdout: bytes, stderr: bytes = b"", token=None, **fields):
    """
    An exec whose command, once its Deferred (returned) fires, printed
    C{stdout} and C{stderr}; its transport.
    """
    from twisted.internet.defer import Deferred
    held = Deferred()
    api.docker.commands[tuple(timed_argv(["emit"], 60))] = lambda stdin: held
    session = api.create(token=token) if token else api.create()
    transport = api.send(f"/api/sessions/{session['id']}/exec", "POST",
                         json.dumps({"argv": ["emit"], **fields}).encode(), token=token)
    return transport, lambda: held.callback((stdout, stderr, 0))


def test_exec_output_that_escaping_would_bloat_comes_as_base64(api):
    from capsule.web.exec import TEXT_SLACK, answer_bound
    session = api.create()
    control = b"\x01" * (TEXT_SLACK + 10)
    outputs = {"binary": (b"\xff" * 3000, control), "text": (b"caf\xc3\xa9\n\t\x1b[0m", b"")}
    for name, (stdout, stderr) in outputs.items():
        api.docker.commands[tuple(timed_argv([name], 60))] = (
            lambda stdin, out=(stdout, stderr): (*out, 0))
    path = f"/api/sessions/{session['id']}/exec"
    response = answered(api.send(path, "POST", b'{"argv": ["binary"], "max_output": 100000}'),
                        "POST", clock=api.reactor)
    body = response.json()
    # Sent at its exact length; 0xff is not UTF-8, and 0x01 escaped is six bytes.
    assert int(response["content-length"]) == len(response.body)
    assert len(response.body) <= answer_bound(100000)
    assert (body["stdout_encoding"], body["stderr_encoding"]) == ("base64", "base64")
    assert base64.b64decode(body["stdout"]) == b"\xff" * 3000
    assert base64.b64decode(body["stderr"]) == control
    assert len(response.body) < 1.34 * (3000 + len(control)) + 300
    # Text stays text, written as UTF-8, control characters escaped.
    response = answered(api.send(path, "POST", b'{"argv": ["text"]}'), "POST",
                        clock=api.reactor)
    assert b"caf\xc3\xa9\\n\\t\\u001b[0m" in response.body
    body = response.json()
    assert (body["stdout"], body["stdout_encoding"], body["stderr_encoding"]) == (
        "caf\u00e9\n\t\x1b[0m", "utf-8", "utf-8")
    # Unless base64 is asked for.
    status, _, body = api.request(path, "POST", {"argv": ["text"], "output_encoding": "base64"})
    assert (body["stdout"], body["stdout_encoding"], body["stderr"], body["stderr_encoding"]) == (
        base64.b64encode(b"caf\xc3\xa9\n\t\x1b[0m").decode(), "base64", "", "base64")
    status, _, body = api.request(path, "POST", {"argv": ["text"], "output_encoding": "hex"})
    assert (status, body["code"]) == (400, "bad_request")
    assert api.site.session_api.output_reserved == 0


@pytest.mark.parametrize("data, truncated", [
    (b"", False), (b"a" * 200000, False), ("\u00e9\u4e2d\U0001f600\"\\".encode() * 30000, False),
    (b"ab\xc3", True), (b"\n" * 100000, False), (b"\x00" * 100, False),
    (b"x\xc3(" * 1000, False), (b"\xe2\x82" * 40000, True)],
    ids=["empty", "ascii", "unicode", "cut", "newlines", "nul", "not-utf8", "cut-not-utf8"])
def test_encoded_output_is_its_bytes_at_the_length_said(data, truncated):
    from capsule.web.exec import encode_output, stream_bound
    encoded = encode_output(data, truncated)
    made = b"".join(encoded.pieces())
    assert len(made) == encoded.length <= stream_bound(len(data))
    if encoded.encoding == "base64":
        assert base64.b64decode(made) == data
    else:
        text = json.loads(b'"' + made + b'"')
        assert text.encode() == (data[:-1] if data == b"ab\xc3" else data)


def test_any_output_comes_back_whole_at_the_length_said():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from capsule.web.exec import answer_pieces, encode_output, stream_bound
    from capsule.engine.command import whole_characters

    pieces = st.one_of(st.binary(max_size=40), st.text(max_size=20).map(str.encode),
                       st.sampled_from([b"\x01" * 50, b"\n", b'"\\', b"\xff"]))

    @settings(max_examples=300, deadline=None)
    @given(st.lists(pieces, max_size=12), st.lists(pieces, max_size=3), st.booleans(),
           st.booleans())
    def check(out, err, truncated, always_base64):
        stdout, stderr = b"".join(out), b"".join(err)
        encoded = [encode_output(data, truncated, always_base64) for data in (stdout, stderr)]
        assert all(e.length <= stream_bound(len(d)) for e, d in zip(encoded, (stdout, stderr)))
        length, made = answer_pieces(*encoded, {"exit_code": 0})
        answer = b"".join(made)
        assert len(answer) == length
        body = json.loads(answer)
        for name, data in (("stdout", stdout), ("stderr", stderr)):
            if body[f"{name}_encoding"] == "base64":
                assert base64.b64decode(body[name]) == data
            else:
                assert not always_base64
                assert body[name].encode() == (whole_characters(data) if truncated else data)
    check()


def test_an_answer_is_written_as_its_client_reads(api):
    transport, end = _held_exec(api, b"\xff" * 500000, b"x" * 500000, max_output=500000)
    # The connection takes nothing in: nothing is written.
    transport.producer.pauseProducing()
    end()
    api.reactor.advance(1)
    assert transport.value() == b""
    assert api.site.session_api.output_reserved > 1000000
    transport.producer.resumeProducing()
    response = answered(transport, "POST", clock=api.reactor)
    body = response.json()
    assert base64.b64decode(body["stdout"]) == b"\xff" * 500000
    assert body["stderr"] == "x" * 500000
    assert api.site.session_api.output_reserved == 0


def test_an_answer_its_client_does_not_read_is_dropped(api):
    from twisted.logger import globalLogPublisher

    from capsule.web.exec import EXEC_WRITE_TIMEOUT
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        transport, end = _held_exec(api, b"\xff" * 500000, max_output=500000)
        transport.producer.pauseProducing()
        end()
        api.reactor.advance(EXEC_WRITE_TIMEOUT - 1)
        assert not transport.disconnecting
        api.reactor.advance(2)
    finally:
        globalLogPublisher.removeObserver(events.append)
    # Dropped: the connection closed, its bytes given back, one line said.
    assert transport.disconnecting
    assert api.site.session_api.output_reserved == 0
    said = [e for e in events if "read none of it" in e.get("log_format", "")]
    assert len(said) == 1 and said[0]["log_level"].name == "warn"
    api.reactor.advance(EXEC_WRITE_TIMEOUT * 2)
    assert api.site.session_api.output_reserved == 0


def test_an_answer_whose_client_left_is_let_go(api):
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure
    transport, end = _held_exec(api, b"\xff" * 500000, max_output=500000)
    transport.producer.pauseProducing()
    end()
    assert api.site.session_api.output_reserved > 0
    transport.channel.connectionLost(Failure(ConnectionLost()))
    assert api.site.session_api.output_reserved == 0
    # Gone before the command ended: the same.
    transport, end = _held_exec(api, b"\xff" * 500000, max_output=500000)
    transport.channel.connectionLost(Failure(ConnectionLost()))
    end()
    assert api.site.session_api.output_reserved == 0


def test_an_answer_that_cannot_be_made_closes_its_connection_and_is_let_go(api, monkeypatch):
    from capsule.web import exec as exec_module
    from twisted.logger import globalLogPublisher

    def broken(self):
        yield b"AAAA"
        raise RuntimeError("broken")
    monkeypatch.setattr(exec_module.EncodedOutput, "pieces", broken)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        transport, end = _held_exec(api, b"x")
        end()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert transport.disconnecting
    assert api.site.session_api.output_reserved == 0
    failed, = [e for e in events if "log_failure" in e]
    assert "exec of 'emit'" in failed["what"]


def test_a_users_answers_not_yet_written_are_capped(authed):
    from capsule.web.exec import EXEC_MAX_OUTPUT, EXEC_OUTPUT_PER_USER, answer_bound
    api = authed
    fits = EXEC_OUTPUT_PER_USER // answer_bound(EXEC_MAX_OUTPUT)
    pending = []
    for _ in range(fits):
        transport, end = _held_exec(api, b"\xff" * 1000, token=ALICE,
                                    max_output=EXEC_MAX_OUTPUT)
        transport.producer.pauseProducing()
        pending.append((transport, end))
    session = api.create(token=ALICE)
    status, headers, body = api.request(f"/api/sessions/{session['id']}/exec", "POST", {
        "argv": ["true"], "max_output": EXEC_MAX_OUTPUT}, token=ALICE)
    assert (status, body["code"], headers["retry-after"]) == (429, "answers_pending", "5")
    # Another user is not held back by her.
    theirs = api.create(token=BOB)
    assert api.request(f"/api/sessions/{theirs['id']}/exec", "POST", {
        "argv": ["true"], "max_output": EXEC_MAX_OUTPUT}, token=BOB)[0] == 200
    # Once ended, her answers hold their own size, and there is room again.
    for _, end in pending:
        end()
    assert api.request(f"/api/sessions/{session['id']}/exec", "POST", {
        "argv": ["true"], "max_output": EXEC_MAX_OUTPUT}, token=ALICE)[0] == 200
    for transport, _ in pending:
        transport.producer.resumeProducing()
        assert answered(transport, "POST", clock=api.reactor).status == 200
    assert api.site.session_api.output_reserved == 0


def test_an_exec_past_its_timeout_has_what_it_started_killed(api):
    from twisted.internet.defer import Deferred

    from capsule.web.exec import EXEC_MARK, KILL_AFTER, kill_marked_argv
    session = api.create()
    held = Deferred()
    api.docker.commands[tuple(timed_argv(["long"], 2))] = lambda stdin: held
    transport = api.send(f"/api/sessions/{session['id']}/exec", "POST",
                         b'{"argv": ["long"], "timeout": 2}')
    run, = api.docker.commands_run
    mark = run["env"][EXEC_MARK]
    assert len(mark) == 32
    api.reactor.advance(2 + KILL_AFTER - 0.1)
    assert len(api.docker.commands_run) == 1
    api.reactor.advance(0.2)
    kill = api.docker.commands_run[1]
    assert (kill["argv"], kill["user"]) == (tuple(kill_marked_argv(mark)), "developer")
    held.callback((b"", b"", 137))
    body = answered(transport, "POST", clock=api.reactor).json()
    assert (body["timed_out"], body["exit_code"]) == (True, 137)
    assert len(api.docker.commands_run) == 2
    # Each exec has its own mark, which the caller's env cannot replace.
    api.docker.commands[tuple(timed_argv(["true"], 60))] = lambda stdin: (b"", b"", 0)
    api.request(f"/api/sessions/{session['id']}/exec", "POST", {
        "argv": ["true"], "env": {EXEC_MARK: mark}})
    assert api.docker.commands_run[-1]["env"][EXEC_MARK] not in (mark, "")
    assert len(api.docker.commands_run) == 3


def test_exec_keeps_a_clientless_session_alive(api):
    session = api.create()
    core = api.manager.sessions[session["id"]].core
    left = core.left_at
    api.reactor.advance(30)
    api.request(f"/api/sessions/{session['id']}/exec", "POST", {"argv": ["true"]})
    assert core.left_at >= left + 30
    assert core.active_at == core.left_at


def test_a_clientless_session_does_not_expire_while_an_exec_runs(api):
    from twisted.internet.defer import Deferred

    from capsule.sessions.cleanup import expire_due
    session = api.create()
    held = Deferred()
    api.docker.commands[tuple(timed_argv(["long"], 600))] = lambda stdin: held
    transport = api.send(f"/api/sessions/{session['id']}/exec", "POST",
                         b'{"argv": ["long"], "timeout": 600}')
    for _ in range(50):
        api.reactor.advance(5)
        assert expire_due(api.manager, api.reactor) == []
    held.callback((b"", b"", 0))
    assert parse_response(transport.value())[0] == 200
    api.reactor.advance(59)
    assert expire_due(api.manager, api.reactor) == []
    api.reactor.advance(1)
    assert [s.id for s in expire_due(api.manager, api.reactor)] == [session["id"]]


def test_upload_needs_an_archive_type_and_a_live_session(api):
    session = api.create()
    status, _, body = api.request(f"/api/sessions/{session['id']}/workspace", "POST",
                                  b"x", content_type="text/plain")
    assert (status, body["code"]) == (415, "unsupported_media_type")
    # No live session: its body is refused from the headers, before it is
    # read (a 404, as for a session of another user).
    transport = api.send("/api/sessions/00000000-0000-4000-8000-000000000000/workspace",
                         "POST", b"x" * 10, content_type="application/x-tar")
    status, _, body = parse_response(transport.value())
    assert (status, body["code"]) == (404, "session_not_found")
    assert transport.channel._channel.requests[0].content.getvalue() == b""
    transport = api.send(f"/api/sessions/{session['id']}/workspace", "POST", b"x",
                         content_type="application/x-tar", length=UPLOAD_MAX_BYTES + 1)
    assert parse_response(transport.value())[0] == 413


def test_openapi_documents_every_route(api):
    status, _, body = api.request("/api/openapi.json")
    assert status == 200
    assert body == json.loads(json.dumps(document()))
    assert body["openapi"] == "3.1.0"
    documented = {(p, m) for p, ops in body["paths"].items() for m in ops}
    assert documented == set(ROUTES)


def test_openapi_document_other_methods_are_a_json_405(api):
    for method in ("POST", "DELETE"):
        status, headers, body = api.request("/api/openapi.json", method)
        assert (status, headers["allow"], body["code"]) == (405, "GET", "method_not_allowed")
    transport = api.send("/api/openapi.json", "HEAD")
    head, _, rest = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and rest == b""


def test_the_openapi_document_is_valid_openapi_3_1():
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(document())


# -- exec helpers ---------------------------------------------------------

def test_exec_request_defaults():
    assert exec_request({"argv": ["ls"]}, "/workspace") == {
        "argv": ["ls"], "stdin": b"", "cwd": "/workspace", "env": {}, "timeout": 60.0,
        "max_output": 1024 * 1024, "output_encoding": "auto"}
    assert timed_argv(["ls", "-l"], 2.5) == ["timeout", "-s", "KILL", "--", "2.5", "ls", "-l"]


def test_collector_keeps_the_cap_and_drops_the_rest():
    collector = OutputCollector(4)
    for _ in range(1000):
        collector.childDataReceived(1, b"abc")
    collector.childDataReceived(2, b"ab")
    from twisted.internet.error import ProcessTerminated
    from twisted.python.failure import Failure
    collector.processEnded(Failure(ProcessTerminated(exitCode=2)))
    result = collector.done.result
    assert (result.stdout, result.stderr, result.exit_code) == (b"abca", b"ab", 2)
    assert (result.truncated_stdout, result.truncated_stderr) == (True, False)
    # The result holds the only copy of the output.
    assert collector._kept == {1: bytearray(), 2: bytearray()}


@pytest.mark.parametrize("data, text", [
    (b"ab\xc3", "ab"), (b"ab\xe2\x82", "ab"), (b"ab\xf0\x9f\x98", "ab"),
    (b"ab\xc3\xa9", "ab\u00e9"), (b"\xff\xfe", "\ufffd\ufffd"), (b"", "")])
def test_utf8_text_of_a_cut(data, text):
    assert utf8_text(data, True) == text


# -- the archive check ----------------------------------------------------

def archive(entries, gzip=False) -> io.BytesIO:
    """
    A tar of C{entries}: (name, kind, extra), kind one of file, dir,
    symlink (extra: target), hardlink (extra: target), fifo, chr.
    """
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz" if gzip else "w",
                      format=tarfile.GNU_FORMAT) as tar:
        for name, kind, extra in entries:
            info = tarfile.TarInfo(name)
            data = None
            if kind == "file":
                payload = (extra or "").encode()
                info.size = len(payload)
                info.mode = 0o4755
                data = io.BytesIO(payload)
            else:
                info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                             "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE,
                             "chr": tarfile.CHRTYPE}[kind]
                info.linkname = extra or ""
            tar.addfile(info, data)
    out.seek(0)
    return out


def refusal(entries) -> ArchiveRefused:
    with pytest.raises(ArchiveRefused) as e:
        check(archive(entries), 1 << 30)
    return e.value


def test_check_accepts_and_rewrites_a_plain_archive():
    entries = [("./", "dir", None), ("./d/", "dir", None), ("./d/a", "file", "hello"),
               ("l", "symlink", "d/a"), ("d/up", "symlink", "../d"),
               ("abs", "symlink", "/workspace/d"), ("h", "hardlink", "d/a")]
    for gzip in (False, True):
        summary = check(archive(entries, gzip), 1 << 30)
        assert (summary.compressed, summary.entries, summary.files, summary.directories,
                summary.links, summary.size) == (gzip, 6, 1, 1, 4, 5)
    out = io.BytesIO()
    assert rewrite(archive(entries, True), out.write) == 6
    out.seek(0)
    rows = [(m.name, m.type, m.linkname, m.mode, m.uid, m.gid, m.uname)
            for m in tarfile.open(fileobj=out)]
    assert rows == [
        ("d", tarfile.DIRTYPE, "", 0o644, 1000, 1000, "developer"),
        ("d/a", tarfile.REGTYPE, "", 0o755, 1000, 1000, "developer"),
        ("l", tarfile.SYMTYPE, "d/a", 0o644, 1000, 1000, "developer"),
        ("d/up", tarfile.SYMTYPE, "../d", 0o644, 1000, 1000, "developer"),
        ("abs", tarfile.SYMTYPE, "/workspace/d", 0o644, 1000, 1000, "developer"),
        ("h", tarfile.LNKTYPE, "d/a", 0o644, 1000, 1000, "developer")]


@pytest.mark.parametrize("entries, entry", [
    ([("../evil", "file", "x")], "../evil"),
    ([("a/../../evil", "file", "x")], "a/../../evil"),
    ([("/etc/passwd", "file", "x")], "/etc/passwd"),
    ([("l", "symlink", "/etc")], "l"),
    ([("l", "symlink", "../outside")], "l"),
    ([("d/l", "symlink", "../../x")], "d/l"),
    ([("a", "symlink", "."), ("b", "symlink", "a/..")], "b"),
    ([("a", "symlink", "b"), ("b", "symlink", "a")], "a"),
    ([("l", "symlink", "d"), ("l/x", "file", "y")], "l/x"),
    ([("h", "hardlink", "/etc/passwd")], "h"),
    ([("h", "hardlink", "../x")], "h"),
    ([("h", "hardlink", "later"), ("later", "file", "")], "h"),
    ([("p", "fifo", None)], "p"),
    ([("c", "chr", None)], "c"),
    ([("a", "file", "1"), ("./a", "file", "2")], "./a"),
])
def test_check_refuses_entries_outside_the_workspace(entries, entry):
    assert refusal(entries).entry == entry


def test_check_refuses_what_is_not_an_archive_or_too_large():
    for data, code in [(b"", "empty"), (b"hello" * 200, "not_an_archive"),
                       (b"BZh91AY&SY" + b"\0" * 600, "not_an_archive"),
                       (b"\x1f\x8b\x08", "bad_archive"),
                       (b"\x1f\x8b" + b"\0" * 20, "bad_archive")]:
        with pytest.raises(ArchiveRefused) as e:
            check(io.BytesIO(data), 1 << 30)
        assert e.value.code == code
    truncated = archive([("a", "file", "x" * 5000)]).getvalue()[:1500]
    with pytest.raises(ArchiveRefused) as e:
        check(io.BytesIO(truncated), 1 << 30)
    assert "truncated" in e.value.message
    with pytest.raises(ArchiveRefused) as e:
        check(archive([("a", "file", "x" * 100)]), 99)
    assert e.value.code == "too_large"
    assert kind_of(b"\x1f\x8b\x08") == "gzip"


def test_check_refuses_every_cut_of_an_archive_and_a_corrupt_gzip():
    import gzip as gzip_
    entries = [("d", "dir", None), ("d/a", "file", "a" * 700), ("d/b", "file", "b" * 1500),
               ("l", "symlink", "d/a")]
    plain = archive(entries).getvalue()
    packed = gzip_.compress(plain)
    assert check(io.BytesIO(plain), 1 << 20).entries == 4
    assert check(io.BytesIO(packed), 1 << 20).entries == 4
    # Cut at an entry's end (tarfile alone takes that for a whole archive),
    # or anywhere in the gzip stream: refused, whatever was whole before.
    end = plain.index(bytes(1024), 512)  # tar's end-of-archive blocks
    for data in [plain[:512 * n] for n in range(1, end // 512 + 1)] + [
            gzip_.compress(plain[:512 * n]) for n in (1, 3, 5, 7)] + [
            packed[:n] for n in range(3, len(packed))]:
        with pytest.raises(ArchiveRefused) as e:
            check(io.BytesIO(data), 1 << 20)
        assert e.value.code in ("bad_archive", "not_an_archive"), len(data)
    corrupt = bytearray(packed)
    corrupt[-8] ^= 0xFF  # the CRC
    for data, words in [(bytes(corrupt), "CRC check failed"),
                        (packed + b"junk" * 100, "Not a gzipped file"),
                        (plain[:2048] + b"x" * 512 + plain[2048:], "end-of-archive")]:
        with pytest.raises(ArchiveRefused) as e:
            check(io.BytesIO(data), 1 << 20)
        assert (e.value.code, words in e.value.message) == ("bad_archive", True), words


def _static_root(resource, depth=0):
    """
    The resource under the site's wrappers that holds its named children.
    """
    if b"api" in getattr(resource, "children", {}):
        return resource
    assert depth < 5, "no root with /api under the site's wrappers"
    for value in vars(resource).values():
        if hasattr(value, "getChildWithDefault"):
            found = _static_root(value, depth + 1)
            if found is not None:
                return found
    return None


def test_every_route_of_the_resource_tree_is_documented_and_no_other(authed):
    # With users, so that /login and /logout are in the tree.
    from capsule.web.api import ProfilesResource, SessionResource, SessionsResource
    from capsule.web.exec import ExecResource
    from capsule.web.upload import UploadResource
    site = authed.site
    root = _static_root(site.resource)
    documented = {}
    for path, method in ROUTES:
        documented.setdefault(path, set()).add(method.upper())
    served = {f"/{name.decode()}" for name in root.children} - {"/api"}
    served |= {f"/api/{name.decode()}" for name in root.children[b"api"].children}
    prefixes = {"/" + "/".join(p.split("/")[1:3]) if p.startswith("/api/") else p
                for p in documented}
    assert served - {"/api/export", "/api/sessions", "/api/snapshots"} <= set(documented)
    assert served <= prefixes | set(documented)
    # The admin API is mounted beside the tree (capsule.web.admin).
    assert {p for p in documented if not p.startswith("/api/admin")} - served == {
        "/api/export/{id}", "/api/sessions/{id}", "/api/sessions/{id}/exec",
        "/api/sessions/{id}/workspace", "/api/sessions/{id}/shares",
        "/api/sessions/{id}/shares/{share_id}", "/api/sessions/{id}/ports",
        "/api/sessions/{id}/ports/{port}", "/api/sessions/{id}/ports/{port}/shares",
        "/api/sessions/{id}/ports/{port}/shares/{share_id}", "/api/sessions/{id}/put-away",
        "/api/sessions/{id}/resume", "/api/sessions/{id}/fork", "/api/snapshots/{name}",
        "/api/snapshots/{name}/sessions"}
    sessions = root.children[b"api"].children[b"sessions"]
    one = sessions.getChild(b"00000000-0000-4000-8000-000000000000", None)
    from capsule.web.shares import ShareResource, SharesResource
    from capsule.web.ports import PortsResource
    from capsule.web.preview_api import PortResource, PortShareResource, PortSharesResource
    from capsule.web.keep_api import (ForkResource, PutAwayResource, ResumeResource,
                                      SnapshotResource, SnapshotSessionsResource,
                                      SnapshotsResource)
    assert {name: type(one.getChild(name, None))
            for name in (b"exec", b"workspace", b"shares", b"ports", b"put-away", b"resume",
                         b"fork")} == {
        b"exec": ExecResource, b"workspace": UploadResource, b"shares": SharesResource,
        b"ports": PortsResource, b"put-away": PutAwayResource, b"resume": ResumeResource,
        b"fork": ForkResource}
    snapshots = root.children[b"api"].children[b"snapshots"]
    named = snapshots.getChild(b"v1", None)
    assert (type(snapshots), type(named), type(named.getChild(b"sessions", None))) == (
        SnapshotsResource, SnapshotResource, SnapshotSessionsResource)
    from capsule.web.login import LoginResource, LogoutResource
    for path, cls in [("/login", LoginResource), ("/logout", LogoutResource)]:
        assert {m[len("render_"):] for m in vars(cls) if m.startswith("render_")} == (
            documented[path]), path
    for path, cls in [("/api/profiles", ProfilesResource),
                      ("/api/sessions", SessionsResource), ("/api/sessions/{id}", SessionResource),
                      ("/api/sessions/{id}/exec", ExecResource),
                      ("/api/sessions/{id}/workspace", UploadResource),
                      ("/api/sessions/{id}/shares", SharesResource),
                      ("/api/sessions/{id}/shares/{share_id}", ShareResource),
                      ("/api/sessions/{id}/ports", PortsResource),
                      ("/api/sessions/{id}/ports/{port}", PortResource),
                      ("/api/sessions/{id}/ports/{port}/shares", PortSharesResource),
                      ("/api/sessions/{id}/ports/{port}/shares/{share_id}",
                       PortShareResource),
                      ("/api/sessions/{id}/put-away", PutAwayResource),
                      ("/api/sessions/{id}/resume", ResumeResource),
                      ("/api/sessions/{id}/fork", ForkResource),
                      ("/api/snapshots", SnapshotsResource),
                      ("/api/snapshots/{name}", SnapshotResource),
                      ("/api/snapshots/{name}/sessions", SnapshotSessionsResource)]:
        assert {m.decode() for m in cls.methods} == documented[path], path


def test_check_refuses_an_extended_header_too_large_to_read():
    from capsule.core.tarcheck import MAX_HEADER
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("a")
        info.pax_headers = {"comment": "x" * (MAX_HEADER + 1)}
        tar.addfile(info, io.BytesIO(b""))
    out.seek(0)
    with pytest.raises(ArchiveRefused) as e:
        check(out, 1 << 30)
    assert "extended header" in e.value.message
    long_name = "d/" * 600 + "f"
    summary = check(archive([(long_name, "file", "x")]), 1 << 30)
    assert summary.files == 1


def _mutated_archives():
    from hypothesis import strategies as st
    base = archive([("d/", "dir", None), ("d/a", "file", "hello" * 50), ("l", "symlink", "d/a"),
                    ("h", "hardlink", "d/a")]).getvalue()
    return st.builds(
        lambda edits, cut, gzip_it: _apply(base, edits, cut, gzip_it),
        st.lists(st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255)), max_size=20),
        st.integers(0, len(base)), st.booleans())


def _apply(base: bytes, edits, cut: int, gzip_it: bool) -> bytes:
    """
    C{base} with bytes changed and cut off; when gzipped, the compressed
    bytes are the ones changed.
    """
    import gzip
    data = bytearray(gzip.compress(base) if gzip_it else base)
    for at, value in edits:
        data[max(2, at % len(data))] = value
    return bytes(data[:max(cut, 3)] if cut else data)


def test_check_of_any_mutated_archive_refuses_or_accepts_never_raises_else():
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_mutated_archives())
    def run(data):
        try:
            summary = check(io.BytesIO(data), 1 << 20)
        except ArchiveRefused:
            return
        out = io.BytesIO()
        assert rewrite(io.BytesIO(data), out.write) == summary.entries
        out.seek(0)
        with tarfile.open(fileobj=out) as tar:
            for member in tar:
                assert not member.name.startswith("/") and ".." not in member.name.split("/")
                assert member.uid == 1000 and member.mode & 0o7000 == 0
    run()


def test_check_bounds_entries_and_names(monkeypatch):
    from capsule.core import tarcheck
    monkeypatch.setattr(tarcheck, "MAX_ENTRIES", 3)
    with pytest.raises(ArchiveRefused) as e:
        check(archive([(f"f{i}", "file", "") for i in range(4)]), 1 << 30)
    assert e.value.code == "too_many_entries"
    assert check(archive([(f"f{i}", "file", "") for i in range(3)]), 1 << 30).entries == 3
    monkeypatch.setattr(tarcheck, "MAX_NAMES_BYTES", 100)
    with pytest.raises(ArchiveRefused) as e:
        check(archive([("a" * 60, "file", ""), ("b" * 60, "file", "")]), 1 << 30)
    assert e.value.code == "too_many_entries"
    monkeypatch.undo()
    assert refusal([("x" * 256, "file", "")]).entry == "x" * 200
    assert refusal([("d/" * 2100, "dir", None)]).entry.startswith("d/d/")


def test_with_users_an_upload_body_without_credentials_is_refused_before_it_is_read(authed):
    session = authed.create(token=ALICE)
    path = f"/api/sessions/{session['id']}/workspace"
    big = 10 * 1024 * 1024

    def head_only(cookie=None, token=None):
        # Headers only: whether capsule answers before the body comes.
        channel = authed.site.buildProtocol(None)
        transport = StringTransport(peerAddress=PEER)
        channel.makeConnection(transport)
        lines = [f"POST {path} HTTP/1.1", "Host: capsule", "Content-Type: application/x-tar",
                 f"Content-Length: {big}"]
        if cookie is not None:
            lines.append(f"Cookie: capsule_session={cookie}")
        if token is not None:
            lines.append(f"Authorization: Bearer {token}")
        channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode())
        opened.append(channel)
        return transport.value()

    opened = []

    logins = authed.factory.authenticator.logins
    # The credentials are checked, and the session's owner, from the
    # headers: no body is read for a caller who may not send it.
    refused = [(head_only(), 401, "unauthenticated"),
               (head_only(cookie="nonsense"), 401, "unauthenticated"),
               (head_only(token="wrong"), 401, "unauthenticated"),
               (head_only(cookie=logins.new("bob")), 404, "session_not_found"),
               (head_only(token=BOB), 404, "session_not_found")]
    for answer, status, code in refused:
        got, headers, body = parse_response(answer)
        assert (got, body["code"]) == (status, code)
        assert headers["connection"] == "close"
    # The owner's credentials: the body is awaited, in the session's one
    # upload slot, taken then; until it is free, another upload's headers
    # get a 429.
    assert head_only(token=ALICE) == b""
    assert authed.site.session_api.uploads == {session["id"]: 1}
    status, _, body = parse_response(head_only(cookie=logins.new("alice")))
    assert (status, body["code"]) == (429, "upload_in_progress")
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure
    for channel in opened:
        channel.connectionLost(Failure(ConnectionLost()))
    assert authed.site.session_api.uploads == {}
    assert head_only(cookie=logins.new("alice")) == b""


def test_uploads_at_once_are_bounded(api):
    from capsule.web.upload import UPLOADS_AT_ONCE
    sessions = [api.create()["id"] for _ in range(UPLOADS_AT_ONCE + 1)]
    uploads = api.site.session_api.uploads
    uploads[sessions[0]] = 1
    status, _, body = api.request(f"/api/sessions/{sessions[0]}/workspace", "POST", b"x",
                                  content_type="application/x-tar")
    assert (status, body["code"]) == (429, "upload_in_progress")
    uploads.update({s: 1 for s in sessions[1:UPLOADS_AT_ONCE]})
    status, _, body = api.request(f"/api/sessions/{sessions[-1]}/workspace", "POST", b"x",
                                  content_type="application/x-tar")
    assert (status, body["code"]) == (429, "too_many_uploads")


def _zeros_tar_gz(size: int) -> io.BytesIO:
    import gzip as gz
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("zeros")
        info.size = size
        tar.addfile(info, io.BytesIO(bytes(size)))
    return io.BytesIO(gz.compress(plain.getvalue(), 9))


def test_check_refuses_a_gzip_that_expands_too_much_while_it_reads():
    from capsule.core import tarcheck
    bomb = _zeros_tar_gz(64 * 1024 * 1024)
    assert len(bomb.getvalue()) < 100_000
    read = []

    class Counting(io.BytesIO):
        def read(self, size=-1):
            data = super().read(size)
            read.append(len(data))
            return data
    with pytest.raises(ArchiveRefused) as e:
        check(Counting(bomb.getvalue()), 1 << 40)
    assert e.value.code == "expands_too_much"
    assert str(tarcheck.MAX_EXPANSION) in e.value.message
    # Refused while it read: long before the end of what it unpacks to.
    assert e.value.entry == "zeros"
    # A plain tar, and a gzip that compresses as archives do, are fine.
    assert check(_zeros_tar_gz(256 * 1024), 1 << 30).size == 256 * 1024
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as tar:
        info = tarfile.TarInfo("zeros")
        info.size = 8 * 1024 * 1024
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    plain.seek(0)
    assert check(plain, 1 << 30).size == 8 * 1024 * 1024
# -- exports and the Docker call gate (issue 19, item 4) ----------------------------


def test_execs_and_uploads_are_refused_while_an_export_reads_the_session(api):
    session = api.create()
    exports = api.site.exports
    exports._reading[session["id"]] = 1
    assert exports.exporting(session["id"])
    status, _, body = api.request(f"/api/sessions/{session['id']}/exec", "POST",
                                  {"argv": ["true"]})
    assert (status, body["code"]) == (409, "export_in_progress")
    assert body["error"] == (f"the workspace of session {session['id']} is being exported:"
                             " Docker holds its container until the export has read it; try"
                             " again once the export is done")
    status, _, body = api.request(f"/api/sessions/{session['id']}/workspace", "POST",
                                  b"", content_type="application/x-tar")
    assert (status, body["code"]) == (409, "export_in_progress")
    assert api.docker.commands_run == []
    del exports._reading[session["id"]]
    status, _, body = api.request(f"/api/sessions/{session['id']}/exec", "POST",
                                  {"argv": ["true"]})
    assert status == 200


def test_a_caller_over_its_docker_calls_waits_then_is_refused(api):
    from capsule.sessions.call_gate import CallGate
    session_api = api.site.session_api
    session_api.docker_calls = gate = CallGate(limit=1, waiting=1)
    # Another place holds the caller's one call (a call Docker keeps waiting).
    held = []
    gate.enter("127.0.0.1").addCallback(held.append)
    session = api.create()
    path = f"/api/sessions/{session['id']}/exec"
    waiting = api.send(path, "POST", b'{"argv": ["true"]}')
    assert gate.queued("127.0.0.1") == 1 and waiting.value() == b""
    status, headers, body = api.request(path, "POST", {"argv": ["true"]})
    assert (status, body["code"]) == (429, "too_many_docker_calls")
    assert body["error"] == ("127.0.0.1 has 1 Docker calls under way and 1 waiting (the most"
                             " it may): try again shortly")
    assert headers["Retry-After"] == "5"
    # Another caller is not held.
    assert gate.enter("127.0.0.9").called
    held[0].release()
    assert parse_response(waiting.value())[0] == 200
    assert (gate.under_way("127.0.0.1"), gate.queued("127.0.0.1")) == (0, 0)


def test_a_running_command_holds_no_docker_call(api):
    from twisted.internet.defer import Deferred
    from capsule.sessions.call_gate import CallGate
    session_api = api.site.session_api
    session_api.docker_calls = gate = CallGate(limit=1, waiting=0)
    session = api.create()
    held = []
    api.docker.commands[tuple(timed_argv(["slow"], 60))] = (
        lambda stdin: held.append(Deferred()) or held[-1])
    path = f"/api/sessions/{session['id']}/exec"
    pending = [api.send(path, "POST", b'{"argv": ["slow"]}') for _ in range(2)]
    # Both run: each gave its place up once its exec was made.
    assert len(held) == 2 and gate.under_way("127.0.0.1") == 0
    for d in held:
        d.callback((b"done", b"", 0))
    assert [parse_response(t.value())[2]["stdout"] for t in pending] == ["done", "done"]


# -- share links --------------------------------------------------------------------------

def test_the_owner_makes_lists_and_revokes_share_links(authed):
    session = authed.create(token=ALICE)
    path = f"/api/sessions/{session['id']}/shares"
    status, _, made = authed.request(path, "POST", {"ttl": 600}, token=ALICE)
    assert status == 201 and made["expires_in"] == 600 and made["read_only"] is True
    assert made["url"] == "https://capsule.example/watch/#" + made["token"]
    status, _, default = authed.request(path, "POST", token=ALICE)
    assert status == 201 and default["expires_in"] == 3600
    status, _, listed = authed.request(path, token=ALICE)
    assert status == 200 and listed["watchers"] == 0
    assert [s["id"] for s in listed["shares"]] == [made["id"], default["id"]]
    assert all("token" not in s for s in listed["shares"])
    assert made["token"] not in json.dumps(listed)
    status, _, body = authed.request(f"{path}/{made['id']}/more", "DELETE", token=ALICE)
    assert (status, body["code"]) == (404, "not_found")
    status, _, body = authed.request(f"{path}/{made['id']}", "DELETE", token=ALICE)
    assert (status, body) == (200, {"id": made["id"], "revoked": True})
    assert authed.spectators.store.find(made["token"]) is None
    status, _, body = authed.request(f"{path}/{made['id']}", "DELETE", token=ALICE)
    assert (status, body["code"]) == (404, "share_not_found")


def test_only_the_owner_reaches_a_session_s_share_links(authed):
    session = authed.create(token=ALICE)
    path = f"/api/sessions/{session['id']}/shares"
    _, _, made = authed.request(path, "POST", token=ALICE)
    for method, where in [("POST", path), ("GET", path), ("DELETE", f"{path}/{made['id']}")]:
        status, _, body = authed.request(where, method, token=BOB)
        assert (status, body["code"]) == (404, "session_not_found"), (method, where)
        status, _, body = authed.request(where, method)
        assert status == 401, (method, where)
    assert authed.spectators.store.find(made["token"]) is not None


def test_a_share_link_s_lifetime_is_bounded_and_checked(authed):
    session = authed.create(token=ALICE)
    path = f"/api/sessions/{session['id']}/shares"
    for body in ({"ttl": 7201}, {"ttl": 0}, {"ttl": "1h"}, {"ttl": True}, {"other": 1}):
        status, _, answer = authed.request(path, "POST", body, token=ALICE)
        assert (status, answer["code"]) == (400, "bad_request"), body


def test_share_links_die_with_their_session(authed):
    session = authed.create(token=ALICE)
    path = f"/api/sessions/{session['id']}/shares"
    _, _, made = authed.request(path, "POST", token=ALICE)
    authed.request(f"/api/sessions/{session['id']}", "DELETE", token=ALICE)
    assert authed.spectators.store.find(made["token"]) is None
    status, _, _ = authed.request(path, token=ALICE)
    assert status == 404


def test_the_spectators_page_needs_no_login_and_reaches_nothing_else(authed):
    # Files are sent by the global cooperator (see test_web); what is not a
    # file of the page is answered at once: a 404, never a 401, never the API.
    def get(path):
        return answered(authed.send(path), "GET", f"GET {path}", clock=authed.reactor)
    assert get("/missing.js").status == 401
    assert get("/watch/missing.js").status == 404
    session = authed.create(token=ALICE)
    for path in ("/watch/api/sessions", f"/watch/api/sessions/{session['id']}",
                 "/watch/ws", "/watch/watch/x"):
        response = get(path)
        assert response.status == 404 and session["id"].encode() not in response.body, path
