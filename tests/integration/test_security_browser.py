"""
Browser-side attacks against a real twistd capsule: a foreign Origin, a
rebinding Host (a name the attacker's DNS points at 127.0.0.1), an origin of
the wrong scheme, and the security headers; then the page itself in a real
headless Chromium, which must still work under its Content-Security-Policy,
and must not load for a rebinding name nor inside another site's frame.

C{CAPSULE_SCREENSHOTS} names a directory that receives screenshots.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.support import httpclient
from tests.support.httpclient import Response

from .harness import free_port, wait_for

CHROMIUM = (os.environ.get("CAPSULE_CHROMIUM") or shutil.which("chromium")
            or shutil.which("chromium-browser"))
SCREENSHOTS = os.environ.get("CAPSULE_SCREENSHOTS")


def request(server, path: str, host: str, method: str = "GET",
            headers: dict | None = None) -> Response:
    return httpclient.request(server.url + path, method, {"Host": host, **(headers or {})})


def upgrade(server, host: str, origin: str | None) -> str:
    """
    The status line the server answers a WebSocket upgrade with.
    """
    return httpclient.status_line(server.ws_url, httpclient.upgrade_headers(origin), host=host)


def test_origins_and_hosts_at_the_websocket_upgrade(server):
    here = f"127.0.0.1:{server.port}"
    switching = "HTTP/1.1 101 Switching Protocols"
    assert upgrade(server, here, f"http://{here}") == switching
    assert upgrade(server, f"localhost:{server.port}", f"http://localhost:{server.port}") \
        == switching
    # Not a browser: no Origin.
    assert upgrade(server, here, None) == switching
    # Another site's page.
    assert upgrade(server, here, "https://evil.example") \
        == "HTTP/1.1 403 origin https://evil.example is not allowed"
    # DNS rebinding: evil.example resolved to 127.0.0.1, so the browser
    # sends the attacker's name as both Origin and Host.
    evil = f"evil.example:{server.port}"
    assert upgrade(server, evil, f"http://{evil}").startswith("HTTP/1.1 403 ")
    assert upgrade(server, evil, None).startswith("HTTP/1.1 403 ")
    # The right host and port, the wrong scheme.
    assert upgrade(server, here, f"https://{here}") \
        == f"HTTP/1.1 403 origin https://{here} is not allowed"
    # The right host, the wrong port.
    assert upgrade(server, here, f"http://127.0.0.1:{server.port + 1}").startswith(
        "HTTP/1.1 403 ")
    log = server.log()
    assert f"refused a request for host {evil} (peer 127.0.0.1)" in log
    assert "refused a WebSocket: origin https://evil.example is not allowed" in log
    # The accepted upgrades had a session started at once (it overlaps the
    # handshake); their clients left before a first frame, so none stays.
    deadline = time.monotonic() + 30
    while server.health()[1]["sessions"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.health()[1]["sessions"] == 0


def test_a_rebinding_host_gets_421_on_every_path(server):
    evil = f"evil.example:{server.port}"
    for path in ("/", "/app.js", "/health", f"/api/export/{uuid.uuid4()}"):
        status, headers, body = request(server, path, evil)
        assert status == 421, path
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["code"] == "host_not_allowed"
    status, _, _ = request(server, "/health", f"127.0.0.1:{server.port}")
    assert status == 200


def test_a_state_changing_request_from_another_origin_is_refused(server):
    here = f"127.0.0.1:{server.port}"
    status, _, body = request(server, "/health", here, "POST",
                              {"Origin": "https://evil.example", "Content-Length": "0"})
    assert status == 403
    assert json.loads(body) == {"error": "origin https://evil.example is not allowed",
                                "code": "origin_not_allowed"}
    # The page's own origin goes on to the resource (which answers GET only).
    status, _, _ = request(server, "/health", here, "POST",
                           {"Origin": f"http://{here}", "Content-Length": "0"})
    assert status == 405


def test_every_answer_has_the_security_headers(server):
    here = f"127.0.0.1:{server.port}"
    for path, expected in (("/", 200), ("/app.js", 200), ("/health", 200),
                           (f"/api/export/{uuid.uuid4()}", 404), ("/nothing", 404)):
        status, headers, _ = request(server, path, here)
        assert status == expected, path
        csp = headers["content-security-policy"]
        # An export's answer may be framed by the page's own origin only.
        ancestors = "'self'" if path.startswith("/api/export/") else "'none'"
        assert f"frame-ancestors {ancestors}" in csp, path
        # The page may add the hashes of its own inline scripts; nothing else runs inline.
        # WebAssembly compiles (the "while you were away" player); eval() of JavaScript does not.
        scripts = (r"script-src 'self' 'wasm-unsafe-eval'( 'sha256-[A-Za-z0-9+/]+=*')+;"
                   if path == "/" else r"script-src 'self' 'wasm-unsafe-eval';")
        assert re.search(scripts, csp) and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0], path
        assert headers["x-content-type-options"] == "nosniff", path
        assert headers["referrer-policy"] == "no-referrer", path
        # Plain HTTP: no HSTS.
        assert "strict-transport-security" not in headers, path


# -- the page in Chromium --------------------------------------------------------------


def shot(page, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"))


@pytest.fixture
def chromium(server):
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync",
                  # The attacker's DNS, answering with the victim's loopback.
                  "--host-resolver-rules=MAP evil.example 127.0.0.1"])
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser):
    context = browser.new_context(viewport={"width": 1000, "height": 600})
    page = context.new_page()
    page.errors = []
    page.violations = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("console", lambda m: page.violations.append(m.text)
            if "Content Security Policy" in m.text else None)
    return page


def test_the_page_works_under_its_policy(server, chromium):
    page = new_page(chromium)
    page.add_init_script("""
        window.__violations = [];
        document.addEventListener('securitypolicyviolation',
            e => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));
    """)
    page.goto(server.url + "/")
    page.wait_for_selector('#status[data-state="connected"]', timeout=20000)
    page.wait_for_function(
        "() => /developer@capsule/.test(document.querySelector('.xterm-rows').innerText)",
        timeout=15000)
    page.locator(".xterm-helper-textarea").focus()
    page.keyboard.type("echo $((6*7))__CSP")
    page.keyboard.press("Enter")
    page.wait_for_function(
        "() => /42__CSP/.test(document.querySelector('.xterm-rows').innerText)",
        timeout=15000)
    shot(page, "security-page-under-csp")
    assert page.evaluate("window.__violations") == []
    assert page.violations == []
    assert page.errors == []


def test_a_rebinding_name_gets_no_page_and_no_terminal(server, chromium):
    page = new_page(chromium)
    evil = f"http://evil.example:{server.port}"
    response = page.goto(evil + "/")
    assert response.status == 421
    assert json.loads(page.inner_text("body"))["code"] == "host_not_allowed"
    shot(page, "security-rebinding-refused")
    # The attacker's page, served before the name was rebound to 127.0.0.1,
    # opens the terminal's WebSocket at its own name.
    page.route(evil + "/attack", lambda route: route.fulfill(
        status=200, content_type="text/html", body="<!doctype html><title>attack</title>"))
    page.goto(evil + "/attack")
    closed = page.evaluate("""url => new Promise(resolve => {
        const ws = new WebSocket(url);
        ws.onopen = () => resolve('open');
        ws.onclose = e => resolve('closed ' + e.code);
    })""", f"ws://evil.example:{server.port}/ws")
    assert closed == "closed 1006"
    assert f"refused a request for host evil.example:{server.port}" in server.log()
    assert server.health()[1]["sessions"] == 0


def test_the_page_does_not_load_in_another_sites_frame(server, chromium):
    page = new_page(chromium)
    page.route("http://attacker.example/", lambda route: route.fulfill(
        status=200, content_type="text/html",
        body=f'<!doctype html><iframe id="f" src="{server.url}/"></iframe>'))
    # The main frame's load waits for its iframe's.
    page.goto("http://attacker.example/")
    assert [frame.url for frame in page.frames] == [
        "http://attacker.example/", "chrome-error://chromewebdata/"]
    shot(page, "security-frame-refused")


# -- under TLS ---------------------------------------------------------------------------


@pytest.fixture
def tls_server(make_server, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    port = free_port()
    server = make_server("--listen", f"ssl:{port}:interface=127.0.0.1:privateKey={key}"
                         f":certKey={cert}")
    server.tls_port = port
    return server


def tls_upgrade(port: int, host: str, origin: str | None) -> str:
    return httpclient.status_line(f"wss://127.0.0.1:{port}/ws", httpclient.upgrade_headers(origin),
                                  host=host, context=ssl._create_unverified_context())


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_under_tls_hsts_and_https_origins(tls_server):
    port = tls_server.tls_port
    context = ssl._create_unverified_context()
    # The listeners open together; the TLS one may follow the plain one.
    wait_for(lambda: _accepts(port), 30, f"the TLS listener on {port}")
    response = httpclient.request(f"https://127.0.0.1:{port}/", context=context)
    assert response.status == 200
    assert response.headers["strict-transport-security"] == "max-age=31536000"
    assert f"connect-src 'self' wss://127.0.0.1:{port};" in response.headers[
        "content-security-policy"]
    here = f"127.0.0.1:{port}"
    assert tls_upgrade(port, here, f"https://{here}") == "HTTP/1.1 101 Switching Protocols"
    assert tls_upgrade(port, here, f"http://{here}") \
        == f"HTTP/1.1 403 origin http://{here} is not allowed"
    assert tls_upgrade(port, f"evil.example:{port}", f"https://evil.example:{port}") \
        .startswith("HTTP/1.1 403 ")
    # The plain listener of the same server: no HSTS.
    status, headers, _ = request(tls_server, "/", f"127.0.0.1:{tls_server.port}")
    assert status == 200 and "strict-transport-security" not in headers


def test_behind_a_proxy_the_public_url_is_the_name_and_the_origin(make_server):
    # A proxy ending TLS for https://capsule.example passes Host on to a
    # plain loopback listener.
    server = make_server("--public-url", "https://capsule.example")
    status, headers, _ = request(server, "/", "capsule.example")
    assert status == 200
    assert headers["strict-transport-security"] == "max-age=31536000"
    assert "connect-src 'self' wss://capsule.example:443;" in headers["content-security-policy"]
    assert request(server, "/", "other.example")[0] == 421
    assert request(server, "/", "capsule.example:3001")[0] == 421
    assert upgrade(server, "capsule.example", "https://capsule.example") \
        == "HTTP/1.1 101 Switching Protocols"
    assert upgrade(server, "capsule.example", "http://capsule.example") \
        == "HTTP/1.1 403 origin http://capsule.example is not allowed"
    # On loopback, the machine itself may still ask by a loopback name,
    # but a page there is not the public URL's.
    here = f"127.0.0.1:{server.port}"
    assert request(server, "/health", here)[0] == 200
    assert upgrade(server, here, None) == "HTTP/1.1 101 Switching Protocols"
    assert upgrade(server, here, f"http://{here}") \
        == f"HTTP/1.1 403 origin http://{here} is not allowed"
