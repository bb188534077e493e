"""
The terminal page in a real headless Chromium against a scripted server:
the page is served from disk and its WebSocket answered by the test
(Playwright's WebSocket routing), frame by frame, so that the page's side
of the protocol is checked exactly.
"""

import base64
import functools
import http.server
import json
import re
import threading
import uuid
from pathlib import Path

import pytest

from . import test_browser
from .test_browser import CHROMIUM, WWW, shot, wait_screen, wait_text

# The browser and its pages, as in the tests against a real capsule.
browser = test_browser.browser
new_page = test_browser.new_page

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def page_url():
    """
    The page (C{www/}, or C{CAPSULE_TEST_WWW}) served by a plain HTTP server.
    """
    handler = functools.partial(_QuietHandler, directory=WWW or str(ROOT / "www"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/"
    httpd.shutdown()
    thread.join()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class ScriptedServer:
    """
    Plays capsule's side of C{/ws} for one page: records what the page sends
    and answers its first C{resize} with C{on_resize}.
    """

    def __init__(self, page, on_resize) -> None:
        self.received: list = []
        self.sockets: list = []
        self._on_resize = on_resize
        page.route_web_socket(re.compile(r"/ws(\?|$)"), self._route)

    def _route(self, ws) -> None:
        self.sockets.append(ws)
        started = []

        def on_message(message):
            self.received.append(message)
            if isinstance(message, str) and json.loads(message).get("type") == "resize" \
                    and not started:
                started.append(True)
                self._on_resize(ws)
        ws.on_message(on_message)

    def inputs(self) -> list[bytes]:
        """
        What the page sent to the shell (binary input frames).
        """
        return [m for m in self.received if isinstance(m, bytes)]

    def acked(self) -> int:
        acks = [json.loads(m)["offset"] for m in self.received
                if isinstance(m, str) and json.loads(m).get("type") == "ack"]
        return max(acks, default=-1)


def connected(ws, replay=None, offset=0, resumed=True, session_id=None):
    message = {"type": "connected", "session_id": session_id or str(uuid.uuid4()),
               "resumed": resumed, "offset": offset, "window": 1 << 20}
    if replay is not None:
        message["replay"] = replay
    ws.send(json.dumps(message))


# Queries xterm answers: focus reporting switched on (answered with the focus
# state), device attributes, colours, cursor position.
REPLAYED = (b"earlier output\r\n\x1b[?1004h\x1b[c\x1b[>c\x1b]10;?\x07\x1b]11;?\x1b\\"
            b"\x1b[6n\x1b[?1004l")
LIVE = b"live output\r\n\x1b[5n"


def until(page, predicate, what: str, timeout_ms: int = 10000) -> None:
    """
    Poll C{predicate} until true, letting Playwright deliver the page's frames.
    """
    for _ in range(timeout_ms // 50):
        if predicate():
            return
        page.wait_for_timeout(50)
    raise AssertionError(f"{what} did not happen within {timeout_ms} ms")


def wait_acked(page, server, offset: int) -> None:
    until(page, lambda: server.acked() >= offset, f"an ack of offset {offset}")


def test_page_answers_queries_after_the_replay_only(page_url, new_page):
    """
    C{connected.replay} says how many of the bytes that follow were replayed:
    xterm's answers to queries in them are not sent; answers to queries after
    them are, and so are keys typed at any time. The replay's end may fall
    inside a frame.
    """
    page = new_page()
    start = 5000

    def on_resize(ws):
        connected(ws, replay=len(REPLAYED), offset=start)
        ws.send(REPLAYED[:20])
        ws.send(REPLAYED[20:] + LIVE)

    server = ScriptedServer(page, on_resize)
    page.goto(page_url)
    wait_screen(page, r"live output")
    wait_acked(page, server, start + len(REPLAYED) + len(LIVE))
    page.locator(".xterm-helper-textarea").focus()
    page.keyboard.type("k")
    until(page, lambda: b"k" in server.inputs(), "the key press")
    # Device status report (ESC [ 5 n) is answered with "OK" (ESC [ 0 n).
    assert server.inputs() == [b"\x1b[0n", b"k"]
    assert page.errors == []


def test_page_sends_keys_typed_while_a_long_replay_is_parsed(page_url, new_page):
    """
    xterm parses a long replay piece by piece, between other tasks: keys
    typed meanwhile reach the shell, all of them and in order, and the
    queries in the replay are still not answered.
    """
    page = new_page()
    frame = (b"x" * 2000 + b"\r\n") * 30 + b"\x1b[c\x1b[6n"
    frames = [frame] * 100
    total = len(frame) * len(frames)

    def on_resize(ws):
        connected(ws, replay=total)
        for piece in frames:
            ws.send(piece)

    server = ScriptedServer(page, on_resize)
    page.goto(page_url)
    page.locator(".xterm-helper-textarea").focus()
    letters = "abcdefghijklmnopqrstuvwxyz"
    page.keyboard.type(letters, delay=5)
    until(page, lambda: len(server.inputs()) >= len(letters), "the keys", 20000)
    wait_acked(page, server, total)
    assert server.inputs() == [c.encode() for c in letters]
    assert page.errors == []


def test_page_without_replay_count_takes_nothing_for_replay(page_url, new_page):
    """
    Every capsule server says in C{connected} how much replay follows; a
    C{connected} without C{replay} has none: what follows it is live, and a
    query in it is answered.
    """
    page = new_page()

    def on_resize(ws):
        connected(ws)
        ws.send(LIVE)

    server = ScriptedServer(page, on_resize)
    page.goto(page_url)
    wait_screen(page, r"live output")
    until(page, lambda: server.inputs() == [b"\x1b[0n"], "the answer")
    wait_acked(page, server, len(LIVE))
    assert page.errors == []


def test_page_shows_notices_without_counting_them_as_output(page_url, new_page):
    """
    Notices are control messages: the status bar says them, the terminal may
    show a line of capsule's, and offsets count only the session's output.
    """
    page = new_page()

    def on_resize(ws):
        connected(ws, resumed=False, offset=0, replay=0)
        ws.send(b"$ ")

    server = ScriptedServer(page, on_resize)
    page.goto(page_url)
    page.wait_for_selector('#status[data-state="connected"]')
    ws = server.sockets[0]

    ws.send(json.dumps({"type": "notice", "code": "engine_away",
                        "message": "the Docker engine does not answer"}))
    wait_text(page, "#status-message", r"^capsule is waiting for the Docker engine$")
    assert page.get_attribute("#status", "data-state") == "connected"
    assert page.get_attribute("#status", "data-engine") == "away"
    shot(page, "engine-away")

    ws.send(json.dumps({"type": "notice", "code": "engine_back", "message": "back"}))
    wait_text(page, "#status-message", r"^the Docker engine is back$")
    assert page.get_attribute("#status", "data-engine") is None

    ws.send(json.dumps({"type": "notice", "code": "shell_restarted",
                        "message": "the session's shell was restarted"}))
    wait_text(page, "#status-message", r"^the session's shell was restarted$")
    wait_screen(page, r"\[capsule\] the session's shell was restarted")
    ws.send(json.dumps({"type": "notice", "code": "something_new", "message": "a new notice"}))
    wait_text(page, "#status-message", r"^a new notice$")
    ws.send(json.dumps({"type": "notice", "code": "disk_limit",
                        "message": "the session has written 45.0 MiB of its 50.0 MiB"}))
    wait_text(page, "#status-message", r"^the session has written 45\.0 MiB of its 50\.0 MiB$")
    wait_screen(page, r"\[capsule\] the session has written 45\.0 MiB")

    ws.send(b"after")
    wait_screen(page, r"after")
    wait_acked(page, server, len(b"$ after"))
    assert server.acked() == len(b"$ after")
    assert page.errors == []


def test_page_json_output_replay_count(page_url, new_page):
    """
    The JSON protocol's C{replay} counts decoded output bytes.
    """
    page = new_page()

    def on_resize(ws):
        connected(ws, replay=len(REPLAYED))
        for piece in (REPLAYED[:10], REPLAYED[10:] + LIVE):
            ws.send(json.dumps({"type": "output", "data": base64.b64encode(piece).decode()}))

    server = ScriptedServer(page, on_resize)
    # A server that does not select the binary protocol (after the routing's own script).
    page.add_init_script("""
        const Routed = window.WebSocket;
        window.WebSocket = class extends Routed {
            get protocol() { return ""; }
            set protocol(value) {}
        };
    """)
    page.goto(page_url)
    wait_screen(page, r"live output")
    def inputs():
        return [json.loads(m)["data"] for m in server.received
                if isinstance(m, str) and json.loads(m).get("type") == "input"]
    until(page, inputs, "the answer")
    assert inputs() == ["\x1b[0n"]
    assert server.inputs() == []
    assert page.errors == []
