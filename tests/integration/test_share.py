"""
Read-only share links against a real capsule and the real engine: real
WebSocket clients as owner and spectators (replay and live output, input
ignored, the owner never taken over, revocation, expiry, the session's end,
ownership, the cap, a spectator counted as a connection), and the page's
files served to a spectator without a login.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.support.clients import BlockingTerminal, SessionEnded
from tests.support.httpclient import request

from .harness import wait_for
from .test_api import ALICE, BOB, call

WATCHERS = 3


@pytest.fixture
def server(make_server):
    return make_server("--grace", "30", "--pool-size", "1",
                       tuning={"cleanup-interval": 0.5, "watchers-per-session": WATCHERS,
                               "share-ttl": 600})


def owner_session(server) -> BlockingTerminal:
    owner = BlockingTerminal(server.ws_url, binary=True)
    owner.start()
    owner.run("echo READY-$((6*7))", "READY-42")
    return owner


def share(server, session_id: str, token=None, **body) -> dict:
    status, answer = call(server, f"/api/sessions/{session_id}/shares", "POST", body, token)
    assert status == 201, answer
    return answer


def spectator(server, token: str) -> BlockingTerminal:
    return BlockingTerminal(f"{server.ws_url}?watch={token}", binary=True)


def closed_with(terminal: BlockingTerminal, timeout: float = 20) -> tuple[dict, str]:
    """
    The error frame that came before the connection closed, and why it closed.
    """
    error = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            frame = terminal._frame()
        except SessionEnded as e:
            return error, str(e)
        if isinstance(frame, dict) and frame.get("type") == "error":
            error = frame
    raise AssertionError("the spectator was not closed")


def test_a_spectator_sees_the_replay_and_live_output_and_cannot_type(server):
    owner = owner_session(server)
    link = share(server, owner.session_id)
    assert link["url"] == "/watch/#" + link["token"]
    watcher = spectator(server, link["token"])
    connected = watcher.next("connected")
    assert connected["session_id"] is None and connected["read_only"] is True
    assert connected["cols"] == 80 and 590 <= connected["expires_in"] <= 600
    # The replay: what the owner's screen holds.
    watcher._read_until(lambda f: True if b"READY-42" in watcher.output else None, 20, "replay")
    assert owner.next("watchers") == {"type": "watchers", "count": 1}
    # Live output.
    owner.run("echo LIVE-$((7*6))", "LIVE-42")
    watcher._read_until(lambda f: True if b"LIVE-42" in watcher.output else None, 20, "live")
    # Typing and resizing are refused once, and never reach the shell.
    watcher.send_input(b"touch /tmp/spectator-was-here\r")
    watcher.send({"type": "resize", "cols": 33, "rows": 9})
    assert watcher.next("error")["code"] == "read_only"
    owner.run("ls /tmp/spectator-was-here 2>&1; stty size", "No such file")
    owner.run("stty size", "24 80")
    # The owner is still attached: nothing took it over.
    owner.run("echo STILL-$((1+1))", "STILL-2")
    watcher.close()
    assert owner.next("watchers") == {"type": "watchers", "count": 0}
    owner.close()


def test_revoking_disconnects_spectators_and_the_link_dies(server):
    owner = owner_session(server)
    link = share(server, owner.session_id)
    watchers = [spectator(server, link["token"]) for _ in range(2)]
    for w in watchers:
        w.next("connected")
    listed = call(server, f"/api/sessions/{owner.session_id}/shares")[1]
    assert listed["watchers"] == 2 and listed["shares"][0]["watchers"] == 2
    status, _ = call(server, f"/api/sessions/{owner.session_id}/shares/{link['id']}",
                     "DELETE")
    assert status == 200
    for w in watchers:
        error, why = closed_with(w)
        assert error["code"] == "share_not_found" and "revoked" in error["message"]
        assert "4410" in why
    error, why = closed_with(spectator(server, link["token"]))
    assert error["code"] == "share_not_found" and "4410" in why
    owner.run("echo OWNER-OK", "OWNER-OK")
    owner.close()


def test_a_link_expires_and_dies_with_its_session(server):
    owner = owner_session(server)
    short = share(server, owner.session_id, ttl=2)
    long = share(server, owner.session_id)
    watcher = spectator(server, short["token"])
    watcher.next("connected")
    error, why = closed_with(watcher)
    assert "expired" in error["message"] and "4410" in why
    watcher = spectator(server, long["token"])
    watcher.next("connected")
    owner.exit()
    error, why = closed_with(watcher)
    assert "the session ended" in error["message"] and "4410" in why
    error, _ = closed_with(spectator(server, long["token"]))
    assert error["code"] == "share_not_found"


def test_past_the_cap_a_spectator_is_refused_and_none_is_a_session(server):
    owner = owner_session(server)
    link = share(server, owner.session_id)
    watchers = [spectator(server, link["token"]) for _ in range(WATCHERS)]
    for w in watchers:
        w.next("connected")
    error, why = closed_with(spectator(server, link["token"]))
    assert error["code"] == "too_many_watchers" and "4429" in why
    sessions = call(server, "/api/sessions")[1]["sessions"]
    assert [s["id"] for s in sessions] == [owner.session_id]
    owner.close()


def test_only_the_owner_shares_and_a_spectator_needs_no_login(make_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    server = make_server("--tokens", str(tokens), "--state-dir", str(tmp_path / "state"))
    session_id = call(server, "/api/sessions", "POST", {}, ALICE)[1]["id"]
    link = share(server, session_id, ALICE)
    base = f"/api/sessions/{session_id}/shares"
    for method, path in [("POST", base), ("GET", base), ("DELETE", f"{base}/{link['id']}")]:
        status, answer = call(server, path, method, {} if method == "POST" else None, BOB)
        assert (status, answer["code"]) == (404, "session_not_found"), (method, path)
        assert call(server, path, method)[0] == 401
    # No login: the page and its modules, and the WebSocket with the token.
    for path in ("/watch/", "/watch/app.js", "/watch/js/watch.js"):
        assert request(server.url + path).status == 200, path
    assert request(server.url + "/").status in (302, 303, 401)
    watcher = spectator(server, link["token"])
    assert watcher.next("connected")["read_only"] is True
    watcher.close()
    # Nobody else's session is reachable through a token.
    error, _ = closed_with(spectator(server, "A" * 43))
    assert error["code"] == "share_not_found"
    # The token never reaches the log.
    log = server.log()
    assert [line for line in log.splitlines() if link["token"] in line] == []


def test_a_spectator_counts_as_a_connection_of_its_address(make_server):
    import websocket  # websocket-client, as BlockingTerminal

    server = make_server("--grace", "30", "--max-connections-per-client", "3",
                         tuning={"cleanup-interval": 0.5})
    owner = owner_session(server)
    link = share(server, owner.session_id)
    watchers = [spectator(server, link["token"]) for _ in range(2)]
    for w in watchers:
        w.next("connected")
    # The owner's and two spectators' WebSockets: this address's three.
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        spectator(server, link["token"])
    assert refused.value.status_code == 429
    assert b"too_many_connections" in (refused.value.resp_body or b"")
    watchers[0].close()
    wait_for(lambda: _watching(server, owner.session_id) == 1, 10, "a spectator gone")
    third = spectator(server, link["token"])
    assert third.next("connected")["read_only"] is True
    owner.run("echo OWNER-OK", "OWNER-OK")


def _watching(server, session_id: str) -> int | None:
    try:
        return call(server, f"/api/sessions/{session_id}/shares")[1]["watchers"]
    except Exception:
        return None
