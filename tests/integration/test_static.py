"""
The page's static files from a real capsule over real HTTP: compressed,
with validators, the page's node_modules URLs versioned and immutable; and,
in headless Chromium, a returning visit that loads nothing twice.
"""

import gzip
import hashlib
import re
import shutil
import time

import pytest

from tests.support.httpclient import Connection

from .harness import ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WWW = ROOT / "www"
# The quoted node_modules URLs of the page, versioned by capsule.
VERSIONED = re.compile(rb"""["'](/?node_modules/[^"'?]+)\?v=([0-9a-f]{16})["']""")
SECURITY = ("content-security-policy", "x-content-type-options", "x-frame-options",
            "referrer-policy")


@pytest.fixture
def server(make_server):
    # Every request's access line: the tests read which files were asked for.
    return make_server("--pool-size", "0", "--access-log")


def ask(connection, path: str, method: str = "GET", **headers: str):
    return connection.request(method, path, {k.replace("_", "-"): v for k, v in headers.items()})


def test_static_files_over_http(server):
    connection = Connection(server.url)
    try:
        status, headers, packed = ask(connection, "/", accept_encoding="gzip")
        assert status == 200
        assert (headers["content-encoding"], headers["vary"]) == ("gzip", "Accept-Encoding")
        assert headers["cache-control"] == "no-cache"
        assert [name for name in SECURITY if name not in headers] == []
        page = gzip.decompress(packed)
        assert int(headers["content-length"]) == len(packed)
        versioned = VERSIONED.findall(page)
        assert b"node_modules/@xterm/xterm/lib/xterm.js" in [path for path, _ in versioned]
        # The same connection answers the 304 (no body) and goes on.
        status, again, body = ask(connection, "/", accept_encoding="gzip",
                                  if_none_match=headers["etag"])
        assert (status, body, again["etag"]) == (304, b"", headers["etag"])
        assert "content-length" not in again
        assert [name for name in SECURITY if name not in again] == []
        status, plain_headers, plain = ask(connection, "/")
        assert (status, plain) == (200, page)
        assert plain_headers["etag"] != headers["etag"]

        for path, version in versioned:
            path = "/" + path.decode().lstrip("/")
            content = (WWW / path.lstrip("/")).read_bytes()
            assert hashlib.sha256(content).hexdigest()[:16] == version.decode()
            url = f"{path}?v={version.decode()}"
            status, headers, body = ask(connection, url, accept_encoding="gzip")
            assert status == 200
            assert headers["cache-control"] == "max-age=31536000, immutable"
            if headers.get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            assert body == content
            status, cached, body = ask(connection, url, accept_encoding="gzip",
                                       if_none_match=headers["etag"])
            assert (status, body) == (304, b"")
            assert cached["cache-control"] == "max-age=31536000, immutable"
            # Without its version, the same file is revalidated.
            assert ask(connection, path, "HEAD")[1]["cache-control"] == "no-cache"

        app = (WWW / "app.js").read_bytes()
        status, headers, body = ask(connection, "/app.js", "HEAD", accept_encoding="gzip")
        assert (status, body, headers["content-encoding"]) == (200, b"", "gzip")
        length = int(headers["content-length"])
        status, headers, body = ask(connection, "/app.js", accept_encoding="gzip")
        assert (status, len(body), gzip.decompress(body)) == (200, length, app)
        status, ranged, body = ask(connection, "/app.js", accept_encoding="gzip",
                                   range="bytes=10-19")
        assert (status, body) == (206, app[10:20])
        assert ranged["content-range"] == f"bytes 10-19/{len(app)}"
        assert "content-encoding" not in ranged
        status, _, body = ask(connection, "/app.js", accept_encoding="gzip",
                              range="bytes=10-19", if_range=headers["etag"])
        assert (status, gzip.decompress(body)) == (200, app)
        status, headers, body = ask(connection, "/app.js",
                                    if_modified_since=headers["last-modified"])
        assert (status, body) == (304, b"")
    finally:
        connection.close()
    assert server.unhandled_errors() == []


def _files(log: str) -> list[tuple[str, int]]:
    """
    The files a log's access lines say were asked for (not the API and the
    WebSocket, which the page uses on every visit), with their status.
    """
    return [(path, int(status)) for path, status in
            re.findall(r'"GET (\S+) HTTP/1\.1" (\d{3}) ', log)
            if not path.startswith(("/ws", "/api/"))]


def _visit(page, server) -> list[tuple[str, int]]:
    """
    Load the page: the files it asked for, up to its icon (asked for after
    the page's load event).
    """
    page.goto(server.url + "/", wait_until="load")
    files = []
    deadline = time.monotonic() + 10
    while not any(path == "/favicon.svg" for path, _ in files):
        assert time.monotonic() < deadline, f"no icon asked for: {files}"
        files += _files(server.new_log())
        time.sleep(0.05)
    return files


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine")
def test_a_returning_visit_loads_nothing_twice(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update"])
        try:
            context = browser.new_context()
            page = context.new_page()
            server.new_log()
            first = _visit(page, server)
            # What the page loads after its first prompt (js/extras.js and the addons it
            # loads) is part of the first visit too.
            page.wait_for_selector(".search-box", state="attached", timeout=15000)
            page.wait_for_selector("#terminal[data-renderer]", state="attached")
            first += _files(server.new_log())
            loaded = {path for path, status in first if status == 200}
            assert any(path.startswith("/node_modules/") and "?v=" in path for path in loaded)
            # The returning visit, in the same browser: a new navigation.
            page.goto("about:blank")
            second = _visit(page, server)
            assert [r for r in second if r[0].startswith("/node_modules/")] == []
            assert [r for r in second if r[1] != 304] == []
            assert ("/", 304) in second and ("/favicon.svg", 304) in second
        finally:
            browser.close()


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine")
def test_the_pages_inline_script_runs_under_the_policy(make_server, tmp_path):
    www = tmp_path / "www"
    shutil.copytree(WWW, www, symlinks=True)
    page = (www / "index.html").read_text()
    boot = "<script>document.documentElement.dataset.boot = 'ran';</script>"
    (www / "index.html").write_text(page.replace("<head>", "<head>\n  " + boot, 1))
    server = make_server("--pool-size", "0", "--www", str(www))
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            refused = []
            page.on("console", lambda m: refused.append(m.text)
                    if "Content Security Policy" in m.text else None)
            page.goto(server.url + "/", wait_until="load")
            assert page.evaluate("() => document.documentElement.dataset.boot") == "ran"
            assert refused == []
            # Anything else inline is still refused.
            with page.expect_console_message(lambda m: "Content Security Policy" in m.text):
                page.evaluate("""() => { const s = document.createElement('script');
                    s.textContent = "document.documentElement.dataset.other = 'ran'";
                    document.head.appendChild(s); }""")
            assert page.evaluate("() => document.documentElement.dataset.other") is None
        finally:
            browser.close()
