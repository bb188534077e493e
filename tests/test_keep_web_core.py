"""
The API and the WebSocket of kept sessions against the real keeping
(capsule.sessions.keeping, the manager's) over the in-memory engine: what
the web asks of the keeping is what it does.  A page attached to a session
put away hears why (an exit without an exit code) and finds it kept through
the API; put away, listed, refused on reconnect, resumed with resumed_from,
forked, snapshotted, deleted.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet.testing import MemoryReactorClock

from capsule.core.spec import ContainerSpec
from capsule.sessions.keeping import KeepingConfig
from capsule.sessions.manager import SessionManager
from capsule.sessions.session import SessionConfig
from tests.support.fakes import FakeDockerAPI
from tests.support.httpclient import answered, send

from .in_memory import CLIENT_ADDRESS, Link, SERVER_ADDRESS  # noqa: F401

DAY = 86400.0


class Site:
    def __init__(self, www, retention: float = 7 * DAY) -> None:
        from capsule.web.site import make_site
        import txaio
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_800_000_000)
        txaio.config.loop = self.reactor
        self.docker = FakeDockerAPI()
        self.manager = SessionManager(
            self.docker, self.reactor,
            SessionConfig(spec=ContainerSpec(image="capsule-runtime:latest"), instance="kw",
                          grace=60, replay_bytes=4096),
            keeping=KeepingConfig(retention=retention))
        self.site = make_site(self.manager, self.docker, self.reactor, str(www))
        self.factory = self.site.websocket_factory

    def request(self, path, method="GET", body=None):
        headers = []
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers = [("Content-Type", "application/json"), ("Content-Length", len(data))]
        response = answered(send(self.site, method, path, headers, data), method, path,
                            clock=self.reactor)
        return response.status, response.json()

    def connect(self, query: str = "", binary: bool = False) -> Link:
        return Link(self.reactor, self.factory, query, binary)


@pytest.fixture
def web(tmp_path):
    (tmp_path / "index.html").write_text("<html></html>")
    import txaio
    previous = txaio.config.loop
    yield Site(tmp_path)
    txaio.config.loop = previous


def attached(web, binary=False):
    link = web.connect(binary=binary)
    link.send({"type": "resize", "cols": 80, "rows": 24})
    [connected] = [m for m in link.new() if isinstance(m, dict) and m["type"] == "connected"]
    web.docker.processes[-1].emit(b"$ echo hi\r\nhi\r\n$ ")
    link.flush()
    link.new()
    return link, connected["session_id"]


@pytest.mark.parametrize("binary", [False, True])
def test_a_page_attached_to_a_session_put_away_hears_why_then_finds_it_kept(web, binary):
    link, session_id = attached(web, binary)
    status, body = web.request(f"/api/sessions/{session_id}/put-away", "POST")
    assert (status, body["state"], body["reason"]) == (200, "kept", "put_away")
    link.flush()
    [end] = [m for m in link.new() if isinstance(m, dict)]
    # An exit without an exit code: the page asks the API, which lists it kept.
    assert end["type"] == "exit" and end["exit_code"] is None
    assert "kept until" in end["message"]
    assert link.client.closed[1] == 1000
    assert web.request(f"/api/sessions/{session_id}")[1]["state"] == "kept"


def test_put_away_list_reconnect_resume_over_the_real_keeping(web):
    link, session_id = attached(web)
    kept = web.request(f"/api/sessions/{session_id}/put-away", "POST")[1]
    assert [(s["id"], s["state"]) for s in web.request("/api/sessions")[1]["sessions"]] == [
        (session_id, "kept")]
    again = web.connect(f"session_id={session_id}")
    [error] = again.new()
    assert (error["code"], error["kept_at"], error["kept_until"]) == (
        "session_kept", kept["kept_at"], kept["kept_until"])
    assert again.client.closed[1] == 4404
    resumed = web.connect(f"session_id={session_id}&resume=1&cols=80&rows=24")
    messages = [m for m in resumed.new() if isinstance(m, dict)]
    assert messages[0]["type"] == "connected" and messages[0]["session_id"] == session_id
    assert messages[0]["resumed_from"] == kept["kept_at"]
    assert messages[0]["on_close"]["outcome"] == "kept"
    assert messages[1]["code"] == "resumed"
    assert web.manager.sessions[session_id].client is resumed.server
    assert web.request(f"/api/sessions/{session_id}")[1]["state"] == "running"


def test_resume_fork_snapshot_delete_through_the_api_over_the_real_keeping(web):
    link, session_id = attached(web)
    link.close()
    assert web.request(f"/api/sessions/{session_id}/put-away", "POST")[0] == 200
    status, fork = web.request(f"/api/sessions/{session_id}/fork", "POST")
    assert status == 201, fork
    assert fork["id"] != session_id and fork["id"] in web.manager.sessions
    status, snapshot = web.request("/api/snapshots", "POST",
                                   {"session": session_id, "name": "v1"})
    assert (status, snapshot["name"]) == (201, "v1"), snapshot
    assert web.request("/api/snapshots", "POST",
                       {"session": session_id, "name": "v1"})[1]["code"] == "snapshot_exists"
    status, started = web.request("/api/snapshots/v1/sessions", "POST")
    assert status == 201, started
    assert web.request("/api/snapshots/v1", "DELETE") == (200, {"name": "v1",
                                                                "deleted": True})
    status, body = web.request(f"/api/sessions/{session_id}/resume", "POST")
    assert (status, body["id"]) == (200, session_id), body
    assert session_id in web.manager.sessions
    assert web.request(f"/api/sessions/{session_id}/put-away", "POST")[0] == 200
    assert web.request(f"/api/sessions/{session_id}", "DELETE")[1]["deleted"] is True
    assert web.request(f"/api/sessions/{session_id}")[0] == 404
    assert web.manager.keeping.find(session_id, None) is None


def test_put_away_where_nothing_is_kept_is_a_409_not_kept(tmp_path):
    (tmp_path / "index.html").write_text("<html></html>")
    import txaio
    previous = txaio.config.loop
    try:
        web = Site(tmp_path, retention=0)
        link, session_id = attached(web)
        status, body = web.request(f"/api/sessions/{session_id}/put-away", "POST")
        assert (status, body["code"]) == (409, "not_kept")
        assert link.is_open and session_id in web.manager.sessions
    finally:
        txaio.config.loop = previous
