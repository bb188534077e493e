"""
The page's inline bootstrap, in a real headless Chromium: it opens the
WebSocket before the terminal's scripts load, at the size the terminal will
have, and app.js takes the socket over with what arrived meanwhile.

Against a scripted server (the page from disk, its WebSocket answered by
the test), with app.js held back so that the bootstrap's part is seen; and
against a real capsule, whose Content-Security-Policy must let it run.
"""

import json
import re
import threading
import time
import uuid

import pytest

from . import test_browser
from .test_browser import CHROMIUM, open_session, page_args, screen, type_line, wait_screen
from .test_page_protocol import ScriptedServer, connected, page_url, until  # noqa: F401

browser = test_browser.browser
new_page = test_browser.new_page

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine")


def resizes(server) -> list:
    return [(m["cols"], m["rows"]) for m in map(json.loads, filter(lambda m: isinstance(m, str),
                                                                  server.received))
            if m.get("type") == "resize"]


LINE = "x" * 600


def terminal_size(page) -> tuple:
    """
    The terminal's size as xterm drew it, once LINE was written: the cells
    of a row it filled (it wraps at its columns), and its rows.
    """
    wait_screen(page, "x{600}".replace("{600}", "{2,}"))
    return tuple(page.evaluate("""() => {
        const rows = Array.from(document.querySelectorAll(".xterm-rows > div"));
        const full = rows.map((row) => row.textContent).find((text) => /^x+$/.test(text));
        return [full.length, rows.length];
    }"""))


class HeldScripts:
    """
    Holds app.js back until L{release}, and notes when the page asked for it.
    """

    def __init__(self, page) -> None:
        self.asked_at = None
        self._go = threading.Event()
        self._pending = []
        page.route(re.compile(r"/app\.js(\?|$)"), self._route)

    def _route(self, route) -> None:
        self.asked_at = time.monotonic()
        self._pending.append(route)

    def release(self) -> None:
        for route in self._pending:
            route.continue_()
        self._pending = []


@pytest.mark.parametrize("width, height, scale", [
    (1000, 600, 1), (1280, 720, 1), (640, 480, 1), (333, 517, 1), (1000, 600, 2),
    (901, 702, 1.5),
])
def test_bootstrap_sends_the_size_the_terminal_gets(page_url, browser, width, height, scale):
    """
    The bootstrap's size (sent while app.js is held back) is the one xterm's
    fit gives the terminal: no second resize follows.
    """
    context = browser.new_context(viewport={"width": width, "height": height},
                                  device_scale_factor=scale)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    def on_resize(ws):
        connected(ws, resumed=False, offset=0, replay=0, session_id=str(uuid.uuid4()))
        ws.send(b"$ ")

    server = ScriptedServer(page, on_resize)
    held = HeldScripts(page)
    page.goto(page_url, wait_until="commit")
    until(page, lambda: resizes(server) and held.asked_at, "the bootstrap's resize")
    held.release()
    page.wait_for_selector('#status[data-state="connected"]')
    # A key sent after app.js started: a resize it needed went before it.
    page.locator(".xterm-helper-textarea").focus()
    page.keyboard.type("k")
    until(page, lambda: server.inputs() == [b"k"], "the key press")
    server.sockets[0].send(("\r\n" + LINE).encode())
    assert resizes(server) == [terminal_size(page)]
    # The URL carries the same size: capsule needs no resize before the first output.
    assert re.search(r"/ws\?cols=(\d+)&rows=(\d+)$", server.sockets[0].url).groups() == tuple(
        str(n) for n in terminal_size(page))
    assert errors == []
    context.close()


def test_a_wrong_estimate_is_corrected_by_a_resize(page_url, new_page):
    """
    Where the bootstrap's estimate misses (here it is told of a narrower
    window than the terminal gets), app.js sends the terminal's own size.
    """
    page = new_page()
    page.add_init_script("Object.defineProperty(window, 'innerWidth', { get: () => 500 });")

    def on_resize(ws):
        connected(ws, resumed=False, offset=0, replay=0, session_id=str(uuid.uuid4()))
        ws.send(b"$ ")

    server = ScriptedServer(page, on_resize)
    held = HeldScripts(page)
    page.goto(page_url, wait_until="commit")
    until(page, lambda: resizes(server) and held.asked_at, "the bootstrap's resize")
    held.release()
    page.wait_for_selector('#status[data-state="connected"]')
    until(page, lambda: len(resizes(server)) == 2, "the second resize")
    server.sockets[0].send(("\r\n" + LINE).encode())
    first, second = resizes(server)
    assert second == terminal_size(page)
    assert first[0] < second[0] and first[1] == second[1]
    assert page.errors == []


