"""
Steering a live capsule with `python -m capsule.admin` (real twistd, real
engine): list, end, drain, and cleanup after a kill -9.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import websocket  # websocket-client

from capsule.sessions.drain import DEADLINE_ENDED, DRAIN_REFUSAL, ENDED_BY_ADMIN
from tests.support.clients import BlockingTerminal

from .harness import instance_containers, wait_for

TOKEN = "ann-token-" + "5" * 30


def admin(server, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "capsule.admin", "--url", server.url, *args],
                          capture_output=True, text=True, timeout=60, env=env)


def next_message(ws, kind: str, timeout: float = 30) -> dict:
    """
    The next text frame of C{kind} (output and other frames are skipped).
    """
    deadline = time.monotonic() + timeout
    while True:
        ws.settimeout(max(0.01, deadline - time.monotonic()))
        opcode, payload = ws.recv_data()
        if opcode == 8:
            raise AssertionError(f"closed ({int.from_bytes(payload[:2], 'big')}) before a {kind}")
        if opcode == 1 and json.loads(payload).get("type") == kind:
            return json.loads(payload)


def close_code(ws) -> int:
    """
    Read until capsule closes the WebSocket; return its close code.
    """
    while True:
        opcode, payload = ws.recv_data()
        if opcode == 8:
            return int.from_bytes(payload[:2], "big")


def test_list_shows_the_owner_and_end_tells_the_client(make_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ann:{TOKEN}\n")
    # With users, loopback is admin only when the operator says so.
    server = make_server("--tokens", str(tokens), "--state-dir", str(tmp_path / "state"),
                         "--pool-size", "0", "--admin-loopback")
    ws = websocket.create_connection(server.ws_url, timeout=30,
                                     header=[f"Authorization: Bearer {TOKEN}"])
    ws.send(json.dumps({"type": "resize", "cols": 80, "rows": 24}))
    session_id = next_message(ws, "connected")["session_id"]

    listed = admin(server, "list")
    assert listed.returncode == 0, listed.stderr
    row = [line.split() for line in listed.stdout.splitlines()
           if line.startswith(session_id[:8])]
    assert row and row[0][1:3] == ["ann", "running"] and "attached" in row[0]
    answer = json.loads(admin(server, "list", "--json").stdout)
    [session] = answer["sessions"]
    assert (session["id"], session["owner"], session["state"], session["client_attached"]) \
        == (session_id, "ann", "running", True)
    assert session["container"] == instance_containers(server.instance)[0]["Id"]

    ended = admin(server, "end", session_id[:8])
    assert (ended.returncode, ended.stdout.strip()) == (0, f"ended session {session_id}")
    message = next_message(ws, "exit")
    assert message["message"] == ENDED_BY_ADMIN
    assert close_code(ws) == 1000
    wait_for(lambda: not instance_containers(server.instance), 30, "its container removed")
    assert json.loads(admin(server, "list", "--json").stdout)["sessions"] == []


def test_drain_refuses_new_sessions_keeps_the_others_until_the_deadline(server):
    kept = BlockingTerminal(server.ws_url)
    session_id = kept.start()
    started = time.monotonic()
    drained = admin(server, "drain", "--deadline", "15")
    assert drained.returncode == 0, drained.stderr
    assert drained.stdout.startswith("draining: no new sessions; 1 session(s) go on")
    assert kept.next("notice")["code"] == "draining"

    new = websocket.create_connection(server.ws_url, timeout=30)
    new.send(json.dumps({"type": "resize", "cols": 80, "rows": 24}))
    assert json.loads(new.recv()) == {"type": "error", "code": "draining",
                                      "message": DRAIN_REFUSAL}
    assert close_code(new) == 4503

    status, health = server.health()
    assert (status, health["status"], health["draining"]["draining"]) == (503, "draining", True)
    kept.run("echo still-$((40+2))", "still-42")
    # A client coming back while capsule drains is told too.
    kept.drop()
    kept = BlockingTerminal(server.ws_url, session_id)
    assert kept.next("notice")["code"] == "draining"
    kept.run("echo back-$((40+3))", "back-43")
    assert time.monotonic() - started < 15, "the checks took longer than the deadline"

    message = kept.next("exit", timeout=40)
    assert message["message"] == DEADLINE_ENDED
    wait_for(lambda: len(instance_containers(server.instance)) == server.pool_size, 30,
             "the session's container removed")
    assert json.loads(admin(server, "list", "--json").stdout) == {
        "instance": server.instance, "draining": True, "sessions": [],
        "kept": []}


def test_cleanup_refused_while_running_then_removes_after_kill_9(make_server):
    server = make_server("--pool-size", "1")
    terminal = BlockingTerminal(server.ws_url)
    terminal.start()
    wait_for(lambda: len(instance_containers(server.instance)) == 2, 30,
             "a session's and a warm container")

    refused = admin(server, "cleanup", "--instance", server.instance)
    assert refused.returncode == 1
    assert f"capsule instance {server.instance} is running at {server.url}" in refused.stderr
    assert len(instance_containers(server.instance)) == 2

    server.process.kill()
    server.process.wait(30)
    terminal.drop()
    # The relay exec in the session's container ends with capsule's
    # connection to it; until then capsule counts as attached.
    done = wait_for(lambda: (lambda r: r if r.returncode == 0 else None)(
        admin(server, "cleanup", "--instance", server.instance)), 30, "cleanup to succeed")
    assert done.stdout.splitlines()[-1] == \
        f"removed 2 container(s) of instance {server.instance}"
    assert instance_containers(server.instance) == []


def test_ready_line_names_the_url(server):
    wait_for(lambda: f"capsule is ready: {server.url}/ (0 sessions recovered)" in server.log(),
             30, "the ready line")
