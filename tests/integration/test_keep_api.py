"""
Kept sessions through the API and the WebSocket of a real capsule, on the
real engine: put away through the API (the container stops, the list says
kept), a reconnect gets session_kept, resume=1 attaches with the old screen
and a new shell, the files are there; export of a kept session; fork and
snapshots through the API; ownership with users.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import tarfile

import pytest

from tests.support.clients import BlockingTerminal, SessionEnded
from tests.support.httpclient import request

from .harness import docker_client
from .test_api import ALICE, BOB, call, create, sh


def _container_of(server, session_id: str):
    client = docker_client()
    [container] = client.containers.list(all=True, filters={
        "label": [f"io.capsule.instance={server.instance}",
                  f"io.capsule.session={session_id}"]})
    return container


@pytest.fixture
def keeping(make_server):
    # Its snapshots' images go with it (make_server removes them).
    return make_server("--grace", "30", tuning={"cleanup-interval": 0.5})


def _kept_error(server, session_id: str, binary: bool = False) -> tuple[dict, int]:
    """
    The error frame and the close code a reconnect to C{session_id} gets.
    """
    import websocket
    ws = websocket.create_connection(f"{server.ws_url}?session_id={session_id}", timeout=20,
                                     subprotocols=["capsule.binary.v1"] if binary else None)
    try:
        frame = json.loads(ws.recv())
        opcode, payload = ws.recv_data(control_frame=True)
        assert opcode == 8
        return frame, int.from_bytes(payload[:2], "big")
    finally:
        ws.close()


def test_put_away_list_reconnect_resume_through_the_api_and_the_websocket(keeping):
    server = keeping
    terminal = BlockingTerminal(server.ws_url)
    session_id = terminal.start(100, 30)
    terminal.run("echo before-$((6*7)) > /workspace/notes.txt; echo wrote-$((40+2))",
                 "wrote-42")
    container = _container_of(server, session_id)

    status, body = call(server, f"/api/sessions/{session_id}/put-away", "POST")
    assert (status, body["id"], body["state"], body["reason"]) == (200, session_id, "kept",
                                                                   "put_away")
    assert body["kept_until"] > body["kept_at"]
    # Its client is told, and let go.
    with pytest.raises(SessionEnded):
        terminal.next("connected", timeout=20)
    container.reload()
    assert container.status == "exited"
    status, listing = call(server, "/api/sessions")
    assert [(s["id"], s["state"]) for s in listing["sessions"]] == [(session_id, "kept")]
    assert call(server, f"/api/sessions/{session_id}")[1]["state"] == "kept"

    for binary in (False, True):
        error, code = _kept_error(server, session_id, binary)
        assert (error["code"], code) == ("session_kept", 4404)
        assert "put away on" in error["message"] and "kept until" in error["message"]
        assert error["kept_at"] == body["kept_at"]

    # The export of a kept session: its files.
    status, _, archive = request(f"{server.url}/api/export/{session_id}", timeout=120)
    assert status == 200
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(archive))) as tar:
        assert tar.extractfile("workspace/notes.txt").read() == b"before-42\n"

    resumed = BlockingTerminal(server.ws_url, f"{session_id}&resume=1", binary=True)
    connected = resumed.next("connected", timeout=60)
    assert connected["session_id"] == session_id
    assert connected["resumed_from"] == body["kept_at"]
    assert connected["on_close"]["outcome"] == "kept"
    notice = resumed.next("notice", timeout=20)
    assert notice["code"] == "resumed"
    resumed.send({"type": "resize", "cols": 100, "rows": 30})
    # The old screen comes first, as history, marked; then a new shell.
    resumed._read_until(
        lambda frame: True if re.search(rb"wrote-42[\s\S]*resumed", resumed.output) else None,
        30, "the old screen, then the marker")
    resumed.run("cat /workspace/notes.txt; echo again-$((40+2))", "again-42")
    assert b"before-42" in resumed.output
    assert call(server, f"/api/sessions/{session_id}")[1]["state"] == "running"
    resumed.exit()


def test_resume_through_the_api_then_the_page_attaches(keeping):
    server = keeping
    session_id = create(server)["id"]
    sh(server, session_id, "echo kept > /workspace/a")
    assert call(server, f"/api/sessions/{session_id}/put-away", "POST")[0] == 200
    status, body = call(server, f"/api/sessions/{session_id}/resume", "POST")
    assert (status, body["id"], body["url"]) == (200, session_id,
                                                 f"/?session_id={session_id}")
    assert sh(server, session_id, "cat /workspace/a")["stdout"] == "kept\n"
    terminal = BlockingTerminal(server.ws_url, session_id)
    connected = terminal.next("connected", timeout=60)
    assert connected["resumed_from"] > 0
    terminal.send({"type": "resize", "cols": 80, "rows": 24})
    terminal.run("echo up-$((1+1))", "up-2")


def test_fork_and_snapshots_through_the_api(keeping):
    server = keeping
    source = create(server)["id"]
    sh(server, source, "echo original > /workspace/f")
    status, fork = call(server, f"/api/sessions/{source}/fork", "POST")
    assert status == 201, fork
    assert fork["id"] != source
    assert sh(server, fork["id"], "cat /workspace/f")["stdout"] == "original\n"
    sh(server, fork["id"], "echo changed > /workspace/f")
    assert sh(server, source, "cat /workspace/f")["stdout"] == "original\n"

    status, snapshot = call(server, "/api/snapshots", "POST",
                            {"session": source, "name": "first"})
    assert (status, snapshot["name"]) == (201, "first"), snapshot
    assert call(server, "/api/snapshots", "POST",
                {"session": source, "name": "first"})[1]["code"] == "snapshot_exists"
    assert [s["name"] for s in call(server, "/api/snapshots")[1]["snapshots"]] == ["first"]
    status, started = call(server, "/api/snapshots/first/sessions", "POST")
    assert status == 201, started
    assert sh(server, started["id"], "cat /workspace/f")["stdout"] == "original\n"
    assert call(server, "/api/snapshots/first", "DELETE")[0] == 200
    assert call(server, "/api/snapshots")[1]["snapshots"] == []
    assert call(server, "/api/snapshots/first", "DELETE")[1]["code"] == "snapshot_not_found"

    # A kept session forks too, and is deleted for good.
    assert call(server, f"/api/sessions/{source}/put-away", "POST")[0] == 200
    status, second = call(server, f"/api/sessions/{source}/fork", "POST")
    assert status == 201, second
    assert sh(server, second["id"], "cat /workspace/f")["stdout"] == "original\n"
    container = _container_of(server, source)
    assert call(server, f"/api/sessions/{source}", "DELETE")[1]["deleted"] is True
    assert call(server, f"/api/sessions/{source}")[0] == 404
    import docker
    with pytest.raises(docker.errors.NotFound):
        container.reload()


def test_another_users_kept_session_and_snapshot_are_404(make_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    server = make_server("--tokens", str(tokens), "--state-dir", str(tmp_path / "state"),
                         "--grace", "30")
    session_id = create(server, ALICE)["id"]
    assert call(server, f"/api/sessions/{session_id}/put-away", "POST", token=ALICE)[0] == 200
    assert call(server, "/api/snapshots", "POST", {"session": session_id, "name": "s"},
                token=ALICE)[0] == 201
    for method, path in [("GET", ""), ("DELETE", ""), ("POST", "/resume"),
                         ("POST", "/fork")]:
        status, body = call(server, f"/api/sessions/{session_id}{path}", method,
                            token=BOB)
        assert (status, body["code"]) == (404, "session_not_found"), (method, path)
    assert call(server, f"/api/export/{session_id}", token=BOB)[0] == 404
    assert call(server, "/api/sessions", token=BOB)[1]["sessions"] == []
    assert call(server, "/api/snapshots", token=BOB)[1]["snapshots"] == []
    assert call(server, "/api/snapshots/s", "DELETE", token=BOB)[0] == 404
    assert [s["state"] for s in call(server, "/api/sessions", token=ALICE)[1][
        "sessions"]] == ["kept"]


def test_the_keepings_answers_match_the_openapi_document(keeping):
    """
    Each answer's status is documented for its route, and its JSON body
    validates against the documented schema.
    """
    jsonschema = pytest.importorskip("jsonschema")
    from capsule.web.openapi import document
    server = keeping
    doc = document()
    seen = []

    def check(template, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        status, _, payload = request(server.url + path, method,
                                     {"Content-Type": "application/json"} if data else {},
                                     data, timeout=120)
        answer = doc["paths"][template][method.lower()]["responses"].get(str(status))
        assert answer is not None, (method, template, status, payload[:200])
        schema = {**answer["content"]["application/json"]["schema"],
                  "components": doc["components"]}
        jsonschema.validate(json.loads(payload), schema, cls=jsonschema.Draft202012Validator)
        seen.append(status)
        return json.loads(payload)

    session_id = create(server)["id"]
    check("/api/sessions/{id}/put-away", "POST", f"/api/sessions/{session_id}/put-away")
    check("/api/sessions", "GET", "/api/sessions")
    check("/api/sessions/{id}", "GET", f"/api/sessions/{session_id}")
    check("/api/snapshots", "POST", "/api/snapshots", {"session": session_id, "name": "doc"})
    check("/api/snapshots", "POST", "/api/snapshots", {"session": session_id, "name": "doc"})
    check("/api/snapshots", "POST", "/api/snapshots", {"session": session_id, "name": "No"})
    check("/api/snapshots", "GET", "/api/snapshots")
    check("/api/snapshots/{name}/sessions", "POST", "/api/snapshots/doc/sessions")
    check("/api/snapshots/{name}", "DELETE", "/api/snapshots/doc")
    check("/api/snapshots/{name}", "DELETE", "/api/snapshots/doc")
    check("/api/sessions/{id}/fork", "POST", f"/api/sessions/{session_id}/fork")
    check("/api/sessions/{id}/resume", "POST", f"/api/sessions/{session_id}/resume")
    check("/api/sessions/{id}/resume", "POST", f"/api/sessions/{MISSING}/resume")
    assert seen == [200, 200, 200, 201, 409, 400, 200, 201, 200, 404, 201, 200, 404]


MISSING = "00000000-0000-4000-8000-000000000000"
