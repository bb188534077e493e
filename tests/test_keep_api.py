"""
Kept sessions and snapshots in the session API, in memory: the real Site
over a StringTransport, the fake engine, and a keeping in memory
(L{tests.support.fake_keeping}): routes, ownership (another user's session
or snapshot is a 404 like a missing one), errors, body limits, the disk
copies' limits, the export of a kept session, the admin API.
"""

import json

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from capsule.auth.gate import Authenticator
from capsule.core.admission import AdmissionControl, AdmissionPolicy
from capsule.core.spec import ContainerSpec
from capsule.sessions.manager import SessionManager
from capsule.sessions.session import SessionConfig
from capsule.web.http import ClientAddresses
from tests.support.fake_keeping import FakeKeeping
from tests.support.fakes import FakeDockerAPI
from tests.support.httpclient import answered, send

ALICE, BOB = "a" * 32, "b" * 32
PEER = IPv4Address("TCP", "127.0.0.1", 40000)
KEPT_ID = "6f9619ff-8b86-4011-b42d-00c04fc964ff"
MISSING = "00000000-0000-4000-8000-000000000000"


class Api:
    def __init__(self, www, authenticator=None, policy=None, admin_token=None) -> None:
        from capsule.web.site import make_site
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_800_000_000)
        # The fake engine streams an export on the calling thread.
        self.reactor.callFromThread = lambda f, *args, **kwargs: f(*args, **kwargs)
        self.docker = FakeDockerAPI()
        self.manager = SessionManager(self.docker, self.reactor, SessionConfig(
            spec=ContainerSpec(image="capsule-runtime:latest"), instance="keep-test"))
        self.keeping = FakeKeeping(self.manager, self.docker, self.reactor)
        self.admission = None if policy is None else AdmissionControl(
            self.manager, self.reactor, policy)
        self.site = make_site(self.manager, self.docker, self.reactor, str(www),
                              authenticator=authenticator, admission=self.admission,
                              keeping=self.keeping, admin_token=admin_token)

    def send(self, path, method="GET", body=None, token=None, headers=()) -> StringTransport:
        headers = list(headers)
        if token is not None:
            headers.append(("Authorization", f"Bearer {token}"))
        if body is not None:
            headers += [("Content-Type", "application/json"), ("Content-Length", len(body))]
        return send(self.site, method, path, headers, body, peer=PEER)

    def request(self, path, method="GET", body=None, **kwargs):
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        response = answered(self.send(path, method, body, **kwargs), method,
                            f"{method} {path}", clock=self.reactor)
        return response.status, response.headers, response.json()

    def create(self, **kwargs) -> str:
        status, _, body = self.request("/api/sessions", "POST", {}, **kwargs)
        assert status == 201, body
        return body["id"]


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
                                  tokens=str(tokens)))


# -- listing, reading, deleting -----------------------------------------------------------

def test_the_list_holds_live_and_kept_sessions_with_their_state(api):
    live = api.create()
    kept = api.keeping.add(KEPT_ID)
    status, _, body = api.request("/api/sessions")
    assert status == 200
    assert [(s["id"], s["state"]) for s in body["sessions"]] == [
        (live, "detached"), (KEPT_ID, "kept")]
    entry = body["sessions"][1]
    assert entry == {**kept.describe(api.reactor.seconds()), "status": "kept",
                     "client_attached": False, "url": f"/?session_id={KEPT_ID}", "user": None}
    assert entry["kept_until"] == kept.kept_at + kept.retention


def test_a_kept_session_is_read_and_deleted_like_a_live_one(api):
    api.keeping.add(KEPT_ID)
    status, _, body = api.request(f"/api/sessions/{KEPT_ID}")
    assert (status, body["id"], body["state"], body["reason"]) == (200, KEPT_ID, "kept",
                                                                   "put_away")
    status, _, body = api.request(f"/api/sessions/{KEPT_ID}", "DELETE")
    assert (status, body) == (200, {"id": KEPT_ID, "ended": True, "deleted": True})
    assert api.keeping.calls == [("delete", KEPT_ID, None)]
    for method in ("GET", "DELETE"):
        status, _, body = api.request(f"/api/sessions/{KEPT_ID}", method)
        assert (status, body["code"]) == (404, "session_not_found")


