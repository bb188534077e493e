"""
Previews against the real engine: a small HTTP and WebSocket server (perl)
on a port in a session, reached through capsule at /preview/<id>/<port>/
and, under --preview-domain, at <port>-<id>.<domain>: by its owner only
(another user: 404, nobody: 401 or the login page), through a link until
it is revoked or expires, by anyone once public; its WebSocket echoes;
200 MB each way pass with capsule's memory bounded; what the app sees of
the request (no capsule cookie, no Authorization; forwarded headers).
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import websocket

from tests.support.httpclient import request

from .harness import wait_for

ALICE, BOB = "alice-token-" + "1" * 30, "bob-token-" + "2" * 30
SERVER_SCRIPT = (Path(__file__).parent / "data" / "preview_server.pl").read_text()
MB = 1024 * 1024


def call(server, path, method="GET", body=None, token=None, headers=None):
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        all_headers["Content-Type"] = "application/json"
    status, answer_headers, payload = request(server.url + path, method, all_headers, data,
                                              timeout=60)
    return status, answer_headers, payload


def api(server, path, method="GET", body=None, token=ALICE):
    status, _, payload = call(server, path, method, body, token)
    return status, json.loads(payload) if payload else None


def new_session(server, token=ALICE, port=3000, profile=None) -> str:
    status, body = api(server, "/api/sessions", "POST",
                       {} if profile is None else {"profile": profile}, token)
    assert status == 201, body
    session_id = body["id"]
    script = ("cat > /tmp/preview_server.pl && (setsid perl /tmp/preview_server.pl"
              f" {port} >/tmp/server.log 2>&1 </dev/null &)")
    status, out = api(server, f"/api/sessions/{session_id}/exec", "POST",
                      {"argv": ["sh", "-c", script], "stdin": SERVER_SCRIPT}, token)
    assert status == 200 and out["exit_code"] == 0, out

    def listening():
        status, out = api(server, f"/api/sessions/{session_id}/exec", "POST", {
            "argv": ["sh", "-c", f"grep -qi ':{port:04X} 00000000:0000 0A' /proc/net/tcp"]},
            token)
        return status == 200 and out["exit_code"] == 0
    wait_for(listening, 20, "the session's server to listen")
    return session_id


@pytest.fixture
def tokens(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    return path


@pytest.fixture
def server(make_server, tokens):
    return make_server("--tokens", str(tokens), "--grace", "60", "--pool-size", "0")


def test_the_owner_reaches_a_port_and_nobody_else_does(server):
    session_id = new_session(server)
    root = f"/preview/{session_id}/3000"
    status, _, body = call(server, root + "/hello", token=ALICE)
    assert (status, body) == (200, b"hello from the session\n")
    # What the app sees: no credential of capsule's, capsule's forwarded headers.
    status, headers, body = call(server, root + "/headers?x=1", token=ALICE, headers={
        "Cookie": "capsule_session=secret; theme=dark", "X-Forwarded-For": "6.6.6.6"})
    head = body.decode()
    assert status == 200 and head.startswith("GET /headers?x=1 HTTP/1.1\r\n"), head
    assert "secret" not in head and ALICE not in head and "6.6.6.6" not in head
    assert "Cookie: theme=dark" in head
    assert f"X-Forwarded-Prefix: {root}" in head and "X-Forwarded-For: 127.0.0.1" in head
    assert "X-Forwarded-Proto: http" in head
    assert headers["Connection"] == "close"
    # Another user: as a missing session; nobody: 401, a browser's page: the login page.
    status, _, body = call(server, root + "/hello", token=BOB)
    assert status == 404 and json.loads(body)["code"] == "session_not_found"
    status, headers, body = call(server, root + "/hello")
    assert status == 401 and json.loads(body)["code"] == "unauthenticated"
    status, headers, _ = call(server, root + "/hello", headers={"Accept": "text/html"})
    assert status == 303 and headers["Location"].startswith("/login?next=%2Fpreview%2F")
    # The root without its slash is sent to it.
    status, headers, _ = call(server, root, token=ALICE)
    assert status == 308 and headers["Location"] == root + "/"
    # Nothing listening, and capsule's own ports.
    status, _, body = call(server, f"/preview/{session_id}/3001/", token=ALICE)
    assert status == 502 and json.loads(body) == {
        "error": "nothing listens on port 3001 in this session", "code": "nothing_listening"}
    status, _, body = call(server, f"/preview/{session_id}/7422/", token=ALICE)
    assert status == 400 and json.loads(body)["code"] == "port_not_allowed"
    status, _, body = call(server, "/preview/not-a-session/3000/", token=ALICE)
    assert status == 404
    # The rest of the site is as it was.
    assert api(server, f"/api/sessions/{session_id}")[0] == 200


def _cookie(headers) -> str:
    match = re.match(r"(capsule_preview=[^;]*)", headers["Set-Cookie"])
    assert match, headers["Set-Cookie"]
    return match.group(1)


def test_a_link_works_until_revoked_or_expired_and_a_public_port_for_anyone(server):
    session_id = new_session(server)
    root = f"/preview/{session_id}/3000"
    shares = f"/api/sessions/{session_id}/ports/3000/shares"
    status, made = api(server, shares, "POST", {"ttl": 600})
    assert status == 201 and made["port"] == 3000, made
    link = urlsplit(made["url"])
    assert link.path == root + "/__capsule_preview_auth"
    # Bob may not make one.
    assert api(server, shares, "POST", {}, BOB)[0] == 404
    # Whoever opens the link gets the preview's cookie, scoped to its path.
    status, headers, _ = call(server, f"{link.path}?{link.query}")
    assert status == 303 and headers["Location"] == root + "/"
    assert f"Path={root}" in headers["Set-Cookie"] and "HttpOnly" in headers["Set-Cookie"]
    cookie = _cookie(headers)
    status, _, body = call(server, root + "/hello", headers={"Cookie": cookie})
    assert (status, body) == (200, b"hello from the session\n")
    # The app never sees it.
    status, _, body = call(server, root + "/headers", headers={"Cookie": cookie})
    assert "capsule_preview" not in body.decode()
    # Not for another port.
    status, _, _ = call(server, f"/preview/{session_id}/3001/", headers={"Cookie": cookie})
    assert status == 401
    status, listed = api(server, shares)
    assert [s["id"] for s in listed["shares"]] == [made["id"]] and "token" not in str(listed)
    # Revoked: the cookie is worth nothing, the link neither.
    status, body = api(server, f"{shares}/{made['id']}", "DELETE")
    assert (status, body) == (200, {"id": made["id"], "revoked": True})
    assert call(server, root + "/hello", headers={"Cookie": cookie})[0] == 401
    status, _, body = call(server, f"{link.path}?{link.query}")
    assert status == 403 and json.loads(body)["code"] == "invalid_link"
    # Expired.
    status, made = api(server, shares, "POST", {"ttl": 1})
    link = urlsplit(made["url"])
    status, headers, _ = call(server, f"{link.path}?{link.query}")
    cookie = _cookie(headers)
    assert call(server, root + "/hello", headers={"Cookie": cookie})[0] == 200
    time.sleep(1.5)
    assert call(server, root + "/hello", headers={"Cookie": cookie})[0] == 401
    assert call(server, f"{link.path}?{link.query}")[0] == 403
    # Public: anyone, without a login; then the owner's only again.
    port = f"/api/sessions/{session_id}/ports/3000"
    status, body = api(server, port, "PUT", {"public": True})
    assert status == 200 and body["public"] is True and body["url"].endswith(root + "/")
    assert api(server, port, "PUT", {"public": True}, BOB)[0] == 404
    assert call(server, root + "/hello")[:3:2] == (200, b"hello from the session\n")
    assert api(server, port, "PUT", {"public": False})[0] == 200
    assert call(server, root + "/hello")[0] == 401
    assert api(server, f"/api/sessions/{session_id}/ports/7422", "PUT",
               {"public": True})[1]["code"] == "port_not_allowed"
    # The session ends: so do its previews and links.
    status, made = api(server, shares, "POST", {})
    link = urlsplit(made["url"])
    assert api(server, f"/api/sessions/{session_id}", "DELETE")[0] == 200
    assert call(server, f"{link.path}?{link.query}")[0] == 404


def _ws_echo(url: str, header: list[str], host: str | None = None) -> None:
    ws = websocket.create_connection(url, timeout=20, header=header, host=host)
    try:
        ws.send("hello, preview")
        assert ws.recv() == "hello, preview"
        blob = bytes(range(256)) * 300
        ws.send_binary(blob)
        opcode, data = ws.recv_data()
        assert opcode == websocket.ABNF.OPCODE_BINARY and data == blob
    finally:
        ws.close()


def test_a_websocket_in_the_session_echoes_through_the_preview(server):
    session_id = new_session(server)
    _ws_echo(f"ws://127.0.0.1:{server.port}/preview/{session_id}/3000/echo",
             [f"Authorization: Bearer {ALICE}"])
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(
            f"ws://127.0.0.1:{server.port}/preview/{session_id}/3000/echo", timeout=20,
            header=[f"Authorization: Bearer {BOB}"])
    assert refused.value.status_code == 404


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class _Peak:
    """
    The highest RSS of a process while it runs (sampled).
    """

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, _rss_kb(pid), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _rss_kb(self.pid))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def test_200_mb_each_way_with_capsules_memory_bounded(server):
    session_id = new_session(server)
    size = 200 * MB
    path = f"/preview/{session_id}/3000"
    before = _rss_kb(server.pid)
    with _Peak(server.pid) as peak:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        connection.request("GET", f"{path}/big?n={size}",
                           headers={"Authorization": f"Bearer {ALICE}"})
        answer = connection.getresponse()
        assert answer.status == 200
        got = 0
        while True:
            chunk = answer.read(1024 * 1024)
            if not chunk:
                break
            got += len(chunk)
        assert got == size
        connection.close()

        # Upload with a declared length, and one chunked.
        for chunked in (False, True):
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            block = b"u" * MB

            def body():
                for _ in range(size // MB):
                    yield block
            headers = {"Authorization": f"Bearer {ALICE}"}
            if not chunked:
                headers["Content-Length"] = str(size)
            connection.request("POST", f"{path}/upload", body=body(), headers=headers,
                               encode_chunked=chunked)
            answer = connection.getresponse()
            assert (answer.status, answer.read()) == (200, b"received %d" % size)
            connection.close()
    grew = (peak.peak - before) / 1024
    assert grew < 150, f"capsule's memory grew by {grew:.0f} MB for 200 MB transfers"


def _host_server(make_server, tokens, *extra):
    server = make_server("--tokens", str(tokens), "--grace", "60", "--pool-size", "0",
                         start=False)
    server.args += ["--preview-domain", f"preview.test:{server.port}",
                    "--public-url", f"http://127.0.0.1:{server.port}", *extra]
    return server.start()


def raw_get(port: int, host: str, path: str, headers=()) -> tuple[int, dict, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n".encode()
                  + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers) + b"\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    return int(lines[0].split()[1]), dict(line.split(": ", 1) for line in lines[1:]), body


def test_under_a_preview_domain_the_owner_goes_through_a_ticket(make_server, tokens):
    server = _host_server(make_server, tokens)
    session_id = new_session(server)
    host = f"3000-{session_id}.preview.test:{server.port}"
    # A token works at the host itself.
    status, _, body = raw_get(server.port, host, "/hello", [("Authorization", f"Bearer {ALICE}")])
    assert (status, body) == (200, b"hello from the session\n")
    status, _, body = raw_get(server.port, host, "/headers", [("Authorization", f"Bearer {ALICE}")])
    assert f"X-Forwarded-Host: {host}" in body.decode() and "X-Forwarded-Prefix" not in body.decode()
    assert raw_get(server.port, host, "/hello", [("Authorization", f"Bearer {BOB}")])[0] == 404
    assert raw_get(server.port, host, "/hello")[0] == 401
    # A browser without the host's cookie is sent to capsule's origin ...
    status, headers, _ = raw_get(server.port, host, "/hello?a=1", [("Accept", "text/html")])
    assert status == 303
    assert headers["Location"] == f"{server.url}/preview/{session_id}/3000/hello?a=1"
    # ... which checks its login and sends it back with a ticket ...
    status, headers, _ = call(server, f"/preview/{session_id}/3000/hello?a=1", token=ALICE)
    assert status == 303, headers
    location = urlsplit(headers["Location"])
    assert location.netloc == host and location.path == "/__capsule_preview_auth"
    # ... traded once for the host's own cookie.
    status, headers, _ = raw_get(server.port, host, f"{location.path}?{location.query}")
    assert status == 303 and headers["Location"] == "/hello?a=1"
    assert "Domain" not in headers["Set-Cookie"] and "Path=/;" in headers["Set-Cookie"]
    cookie = _cookie(headers)
    assert raw_get(server.port, host, "/hello", [("Cookie", cookie)])[0] == 200
    assert raw_get(server.port, host, f"{location.path}?{location.query}")[0] == 403
    # Another port's host: not that cookie's.
    other = f"3001-{session_id}.preview.test:{server.port}"
    assert raw_get(server.port, other, "/", [("Cookie", cookie)])[0] == 401
    # Bob at capsule's origin: a missing session.
    assert call(server, f"/preview/{session_id}/3000/", token=BOB)[0] == 404
    # A WebSocket at the host.
    _ws_echo(f"ws://127.0.0.1:{server.port}/echo", [f"Cookie: {cookie}"], host=host)
    # A link under the domain.
    status, made = api(server, f"/api/sessions/{session_id}/ports/3000/shares", "POST", {})
    link = urlsplit(made["url"])
    assert link.netloc == host, made
    status, headers, _ = raw_get(server.port, host, f"{link.path}?{link.query}")
    assert status == 303 and raw_get(server.port, host, "/hello",
                                     [("Cookie", _cookie(headers))])[0] == 200


def test_in_chromium_the_app_cannot_read_capsules_cookie(make_server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    import bcrypt
    passwords = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(b"alice-password", bcrypt.gensalt(4)).decode()
    passwords.write_text(f"alice:$2y${hashed[4:]}\n")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{ALICE}\n")
    server = _host_server(make_server, tokens, "--auth", str(passwords))
    session_id = new_session(server)
    preview = f"http://3000-{session_id}.preview.test:{server.port}/page"
    shots = Path("/tmp/shots/preview")
    shots.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--host-resolver-rules=MAP *.preview.test 127.0.0.1"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 600})
            # The preview sends the browser to log in at capsule's origin,
            # then back to the app at its own host.
            page.goto(preview)
            assert "/login" in page.url
            page.fill("input[name=username]", "alice")
            page.fill("input[name=password]", "alice-password")
            page.click("button[type=submit], input[type=submit]")
            try:
                page.wait_for_url(preview, timeout=20000)
            except Exception:
                raise AssertionError(f"at {page.url}: {page.content()[:500]}")
            text = page.text_content("#c")
            page.screenshot(path=str(shots / "preview-app.png"))
            page.set_viewport_size({"width": 390, "height": 844})
            page.screenshot(path=str(shots / "preview-app-phone.png"))
            assert text.startswith("cookies:")
            assert "capsule_session" not in text and "capsule_preview" not in text, text
            assert "app_cookie=1" in text
            # capsule's own login is intact (the app's Set-Cookie of it was dropped).
            names = {c["name"]: c for c in page.context.cookies()}
            assert names["capsule_session"]["value"] != "evil"
            assert names["capsule_session"]["domain"] == "127.0.0.1"
        finally:
            browser.close()


def test_a_slow_reader_pauses_the_sessions_side(server):
    session_id = new_session(server)
    size = 100 * MB
    before = _rss_kb(server.pid)
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(f"GET /preview/{session_id}/3000/big?n={size} HTTP/1.1\r\n"
                  f"Host: 127.0.0.1:{server.port}\r\nAuthorization: Bearer {ALICE}\r\n\r\n"
                  .encode())
        # Nothing read for a while: what the app writes waits in the
        # sockets' buffers, not in capsule.
        time.sleep(3)
        assert (_rss_kb(server.pid) - before) / 1024 < 20
        got = 0
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            got += len(chunk)
    assert got > size and got - size < 1000, got - size


def test_a_session_without_a_network_is_previewed_over_its_keepers_channels(make_server, tokens):
    """
    A session with no network of its own has no address capsule could
    connect to: its ports are reached over its keeper's stream (channels).
    """
    server = make_server("--tokens", str(tokens), "--grace", "60", "--pool-size", "0",
                         "--network", "none")
    session_id = new_session(server)
    root = f"/preview/{session_id}/3000"
    status, _, body = call(server, root + "/hello", token=ALICE)
    assert (status, body) == (200, b"hello from the session\n")
    status, _, body = call(server, root + "/headers", token=ALICE)
    assert status == 200 and body.decode().startswith("GET /headers HTTP/1.1\r\n")
    _ws_echo(f"ws://127.0.0.1:{server.port}{root}/echo", [f"Authorization: Bearer {ALICE}"])
    status, _, body = call(server, f"/preview/{session_id}/3001/", token=ALICE)
    assert status == 502 and json.loads(body)["code"] == "nothing_listening", body
    status, _, body = call(server, root + "/hello", token=BOB)
    assert status == 404


def test_a_fenced_session_is_previewed(make_server, tokens, tmp_path):
    """
    A session whose egress is fenced (capsule's internal network, no route
    out) is still reached from capsule's side for its previews.
    """
    profiles = tmp_path / "profiles.toml"
    profiles.write_text('[profiles.fenced]\negress = ["pypi.org"]\n')
    server = make_server("--tokens", str(tokens), "--grace", "60", "--pool-size", "0",
                         "--profiles", str(profiles))
    session_id = new_session(server, profile="fenced")
    status, body = api(server, f"/api/sessions/{session_id}")
    assert status == 200 and body["profile"] == "fenced", body
    status, _, body = call(server, f"/preview/{session_id}/3000/hello", token=ALICE)
    assert (status, body) == (200, b"hello from the session\n")
