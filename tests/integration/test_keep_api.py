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
import tarfile

import pytest

from tests.support.clients import BlockingTerminal, SessionEnded
from tests.support.httpclient import request
from tests.support.live import remove_instance_images

from .harness import docker_client, remove_instance_containers
from .test_api import ALICE, BOB, call, create, sh


def _container_of(server, session_id: str):
    client = docker_client()
    [container] = client.containers.list(all=True, filters={
        "label": [f"io.capsule.instance={server.instance}",
                  f"io.capsule.session={session_id}"]})
    return container


def _remove_snapshots(server) -> None:
    # The containers first: an image a container uses cannot be removed.
    server.stop()
    remove_instance_containers(server.instance)
    remove_instance_images(server.instance)


@pytest.fixture
def keeping(make_server):
    server = make_server("--grace", "30", tuning={"cleanup-interval": 0.5})
    yield server
    _remove_snapshots(server)


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
    # The old screen comes first, as history; then a new shell.
    resumed.run("cat /workspace/notes.txt; echo again-$((40+2))", "again-42")
    assert b"wrote-42" in resumed.output or b"before-42" in resumed.output
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
    try:
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
    finally:
        _remove_snapshots(server)
