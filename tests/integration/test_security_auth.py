"""
Users against the real engine: a live capsule with --auth and --tokens.
Nothing gets in without a user (page, WebSocket, export, API); wrong
passwords are refused, then throttled; another user's session is, on
reconnect, replay and export, a session that does not exist; the cookie's
flags; Basic and Bearer on the upgrade; the htpasswd file read again; TLS
end to end; no secret in the log; and without users, loopback only.
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import struct
import subprocess
import sys
import urllib.parse
import uuid
from pathlib import Path

import bcrypt
import pytest
import websocket  # websocket-client

from capsule.core.protocol import BINARY_SUBPROTOCOL
from tests.support.httpclient import request

from .harness import IMAGE, free_port, wait_for

PASSWORDS = {"alice": "correct horse battery", "bob": "tr0ub4dor&3"}
TOKENS = {"bob": "bob-token-" + "7" * 30}


def htpasswd_line(user: str, password: str) -> str:
    # As `htpasswd -B` writes it: $2y$ (cost 4 keeps the test fast).
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()
    return f"{user}:$2y${hashed[4:]}\n"


@pytest.fixture
def users(tmp_path):
    passwords = tmp_path / "htpasswd"
    passwords.write_text("".join(htpasswd_line(u, p) for u, p in PASSWORDS.items()))
    tokens = tmp_path / "tokens"
    tokens.write_text("".join(f"{u}:{t}\n" for u, t in TOKENS.items()))
    return passwords, tokens


@pytest.fixture
def server(make_server, users, tmp_path):
    passwords, tokens = users
    return make_server("--auth", str(passwords), "--tokens", str(tokens),
                       "--state-dir", str(tmp_path / "state"), "--grace", "30",
                       "--pool-size", "1")


def basic(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{PASSWORDS[user]}".encode()).decode()


def bearer(user: str) -> str:
    return f"Bearer {TOKENS[user]}"


def http(url: str, method: str = "GET", headers: dict | None = None, body: bytes | None = None,
         context: ssl.SSLContext | None = None):
    """
    (status, headers, body) of one request; redirects are not followed.
    """
    return request(url, method, headers, body, context=context)


def login(base: str, user: str, password: str, context=None, origin: str | None = None):
    body = urllib.parse.urlencode({"username": user, "password": password,
                                   "next": "/"}).encode()
    return http(f"{base}/login", "POST", {
        "Content-Type": "application/x-www-form-urlencoded",
        "Origin": origin or base}, body, context)


def cookie_of(headers) -> str:
    match = re.match(r"capsule_session=([^;]*)", headers["Set-Cookie"])
    assert match, headers["Set-Cookie"]
    return match.group(1)


def connect(url: str, *headers: str, session_id: str | None = None, offset: int | None = None,
            binary: bool = False, sslopt: dict | None = None,
            origin: str | None = None) -> websocket.WebSocket:
    query = {}
    if session_id is not None:
        query["session_id"] = session_id
    if offset is not None:
        query["offset"] = offset
    if query:
        url = f"{url}?{urllib.parse.urlencode(query)}"
    return websocket.create_connection(
        url, timeout=30, header=list(headers), sslopt=sslopt, origin=origin,
        subprotocols=[BINARY_SUBPROTOCOL] if binary else None)


def refused_upgrade(url: str, *headers: str) -> int:
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        connect(url, *headers)
    return e.value.status_code


def next_json(ws: websocket.WebSocket) -> dict:
    while True:
        opcode, data = ws.recv_data()
        if opcode == websocket.ABNF.OPCODE_TEXT:
            return json.loads(data)


def close_code(ws: websocket.WebSocket) -> int:
    while True:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return struct.unpack("!H", data[:2])[0]


def start(ws: websocket.WebSocket) -> str:
    ws.send(json.dumps({"type": "resize", "cols": 80, "rows": 24}))
    message = next_json(ws)
    assert message["type"] == "connected", message
    return message["session_id"]


def run(ws: websocket.WebSocket, command: str, expect: str) -> None:
    ws.send(json.dumps({"type": "input", "data": command + "\n"}))
    seen = b""
    while expect.encode() not in seen:
        message = next_json(ws)
        assert message["type"] == "output", message
        seen += base64.b64decode(message["data"])


def refusal(url: str, *headers: str, **kwargs) -> tuple[dict, int]:
    """
    What capsule answers a reconnect: the error frame and the close code.
    """
    ws = connect(url, *headers, **kwargs)
    try:
        return next_json(ws), close_code(ws)
    finally:
        ws.close()


def test_nothing_but_health_and_the_login_page_without_a_user(server):
    status, headers, _ = http(server.url + "/", headers={"Accept": "text/html"})
    assert (status, headers["Location"]) == (303, "/login?next=%2F")
    for path in ("/", "/api/sessions", f"/api/export/{uuid.uuid4()}", "/app.js"):
        status, headers, body = http(server.url + path)
        assert status == 401, path
        assert json.loads(body)["code"] == "unauthenticated"
        assert headers["WWW-Authenticate"] == 'Bearer realm="capsule"'
    assert refused_upgrade(server.ws_url) == 401
    assert refused_upgrade(server.ws_url, "Authorization: Bearer not-a-token-at-all") == 401
    status, _, body = http(server.url + "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, headers, body = http(server.url + "/login?next=/%3Fx%3D1")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert b'<form method="post" action="/login">' in body
    assert b'name="next" value="/?x=1"' in body
    assert http(server.url + "/login.css")[0] == 200
    # No session was made for anyone: what runs is the warm pool's one container.
    assert len(server.containers()) <= server.pool_size == 1


def test_a_wrong_password_is_refused_then_throttled(server):
    for _ in range(5):
        status, _, body = login(server.url, "bob", "wrong password")
        assert status == 401
        assert b'role="alert">Wrong user name or password.</p>' in body
        assert b'aria-invalid="true"' in body
    # bob's bucket is empty: even his password is not tried now.
    status, headers, body = login(server.url, "bob", PASSWORDS["bob"])
    assert status == 429 and int(headers["Retry-After"]) > 0
    assert b"Too many failed logins: try again in" in body
    # So is Basic on the upgrade, for bob.
    assert refused_upgrade(server.ws_url, f"Authorization: {basic('bob')}") == 429
    # alice is not bob.
    assert login(server.url, "alice", PASSWORDS["alice"])[0] == 303
    log = server.log()
    assert "failed login of bob from 127.0.0.1" in log
    assert "wrong password" not in log and PASSWORDS["bob"] not in log


def test_the_cookie_its_flags_rotation_and_logout(server):
    status, headers, _ = login(server.url, "alice", PASSWORDS["alice"])
    assert (status, headers["Location"]) == (303, "/")
    first = cookie_of(headers)
    assert headers["Set-Cookie"] == (f"capsule_session={first}; Path=/; HttpOnly;"
                                     " SameSite=Strict; Max-Age=43200")
    cookie = {"Cookie": f"capsule_session={first}"}
    status, _, body = http(server.url + "/", headers=cookie)
    assert status == 200 and b"<title>capsule</title>" in body
    status, _, body = http(server.url + "/api/sessions", headers=cookie)
    assert (status, json.loads(body)) == (200, {"user": "alice", "sessions": []})
    # Logging in again with that cookie rotates it: the old one is worthless.
    status, headers, _ = http(f"{server.url}/login", "POST", {
        **cookie, "Origin": server.url, "Content-Type": "application/x-www-form-urlencoded"},
        urllib.parse.urlencode({"username": "alice",
                                "password": PASSWORDS["alice"]}).encode())
    second = cookie_of(headers)
    assert status == 303 and second != first
    assert http(server.url + "/api/sessions", headers=cookie)[0] == 401
    cookie = {"Cookie": f"capsule_session={second}"}
    # A cross-site logout (or login) is refused.
    assert http(server.url + "/logout", "POST",
                {**cookie, "Origin": "http://evil.example"})[0] == 403
    assert http(server.url + "/api/sessions", headers=cookie)[0] == 200
    status, headers, _ = http(server.url + "/logout", "POST", {**cookie, "Origin": server.url})
    assert (status, headers["Location"]) == (303, "/login")
    assert headers["Set-Cookie"].startswith("capsule_session=; Path=/; HttpOnly;")
    assert "Max-Age=0" in headers["Set-Cookie"]
    assert http(server.url + "/api/sessions", headers=cookie)[0] == 401
    log = server.log()
    assert first not in log and second not in log and PASSWORDS["alice"] not in log
    assert "alice logged in from 127.0.0.1" in log and "alice logged out" in log


def test_another_users_session_is_a_missing_session(server):
    alice = connect(server.ws_url, f"Authorization: {basic('alice')}")
    try:
        session_id = start(alice)
        run(alice, "echo the-secret-$((6*7))", "the-secret-42")
        missing = str(uuid.uuid4())
        bob = f"Authorization: {bearer('bob')}"

        def same(answer_for_session, answer_for_missing):
            (message, code), (other, other_code) = answer_for_session, answer_for_missing
            assert message["type"] == "error" and message["code"] == "session_not_found"
            assert code == other_code == 4404
            assert message["message"].replace(session_id, "ID") == \
                other["message"].replace(missing, "ID")

        # Reconnect.
        same(refusal(server.ws_url, bob, session_id=session_id),
             refusal(server.ws_url, bob, session_id=missing))
        # Replay from the start.
        same(refusal(server.ws_url, bob, session_id=session_id, offset=0, binary=True),
             refusal(server.ws_url, bob, session_id=missing, offset=0, binary=True))
        # Export.
        status, _, body = http(f"{server.url}/api/export/{session_id}",
                               headers={"Authorization": bearer("bob")})
        other_status, _, other_body = http(f"{server.url}/api/export/{missing}",
                                           headers={"Authorization": bearer("bob")})
        assert status == other_status == 404
        assert body.decode().replace(session_id, "ID") == \
            other_body.decode().replace(missing, "ID")
        # bob lists none; alice lists hers, attached.
        status, _, body = http(server.url + "/api/sessions",
                               headers={"Authorization": bearer("bob")})
        assert json.loads(body) == {"user": "bob", "sessions": []}
        status, _, body = http(server.url + "/api/sessions",
                               headers={"Authorization": basic("alice")})
        [listed] = json.loads(body)["sessions"]
        assert (listed["id"], listed["status"], listed["client_attached"]) == \
            (session_id, "running", True)
        # alice was not taken over: her terminal still answers.
        run(alice, "echo still-$((1+1))", "still-2")
        # Her own export works.
        status, headers, body = http(f"{server.url}/api/export/{session_id}",
                                     headers={"Authorization": basic("alice")})
        assert status == 200 and body[:2] == b"\x1f\x8b"
    finally:
        alice.close()
    log = server.log()
    for secret in (session_id, TOKENS["bob"], PASSWORDS["alice"],
                   base64.b64encode(f"alice:{PASSWORDS['alice']}".encode()).decode()):
        assert secret not in log
    assert f"alice opened session {session_id[:8]}" in log


def test_a_session_keeps_its_owner_across_a_restart(make_server, users, tmp_path):
    passwords, tokens = users
    args = ("--auth", str(passwords), "--tokens", str(tokens),
            "--state-dir", str(tmp_path / "state"), "--grace", "60", "--pool-size", "0")
    first = make_server(*args)
    alice = connect(first.ws_url, f"Authorization: {basic('alice')}")
    session_id = start(alice)
    run(alice, "echo before-$((2*2))", "before-4")
    alice.close()
    first.stop()
    assert json.loads((tmp_path / "state" / f"owners-{first.instance}.json").read_text()) \
        == {session_id: "alice"}
    second = make_server(*args, instance=first.instance)
    wait_for(lambda: "found 1 session(s) of an earlier run" in second.log(), 30,
             "the session to be found")
    bob = f"Authorization: {bearer('bob')}"
    message, code = refusal(second.ws_url, bob, session_id=session_id)
    assert (message["code"], code) == ("session_not_found", 4404)
    again = connect(second.ws_url, f"Authorization: {basic('alice')}", session_id=session_id)
    try:
        message = next_json(again)
        assert (message["type"], message["session_id"]) == ("connected", session_id)
        run(again, "echo after-$((3*3))", "after-9")
    finally:
        again.close()


def test_the_htpasswd_file_is_read_again_when_it_changes(server, users):
    passwords, _ = users
    carol = "Basic " + base64.b64encode(b"carol:new password").decode()
    assert http(server.url + "/api/sessions", headers={"Authorization": carol})[0] == 401
    passwords.write_text(passwords.read_text() + htpasswd_line("carol", "new password"))
    status, _, body = http(server.url + "/api/sessions", headers={"Authorization": carol})
    assert (status, json.loads(body)["user"]) == (200, "carol")
    ws = connect(server.ws_url, f"Authorization: {carol}")
    try:
        start(ws)
    finally:
        ws.close()
    # Removed again: refused again.
    passwords.write_text("".join(htpasswd_line(u, p) for u, p in PASSWORDS.items()))
    assert http(server.url + "/api/sessions", headers={"Authorization": carol})[0] == 401


def test_tls_round_trip(make_server, users, tmp_path):
    passwords, tokens = users
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    port = free_port()
    base = f"https://localhost:{port}"
    server = make_server("--auth", str(passwords), "--tokens", str(tokens),
                         "--state-dir", str(tmp_path / "state"), "--pool-size", "1",
                         "--listen", f"ssl:{port}:privateKey={key}:certKey={cert}"
                         ":interface=127.0.0.1", "--public-url", base)
    context = ssl.create_default_context(cafile=str(cert))
    wait_for(lambda: http(base + "/health", context=context)[0] == 200, 30, "TLS to answer")
    status, headers, _ = login(base, "alice", PASSWORDS["alice"], context)
    assert status == 303
    value = cookie_of(headers)
    assert headers["Set-Cookie"] == (f"capsule_session={value}; Path=/; HttpOnly;"
                                     " SameSite=Strict; Max-Age=43200; Secure")
    ws = connect(f"wss://localhost:{port}/ws", f"Cookie: capsule_session={value}",
                 origin=base, sslopt={"ca_certs": str(cert)})
    try:
        start(ws)
        run(ws, "echo over-tls-$((5*5))", "over-tls-25")
    finally:
        ws.close()
    # Without the cookie, the same upgrade is refused.
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        connect(f"wss://localhost:{port}/ws", origin=base, sslopt={"ca_certs": str(cert)})
    assert e.value.status_code == 401
    assert value not in server.log()


def test_without_users_capsule_says_it_listens_on_loopback(make_server):
    server = make_server("--pool-size", "0")
    wait_for(lambda: "capsule has no users" in server.log(), 10, "the loopback notice")
    status, _, body = http(server.url + "/api/sessions")
    assert (status, json.loads(body)) == (200, {"user": None, "sessions": []})


def test_a_listen_others_can_reach_without_users_is_a_usage_error(tmp_path):
    twistd = str(Path(sys.executable).with_name("twistd"))
    done = subprocess.run([twistd, "-n", "--pidfile=", f"--logfile={tmp_path / 'log'}",
                           "capsule", "--listen", f"tcp:{free_port()}", "--image", IMAGE],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "can be reached from other machines, and capsule has no users: add --auth FILE" \
        in done.stdout + done.stderr


def test_the_proxy_header_counts_from_a_trusted_proxy_only(make_server, tmp_path):
    trusted = make_server("--user-header", "X-Forwarded-User", "--trusted-proxy", "127.0.0.1/32",
                          "--state-dir", str(tmp_path / "a"), "--pool-size", "0")
    status, _, body = http(trusted.url + "/api/sessions", headers={"X-Forwarded-User": "dora"})
    assert (status, json.loads(body)["user"]) == (200, "dora")
    ws = connect(trusted.ws_url, "X-Forwarded-User: dora")
    try:
        session_id = start(ws)
    finally:
        ws.close()
    message, code = refusal(trusted.ws_url, "X-Forwarded-User: eve", session_id=session_id)
    assert (message["code"], code) == ("session_not_found", 4404)
    # The same header from an address that is not a trusted proxy counts for nothing.
    untrusted = make_server("--user-header", "X-Forwarded-User", "--trusted-proxy",
                            "10.0.0.0/8", "--state-dir", str(tmp_path / "b"), "--pool-size", "0")
    assert http(untrusted.url + "/api/sessions", headers={"X-Forwarded-User": "dora"})[0] == 401
    assert refused_upgrade(untrusted.ws_url, "X-Forwarded-User: dora") == 401
    assert "ignored x-forwarded-user from 127.0.0.1, which is not a --trusted-proxy" \
        in untrusted.log()


def test_a_user_past_max_sessions_per_user_is_refused(make_server, users, tmp_path):
    passwords, tokens = users
    server = make_server("--auth", str(passwords), "--tokens", str(tokens),
                         "--state-dir", str(tmp_path / "state"), "--pool-size", "0",
                         "--max-sessions-per-user", "1")
    alice = connect(server.ws_url, f"Authorization: {basic('alice')}")
    try:
        start(alice)
        again = connect(server.ws_url, f"Authorization: {basic('alice')}")
        try:
            again.send(json.dumps({"type": "resize", "cols": 80, "rows": 24}))
            message = next_json(again)
            assert (message["type"], message["code"]) == ("error", "quota_exceeded")
            assert message["message"] == ("alice has too many sessions (at most 1 at once):"
                                          " end one first")
            assert close_code(again) == 4429
        finally:
            again.close()
        # Another user is not alice.
        bob = connect(server.ws_url, f"Authorization: {bearer('bob')}")
        try:
            start(bob)
        finally:
            bob.close()
    finally:
        alice.close()


def test_the_owner_takes_her_session_over_and_replays_it(server):
    alice = f"Authorization: {basic('alice')}"
    first = connect(server.ws_url, alice)
    try:
        session_id = start(first)
        run(first, "echo the-secret-$((6*7))", "the-secret-42")
        second = connect(server.ws_url, alice, session_id=session_id, offset=0, binary=True)
        try:
            message = next_json(second)
            assert (message["type"], message["session_id"]) == ("connected", session_id)
            replayed = b""
            while b"the-secret-42" not in replayed:
                opcode, data = second.recv_data()
                if opcode == websocket.ABNF.OPCODE_BINARY:
                    replayed += data
            message = next_json(first)
            while message["type"] == "output":  # the prompt after the echo
                message = next_json(first)
            assert (message["type"], message["code"]) == ("error", "taken_over")
            assert close_code(first) == 4409
        finally:
            second.close()
    finally:
        first.close()