def test_another_users_kept_session_is_a_404_exactly_like_a_missing_one(authed):
    authed.keeping.add(KEPT_ID, user="alice")
    assert [s["id"] for s in authed.request("/api/sessions", token=ALICE)[2]["sessions"]] == [
        KEPT_ID]
    assert authed.request("/api/sessions", token=BOB)[2]["sessions"] == []
    for method, suffix in [("GET", ""), ("DELETE", ""), ("POST", "/resume"),
                           ("POST", "/fork"), ("POST", "/put-away")]:
        theirs = authed.request(f"/api/sessions/{KEPT_ID}{suffix}", method, token=BOB)
        missing = authed.request(f"/api/sessions/{MISSING}{suffix}", method, token=BOB)
        assert theirs[0] == missing[0] == 404, (method, suffix)
        assert theirs[2]["code"] == missing[2]["code"] == "session_not_found"
        assert theirs[2]["error"].replace(KEPT_ID, "X") == missing[2]["error"].replace(
            MISSING, "X")
    assert (authed.request(f"/api/export/{KEPT_ID}", token=BOB)[0],
            authed.request(f"/api/export/{MISSING}", token=BOB)[0]) == (404, 404)
    assert KEPT_ID in authed.keeping.kept_sessions
    assert [c[0] for c in authed.keeping.calls] == []


def test_the_keepings_routes_need_a_user_when_there_are_users(authed):
    authed.keeping.add(KEPT_ID, user="alice")
    for method, path in [("GET", f"/api/sessions/{KEPT_ID}"),
                         ("POST", f"/api/sessions/{KEPT_ID}/resume"),
                         ("GET", "/api/snapshots"), ("POST", "/api/snapshots/x/sessions")]:
        status, _, body = authed.request(path, method)
        assert (status, body["code"]) == (401, "unauthenticated"), (method, path)


# -- put away, resume --------------------------------------------------------------------

def test_put_away_keeps_a_live_session_and_lists_it_kept(api):
    session_id = api.create()
    status, _, body = api.request(f"/api/sessions/{session_id}/put-away", "POST")
    assert (status, body["id"], body["state"]) == (200, session_id, "kept")
    assert api.keeping.calls == [("put_away", session_id, "put_away")]
    assert session_id not in api.manager.sessions
    assert [s["state"] for s in api.request("/api/sessions")[2]["sessions"]] == ["kept"]
    # Again: it is kept already, and says so.
    status, _, body = api.request(f"/api/sessions/{session_id}/put-away", "POST")
    assert (status, body["state"]) == (200, "kept")
    assert len(api.keeping.calls) == 1


def test_put_away_refuses_a_session_whose_profile_keeps_nothing(www):
    api = Api(www)
    api.keeping.retention = 0
    session_id = api.create()
    status, _, body = api.request(f"/api/sessions/{session_id}/put-away", "POST")
    assert (status, body["code"]) == (409, "not_kept")
    assert "retention is 0" in body["error"]
    assert session_id in api.manager.sessions and api.keeping.calls == []


def test_put_away_of_a_starting_session_is_a_409(api):
    api.docker.hold_create = True
    api.send("/api/sessions", "POST", b"{}")
    [session] = api.manager.sessions.values()
    status, _, body = api.request(f"/api/sessions/{session.id}/put-away", "POST")
    assert (status, body["code"]) == (409, "starting")