def test_bootstrap_opens_the_socket_before_the_scripts_and_hands_over_its_frames(
        page_url, new_page):
    """
    The WebSocket is open, and the session's first output has arrived, while
    app.js is still being fetched; app.js then shows that output, speaks on
    the same socket and acknowledges what the bootstrap received.
    """
    page = new_page()
    opened = []
    session_id = str(uuid.uuid4())

    def on_resize(ws):
        opened.append(time.monotonic())
        connected(ws, resumed=False, offset=0, replay=0, session_id=session_id)
        ws.send(b"banner\r\n")
        ws.send(b"$ ")

    server = ScriptedServer(page, on_resize)
    held = HeldScripts(page)
    page.goto(page_url, wait_until="commit")
    until(page, lambda: opened and held.asked_at, "the socket and the request for app.js")
    assert page.evaluate("window.capsuleBoot.frames.length") == 3
    held.release()
    page.wait_for_selector('#status[data-state="connected"]')
    wait_screen(page, r"banner")
    assert page.evaluate("window.capsuleBoot") is None
    assert len(server.sockets) == 1
    assert page.get_attribute("#session", "title") == session_id
    until(page, lambda: server.acked() == len(b"banner\r\n$ "), "the ack")
    page.locator(".xterm-helper-textarea").focus()
    page.keyboard.type("k")
    until(page, lambda: server.inputs() == [b"k"], "the key press")
    assert page.errors == []


def test_bootstrap_resumes_this_tabs_session(page_url, new_page):
    """
    After a reload the bootstrap resumes the tab's session from offset 0,
    as app.js would; a socket that closed before app.js loaded is taken
    over closed: what it received is shown, and app.js resumes from there.
    """
    page = new_page()
    session_id = str(uuid.uuid4())
    plan = ["first", "closes", "resumed"]

    def on_resize(ws):
        step = plan.pop(0)
        if step == "first":
            connected(ws, resumed=False, offset=0, replay=0, session_id=session_id)
            ws.send(b"0123456789")
        elif step == "closes":
            connected(ws, resumed=True, offset=0, replay=10, session_id=session_id)
            ws.send(b"0123456789")
            ws.send(b"abc")
            ws.close(code=4001, reason="capsule is restarting")
        else:
            connected(ws, resumed=True, offset=13, replay=0, session_id=session_id)
            ws.send(b"XYZ")

    server = ScriptedServer(page, on_resize)
    page.goto(page_url)
    wait_screen(page, "0123456789")
    held = HeldScripts(page)
    page.reload(wait_until="commit")
    until(page, lambda: len(server.sockets) == 2 and held.asked_at, "the bootstrap's socket")
    assert re.search(rf"/ws\?session_id={session_id}&offset=0&cols=\d+&rows=\d+$",
                     server.sockets[1].url)
    until(page, lambda: page.evaluate("window.capsuleBoot && window.capsuleBoot.closed"),
          "the close")
    held.release()
    wait_screen(page, "0123456789abcXYZ", timeout=15000)
    assert server.sockets[2].url.endswith(f"/ws?session_id={session_id}&offset=13")
    assert page.errors == []


def test_bootstrap_runs_under_capsules_policy(make_server, new_page):
    """
    Against a real capsule: the bootstrap is allowed by capsule's
    Content-Security-Policy and opens the page's socket, and the shell sees
    the terminal's size.
    """
    server = make_server(*page_args("--grace", "30"))
    page = new_page()
    violations = []
    page.on("console", lambda m: violations.append(m.text)
            if "Content Security Policy" in m.text else None)
    page.add_init_script("""
        window.__sockets = [];
        const Real = window.WebSocket;
        window.WebSocket = class extends Real {
            constructor(...args) {
                super(...args);
                window.__sockets.push(document.currentScript
                    ? (document.currentScript.src || "inline") : "later");
            }
        };
    """)
    open_session(page, server.url)
    assert violations == []
    assert page.evaluate("window.__sockets") == ["inline"]
    type_line(page, "clear; echo SZ $(stty size) ZS; printf 'x%.0s' {1..600}; echo")
    wait_screen(page, r"SZ\s+\d+\s+\d+\s+ZS")
    rows, cols = map(int, re.search(r"SZ\s+(\d+)\s+(\d+)\s+ZS", screen(page)).groups())
    assert (cols, rows) == terminal_size(page)
    assert page.errors == []


