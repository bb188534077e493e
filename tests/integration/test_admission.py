"""
Admission control against the real engine: a client past its limit or its
rate, and a full server, are refused with an error frame and a close code,
and no container is made for them.

Every test connects from 127.0.0.1: capsule trusts that as a proxy, so that
X-Forwarded-For makes the connections different clients.
"""

from __future__ import annotations

import json
import os
import re
import struct
import time

import websocket  # websocket-client

from .harness import BlockingTerminal, docker_client, instance_containers


def open_session(server, client: str) -> tuple[websocket.WebSocket, dict]:
    """
    Ask for a new session as C{client}: the connection and the first
    message (C{connected} or C{error}).
    """
    ws = websocket.create_connection(server.ws_url, timeout=30,
                                     header=[f"X-Forwarded-For: {client}"])
    ws.send(json.dumps({"type": "resize", "cols": 80, "rows": 24}))
    return ws, json.loads(ws.recv())


def close_code(ws: websocket.WebSocket) -> int:
    """
    The close code capsule sends next.
    """
    opcode, data = ws.recv_data(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE, (opcode, data)
    return struct.unpack("!H", data[:2])[0]


def refused(server, client: str) -> tuple[dict, int]:
    ws, message = open_session(server, client)
    try:
        return message, close_code(ws)
    finally:
        ws.close()


def containers(server) -> int:
    return len(instance_containers(server.instance))


def test_the_third_session_of_a_client_is_refused_another_client_is_not(make_server):
    server = make_server("--trusted-proxy", "127.0.0.1/32", "--max-sessions-per-client", "2",
                         "--pool-size", "0", "--memory", "256m")
    kept = []
    try:
        for _ in range(2):
            ws, message = open_session(server, "198.51.100.1")
            assert message["type"] == "connected"
            kept.append(ws)
        assert containers(server) == 2
        message, code = refused(server, "198.51.100.1")
        assert message == {
            "type": "error", "code": "quota_exceeded",
            "message": "too many sessions from 198.51.100.1 (at most 2 at once): end one first"}
        assert code == 4429
        # Another client behind the same proxy gets its session; by the time
        # it runs, a container made for the refused one would be there too.
        ws, message = open_session(server, "198.51.100.2")
        assert message["type"] == "connected"
        kept.append(ws)
        assert containers(server) == 3
    finally:
        for ws in kept:
            ws.close()
    assert server.unhandled_errors() == []


def test_a_burst_past_the_session_rate_is_refused(make_server):
    server = make_server("--trusted-proxy", "127.0.0.1/32", "--session-rate", "3/600",
                         "--pool-size", "0", "--memory", "256m")
    kept = []
    try:
        for _ in range(3):
            ws, message = open_session(server, "198.51.100.1")
            assert message["type"] == "connected"
            kept.append(ws)
        message, code = refused(server, "198.51.100.1")
        assert (message["type"], message["code"], code) == ("error", "quota_exceeded", 4429)
        assert message["message"].startswith(
            "too many new sessions from 198.51.100.1 (at most 3 per 600 s): try again in ")
        ws, message = open_session(server, "198.51.100.2")
        assert message["type"] == "connected"
        kept.append(ws)
        assert containers(server) == 4
    finally:
        for ws in kept:
            ws.close()
    assert server.unhandled_errors() == []


def test_a_full_server_and_a_spent_memory_budget_are_server_full(make_server):
    server = make_server("--trusted-proxy", "127.0.0.1/32", "--max-sessions", "2",
                         "--memory", "256m", "--memory-request", "256m",
                         "--memory-budget", "256m", "--pool-size", "0")
    ws, message = open_session(server, "198.51.100.1")
    try:
        assert message["type"] == "connected"
        # Memory: a second session's 256m request would exceed the 256m budget.
        message, code = refused(server, "198.51.100.2")
        assert (message["type"], message["code"], code) == ("error", "server_full", 4503)
        assert "memory" in message["message"]
        assert containers(server) == 1
    finally:
        ws.close()
    server2 = make_server("--trusted-proxy", "127.0.0.1/32", "--max-sessions", "1",
                          "--memory", "256m", "--pool-size", "0")
    ws, message = open_session(server2, "198.51.100.1")
    try:
        assert message["type"] == "connected"
        message, code = refused(server2, "198.51.100.2")
        assert message == {"type": "error", "code": "server_full",
                           "message": "the server is full (1 sessions): try again later"}
        assert code == 4503
        assert containers(server2) == 1
    finally:
        ws.close()
    assert server.unhandled_errors() == [] and server2.unhandled_errors() == []


def test_a_host_under_its_reserve_is_server_full_saying_why(make_server):
    # A reserve no host has: every new session is refused once the host's
    # memory has been read (just after start), before anything is made.
    server = make_server("--trusted-proxy", "127.0.0.1/32", "--memory", "256m",
                         "--memory-reserve", "100000g", "--pool-size", "1")
    deadline = time.monotonic() + 20
    while True:
        ws, message = open_session(server, "198.51.100.1")
        if message["type"] == "error" or time.monotonic() > deadline:
            break
        ws.close()
    try:
        assert (message["type"], message["code"]) == ("error", "server_full")
        assert re.fullmatch(r"the server is full: the host has \d+ MiB of memory available,"
                            r" under its reserve of 102400000 MiB: try again later",
                            message["message"]), message
        assert close_code(ws) == 4503
    finally:
        ws.close()
    # The warm pool waits too: it made at most the one it began with.
    assert containers(server) <= 2
    assert "memory budget:" in server.log() and server.unhandled_errors() == []


def test_every_process_of_a_session_is_killed_before_capsule(make_server):
    server = make_server("--trusted-proxy", "127.0.0.1/32", "--memory", "256m",
                         "--pool-size", "0")
    ws, message = open_session(server, "198.51.100.1")
    try:
        assert message["type"] == "connected"
        [summary] = instance_containers(server.instance)
        api = docker_client().api
        exec_id = api.exec_create(summary["Id"], [
            "sh", "-c", "for p in /proc/[0-9]*; do"
            " echo \"$(cat $p/comm 2>/dev/null) $(cat $p/oom_score_adj 2>/dev/null)\"; done"])
        lines = api.exec_start(exec_id).decode().split("\n")
        scores = dict(line.rsplit(" ", 1) for line in lines if line.strip())
        # The keeper, its shell and the exec itself: all 1000.
        assert "capsule-keeper" in scores and "bash" in scores, scores
        assert set(scores.values()) == {"1000"}, scores
        # capsule lowered its own (it runs as root here), or said what to set.
        with open(f"/proc/{server.process.pid}/oom_score_adj") as f:
            own = int(f.read())
        assert own == -900 or "OOMScoreAdjust=-900" in server.log()
    finally:
        ws.close()


def test_a_process_past_its_sessions_memory_limit_is_killed_the_session_lives_on(make_server):
    # The kernel picks the biggest process of the session's cgroup: the one
    # that filled it, not the keeper, the shell or capsule.
    server = make_server("--memory", "128m", "--pool-size", "0")
    terminal = BlockingTerminal(server.ws_url)
    try:
        terminal.start()
        terminal.run("perl -e '$x = \"a\"; $x x= 300 * 1024 * 1024'; echo status-$?",
                     "status-137", timeout=60)
        terminal.run("echo still-$((40+2))", "still-42")
        assert server.health()[1]["sessions"] == 1
    finally:
        terminal.close()
    assert server.unhandled_errors() == []