def test_resume_makes_the_kept_session_live_under_its_id(api):
    api.keeping.add(KEPT_ID)
    status, _, body = api.request(f"/api/sessions/{KEPT_ID}/resume", "POST")
    assert status == 200, body
    assert (body["id"], body["url"]) == (KEPT_ID, f"/?session_id={KEPT_ID}")
    assert KEPT_ID in api.manager.sessions and KEPT_ID not in api.keeping.kept_sessions
    # A live session resumed again answers as it is.
    status, _, again = api.request(f"/api/sessions/{KEPT_ID}/resume", "POST")
    assert (status, again["id"]) == (200, KEPT_ID)
    assert [c[0] for c in api.keeping.calls] == ["resume"]


def test_resume_passes_drain_and_admission(www):
    api = Api(www, policy=AdmissionPolicy(max_sessions=1, max_per_client=5, rate=None))
    api.keeping.add(KEPT_ID)
    api.create()
    status, headers, body = api.request(f"/api/sessions/{KEPT_ID}/resume", "POST")
    assert (status, body["code"], headers["retry-after"]) == (503, "server_full", "5")
    assert KEPT_ID in api.keeping.kept_sessions and api.keeping.calls == []


def test_resume_while_draining_is_refused(api):
    api.keeping.add(KEPT_ID)
    api.site.drain.start(None)
    status, _, body = api.request(f"/api/sessions/{KEPT_ID}/resume", "POST")
    assert (status, body["code"]) == (503, "draining")
    assert KEPT_ID in api.keeping.kept_sessions


# -- fork ------------------------------------------------------------------------------

def test_fork_of_a_live_and_of_a_kept_session_answers_the_new_one(api):
    source = api.create()
    status, _, body = api.request(f"/api/sessions/{source}/fork", "POST")
    assert status == 201, body
    assert body["id"] != source and body["id"] in api.manager.sessions
    assert body["url"] == f"/?session_id={body['id']}"
    api.keeping.add(KEPT_ID)
    status, _, body = api.request(f"/api/sessions/{KEPT_ID}/fork", "POST")
    assert status == 201 and body["id"] in api.manager.sessions
    assert [c[0] for c in api.keeping.calls] == ["fork", "fork"]


def test_one_copy_at_a_time_per_user_the_next_is_a_429_with_retry_after(authed):
    mine = authed.create(token=ALICE)
    second = authed.create(token=ALICE)
    theirs = authed.create(token=BOB)
    authed.keeping.hold_copies()
    first = authed.send(f"/api/sessions/{mine}/fork", "POST", token=ALICE)
    status, headers, body = authed.request(f"/api/sessions/{second}/fork", "POST",
                                           token=ALICE)
    assert (status, body["code"], headers["retry-after"]) == (429, "copy_in_progress", "5")
    status, headers, body = authed.request("/api/snapshots", "POST",
                                           {"session": second, "name": "s1"}, token=ALICE)
    assert (status, body["code"]) == (429, "copy_in_progress")
    # The same session meanwhile: busy.
    status, _, body = authed.request(f"/api/sessions/{mine}/put-away", "POST", token=ALICE)
    assert (status, body["code"]) == (409, "busy")
    # Another user is not held up by alice's copy.
    bob = authed.send(f"/api/sessions/{theirs}/fork", "POST", token=BOB)
    authed.keeping.release_copies()
    for transport in (first, bob):
        response = answered(transport, "POST", "fork", clock=authed.reactor)
        assert response.status == 201
    # Done: the next one goes.
    status, _, body = authed.request(f"/api/sessions/{second}/fork", "POST", token=ALICE)
    assert status == 201, body


def test_copies_in_all_are_bounded(www, monkeypatch):
    from capsule.web import keep_api
    monkeypatch.setattr(keep_api, "COPIES_AT_ONCE", 1)
    api = Api(www)
    one, two = api.create(), api.create()
    api.keeping.hold_copies()
    # Without users, the caller is its address: another address is another caller.
    api.site.session_api.keep.copies["192.0.2.1"] = 1
    status, headers, body = api.request(f"/api/sessions/{one}/fork", "POST")
    assert (status, body["code"], headers["retry-after"]) == (503, "copies_busy", "5")
    assert api.keeping.calls == [] and two in api.manager.sessions