def test_bootstrap_lets_go_of_a_socket_past_its_buffer(page_url, new_page):
    """
    Past 8 MiB held for app.js, the bootstrap closes its socket; app.js
    shows what it held and resumes just past it.  (capsule's flow window,
    1 MiB by default, keeps it from getting there.)
    """
    page = new_page()
    session_id = str(uuid.uuid4())
    mib = 1024 * 1024
    piece = (b"y" * 1023 + b"\n") * 1024
    plan = ["flood", "resumed"]

    def on_resize(ws):
        if plan.pop(0) == "flood":
            connected(ws, resumed=False, offset=0, replay=0, session_id=session_id)
            for _ in range(9):
                ws.send(piece)
        else:
            connected(ws, resumed=True, offset=8 * mib, replay=0, session_id=session_id)
            ws.send(b"\r\nAFTER-THE-FLOOD")

    server = ScriptedServer(page, on_resize)
    held = HeldScripts(page)
    page.goto(page_url, wait_until="commit")
    until(page, lambda: page.evaluate("window.capsuleBoot && window.capsuleBoot.closed"),
          "the bootstrap's close", 30000)
    assert page.evaluate("window.capsuleBoot.closed") == 4000
    # `connected` and the first 8 MiB: what came after the close is not delivered.
    assert page.evaluate("window.capsuleBoot.frames.length") == 9
    assert 8 * mib < page.evaluate("window.capsuleBoot.bytes") < 8 * mib + 1024
    held.release()
    wait_screen(page, "AFTER-THE-FLOOD", timeout=30000)
    assert len(server.sockets) == 2
    assert server.sockets[1].url.endswith(f"/ws?session_id={session_id}&offset={8 * mib}")
    assert page.errors == []


@pytest.mark.parametrize("broken", [
    # A browser without OffscreenCanvas: the bootstrap opens nothing.
    "delete window.OffscreenCanvas;",
    # A font that measures as nothing: the socket the bootstrap opened
    # first (before measuring) is closed at once, before it sends anything.
    "OffscreenCanvasRenderingContext2D.prototype.measureText = () => ({width: 0,"
    " fontBoundingBoxAscent: 0, fontBoundingBoxDescent: 0});",
])
def test_a_bootstrap_that_cannot_measure_leaves_the_connection_to_app_js(
        page_url, new_page, broken):
    """
    The bootstrap hands app.js no socket when it cannot tell the terminal's
    size; app.js connects by itself, and its socket is the only one that
    says anything.
    """
    page = new_page()
    page.add_init_script(broken)
    session_id = str(uuid.uuid4())

    def on_resize(ws):
        connected(ws, resumed=False, offset=0, replay=0, session_id=session_id)
        ws.send(b"banner\r\n$ ")

    server = ScriptedServer(page, on_resize)
    held = HeldScripts(page)
    page.goto(page_url, wait_until="commit")
    until(page, lambda: held.asked_at, "the request for app.js")
    assert page.evaluate("window.capsuleBoot") is None
    held.release()
    page.wait_for_selector('#status[data-state="connected"]')
    wait_screen(page, r"banner")
    assert page.get_attribute("#session", "title") == session_id
    # One resize in all, from app.js, at the size xterm drew.
    assert len(resizes(server)) == 1
    page.locator(".xterm-helper-textarea").focus()
    page.keyboard.type("k")
    until(page, lambda: server.inputs() == [b"k"], "the key press")
    assert page.errors == []


def test_a_page_whose_files_did_not_load_loads_again_on_its_session(make_server, new_page):
    """
    A module of the page that did not load (as when the browser's network
    changes under it: Chromium ends the requests in flight, net::
    ERR_NETWORK_CHANGED) would leave the page connecting forever: the
    bootstrap loads the page again, once, on the session its socket had,
    so no second session is made.
    """
    server = make_server(*page_args("--grace", "30"))
    page = new_page()
    documents = []

    def route(route):
        request = route.request
        if request.resource_type == "document":
            documents.append(request.url)
        if request.url.endswith("/js/status.js") and len(documents) == 1:
            route.abort("internetdisconnected")
        else:
            route.continue_()
    page.route("**/*", route)
    session_id = open_session(page, server.url)
    assert len(documents) == 2, documents
    type_line(page, "echo again-$((6*7))")
    wait_screen(page, r"again-42")
    status, _, body = server.get("/api/sessions")
    assert status == 200
    assert [s["id"] for s in json.loads(body)["sessions"]] == [session_id]