def test_fork_passes_admission(www):
    api = Api(www, policy=AdmissionPolicy(max_sessions=1, max_per_client=5, rate=None))
    source = api.create()
    status, _, body = api.request(f"/api/sessions/{source}/fork", "POST")
    assert (status, body["code"]) == (503, "server_full")
    assert api.keeping.calls == [] and api.site.session_api.keep.copies == {}


# -- snapshots ------------------------------------------------------------------------

def test_snapshots_are_made_listed_started_and_deleted(api):
    source = api.create()
    status, _, body = api.request("/api/snapshots", "POST", {"session": source, "name": "v1"})
    assert (status, body) == (201, {"name": "v1", "created": api.reactor.seconds(),
                                    "size": 1234, "profile": "shell"})
    status, _, body = api.request("/api/snapshots")
    assert (status, [s["name"] for s in body["snapshots"]]) == (200, ["v1"])
    status, _, body = api.request("/api/snapshots", "POST", {"session": source, "name": "v1"})
    assert (status, body["code"]) == (409, "snapshot_exists")
    status, _, body = api.request("/api/snapshots/v1/sessions", "POST")
    assert status == 201 and body["id"] in api.manager.sessions and body["id"] != source
    status, _, body = api.request("/api/snapshots/v1", "DELETE")
    assert (status, body) == (200, {"name": "v1", "deleted": True})
    for method, path in [("DELETE", "/api/snapshots/v1"),
                         ("POST", "/api/snapshots/v1/sessions")]:
        status, _, body = api.request(path, method)
        assert (status, body["code"]) == (404, "snapshot_not_found"), (method, path)


def test_snapshot_bodies_are_checked(api):
    source = api.create()
    for body in [{"session": source}, {"session": source, "name": "Bad Name"},
                 {"session": source, "name": "x" * 64}, {"session": "nope", "name": "a"},
                 {"session": 7, "name": "a"}, {"name": "a"},
                 {"session": source, "name": "a", "more": 1}]:
        status, _, answer = api.request("/api/snapshots", "POST", body)
        assert (status, answer["code"]) == (400, "bad_request"), body
    status, _, answer = api.request("/api/snapshots", "POST", {"session": MISSING, "name": "a"})
    assert (status, answer["code"]) == (404, "session_not_found")
    assert api.keeping.calls == []


def test_the_snapshot_limit_is_a_409_kept_limit(api):
    api.keeping.max_snapshots = 1
    source = api.create()
    assert api.request("/api/snapshots", "POST", {"session": source, "name": "a"})[0] == 201
    status, _, body = api.request("/api/snapshots", "POST", {"session": source, "name": "b"})
    assert (status, body["code"]) == (409, "kept_limit")


def test_another_users_snapshot_is_a_404_like_a_missing_one(authed):
    source = authed.create(token=ALICE)
    assert authed.request("/api/snapshots", "POST", {"session": source, "name": "v1"},
                          token=ALICE)[0] == 201
    assert authed.request("/api/snapshots", token=BOB)[2]["snapshots"] == []
    for method, path in [("DELETE", "/api/snapshots/v1"),
                         ("POST", "/api/snapshots/v1/sessions")]:
        theirs = authed.request(path, method, token=BOB)
        missing = authed.request(path.replace("v1", "v2"), method, token=BOB)
        assert theirs[0] == missing[0] == 404
        assert theirs[2]["error"].replace("v1", "X") == missing[2]["error"].replace("v2", "X")
    # Nor may bob snapshot alice's session.
    status, _, body = authed.request("/api/snapshots", "POST",
                                     {"session": source, "name": "mine"}, token=BOB)
    assert (status, body["code"]) == (404, "session_not_found")
    assert [c[0] for c in authed.keeping.calls] == ["snapshot"]


def test_engine_work_counts_among_the_callers_docker_calls(api):
    from twisted.internet.defer import Deferred
    held = []

    def listing(user):
        held.append(Deferred())
        return held[-1]
    api.keeping.snapshots = listing
    gate = api.site.session_api.docker_calls
    waiting = [api.send("/api/snapshots") for _ in range(gate.limit + gate.waiting)]
    status, headers, body = api.request("/api/snapshots")
    assert (status, body["code"], headers["retry-after"]) == (429, "too_many_docker_calls",
                                                              "5")
    while held:
        held.pop(0).callback([])
    for transport in waiting:
        assert answered(transport, "GET", "listing", clock=api.reactor).status == 200


# -- bodies, methods -----------------------------------------------------------------

def test_bodies_of_the_keepings_routes_are_bounded(api):
    source = api.create()
    for path in (f"/api/sessions/{source}/fork", "/api/snapshots",
                 "/api/snapshots/v1/sessions"):
        status, _, body = api.request(path, "POST", b"{" + b" " * 5000 + b"}")
        assert (status, body["code"], body["limit"]) == (413, "body_too_large", 4096), path
    assert api.keeping.calls == []


def test_unknown_methods_and_names_are_json(api):
    source = api.create()
    for path, allow in [(f"/api/sessions/{source}/fork", "POST"),
                        (f"/api/sessions/{source}/resume", "POST"),
                        (f"/api/sessions/{source}/put-away", "POST"),
                        ("/api/snapshots", "GET, POST"), ("/api/snapshots/v1", "DELETE"),
                        ("/api/snapshots/v1/sessions", "POST")]:
        status, headers, body = api.request(path, "PUT", {})
        assert (status, headers["allow"], body["code"]) == (405, allow, "method_not_allowed")
    status, _, body = api.request("/api/snapshots/Not..A..Name")
    assert (status, body["code"]) == (404, "not_found")


def test_without_a_keeping_nothing_is_kept_and_the_routes_say_so(www):
    api = Api(www)
    api.site.session_api.keep.keeping = None
    source = api.create()
    status, _, body = api.request(f"/api/sessions/{source}/put-away", "POST")
    assert (status, body["code"]) == (409, "not_kept")
    assert api.request(f"/api/sessions/{MISSING}/resume", "POST")[0] == 404
    assert api.request("/api/snapshots")[2]["snapshots"] == []
    assert [s["state"] for s in api.request("/api/sessions")[2]["sessions"]] == ["detached"]


# -- export, admin ------------------------------------------------------------------

def test_a_kept_sessions_workspace_exports_for_its_owner_only(authed):
    kept = authed.keeping.add(KEPT_ID, user="alice")
    authed.docker.add_file(kept.container_id, "/workspace/notes.txt", b"kept work")
    response = answered(authed.send(f"/api/export/{KEPT_ID}", token=ALICE), "GET", "export",
                        clock=authed.reactor)
    assert response.status == 200, response.body[:200]
    assert response.headers["content-type"] == "application/gzip"
    import gzip
    import io
    import tarfile
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(response.body))) as tar:
        assert any(name.endswith("notes.txt") for name in tar.getnames())
    status, _, body = authed.request(f"/api/export/{KEPT_ID}", token=BOB)
    assert (status, body["code"]) == (404, "session_not_found")


def test_the_admin_api_lists_kept_sessions(www):
    api = Api(www, admin_token="t" * 32)
    api.create()
    api.keeping.add(KEPT_ID, user="carol")
    status, _, body = api.request("/api/admin/sessions", token="t" * 32)
    assert status == 200
    assert len(body["sessions"]) == 1
    [kept] = body["kept"]
    assert (kept["id"], kept["owner"], kept["state"]) == (KEPT_ID, "carol", "kept")
    assert kept["container"] == f"kept-{KEPT_ID[:8]}"
