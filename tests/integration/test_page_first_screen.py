"""
The page's first screen, in a real headless Chromium: index.html's
bootstrap draws the session's first output as text (C{#first-screen})
before xterm.js and app.js run; app.js then hands every byte to xterm.js
once, and the text gives way to the terminal.  Keys typed at the first
screen reach the shell once.

Against a scripted server (the page from disk, its WebSocket answered by
the test), with app.js held back so that the first screen is seen alone;
and against a real capsule.
"""

import re
import uuid

import pytest

from . import test_browser
from .test_browser import CHROMIUM, page_args, screen, wait_screen
from .test_page_bootstrap import HeldScripts
from .test_page_protocol import ScriptedServer, connected, page_url, until  # noqa: F401

browser = test_browser.browser
new_page = test_browser.new_page

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine")

TITLE = b"\x1b]0;developer@capsule: /workspace\x07"
PROMPT = (b"\x1b[?2004h" + TITLE + b"\x1b[1;32mdeveloper@capsule\x1b[0m:\x1b[1;34m/workspace"
          b"\x1b[0m$ ")
SHOWN = "developer@capsule:/workspace$"


def first_screen(page) -> dict:
    """
    What the first screen shows: whether it is there, visible, its text.
    """
    return page.evaluate("""() => {
        const el = document.getElementById("first-screen");
        return el === null ? {there: false}
            : {there: true, visible: el.checkVisibility(), text: el.textContent,
               colour: el.querySelector("span") && getComputedStyle(
                   el.querySelector("span")).color};
    }""")


@pytest.mark.parametrize("resumed", [False, True])
def test_first_screen_is_drawn_before_xterm_and_gives_way_to_it(page_url, new_page, resumed):
    """
    The prompt is shown while app.js is held back; once it runs, xterm.js
    shows the same output exactly once (no byte lost or written twice), the
    first screen is gone, and what the bootstrap received is acknowledged.
    """
    page = new_page()
    output = b"banner line\r\n" + PROMPT

    def on_resize(ws):
        connected(ws, resumed=resumed, offset=0, replay=len(output) if resumed else 0,
                  session_id=str(uuid.uuid4()))
        ws.send(output[:20])
        ws.send(output[20:])

    server = ScriptedServer(page, on_resize)
    held = HeldScripts(page)
    page.goto(page_url, wait_until="commit")
    until(page, lambda: SHOWN in (first_screen(page).get("text") or ""), "the first screen")
    shown = first_screen(page)
    assert shown["visible"]
    assert [line.rstrip() for line in shown["text"].splitlines()[:2]] == ["banner line", SHOWN]
    # The cursor: a cell of its own after the prompt's space.
    assert page.evaluate("document.querySelector('#first-screen .cursor').textContent") == " "
    assert page.query_selector(".xterm-rows") is None  # xterm.js has not drawn anything
    held.release()
    wait_screen(page, re.escape(SHOWN))
    until(page, lambda: not first_screen(page)["there"], "the first screen to go")
    text = screen(page)
    assert text.count("banner line") == 1 and text.count(SHOWN) == 1
    until(page, lambda: server.acked() == len(output), "the ack of all the output")
    assert len(server.sockets) == 1
    assert page.errors == []


def test_keys_typed_at_the_first_screen_reach_the_shell_once(page_url, new_page):
    """
    Keys typed before xterm.js runs go to the shell on the bootstrap's
    socket, in order; once app.js runs, a key goes once, through xterm.js.
    """
    page = new_page()

    def on_resize(ws):
        connected(ws, resumed=False, offset=0, replay=0, session_id=str(uuid.uuid4()))
        ws.send(PROMPT)

    server = ScriptedServer(page, on_resize)
    held = HeldScripts(page)
    page.goto(page_url, wait_until="commit")
    until(page, lambda: SHOWN in (first_screen(page).get("text") or ""), "the first screen")
    page.keyboard.type("ls")
    page.keyboard.press("Enter")
    page.keyboard.press("Control+C")
    until(page, lambda: len(server.inputs()) == 4, "the keys")
    assert server.inputs() == [b"l", b"s", b"\r", b"\x03"]
    held.release()
    page.wait_for_selector('#status[data-state="connected"]')
    until(page, lambda: not first_screen(page)["there"], "the first screen to go")
    page.locator(".xterm-helper-textarea").focus()
    page.keyboard.type("k")
    until(page, lambda: len(server.inputs()) == 5, "the key through xterm.js")
    page.wait_for_timeout(300)
    assert server.inputs() == [b"l", b"s", b"\r", b"\x03", b"k"]
    assert page.errors == []


@pytest.mark.parametrize("output, expected", [
    (b"$ vim\r\n\x1b[?1049h\x1b[Hfull screen", "full screen"),  # another screen
    ("wide 中文\r\n".encode(), "wide"),  # two cells each, left to xterm.js's widths
])
def test_output_the_first_screen_cannot_draw_waits_for_xterm(page_url, new_page, output,
                                                              expected):
    """
    The first screen does not show what it cannot draw as xterm.js would;
    xterm.js then shows all of it.
    """
    page = new_page()

    def on_resize(ws):
        connected(ws, resumed=False, offset=0, replay=0, session_id=str(uuid.uuid4()))
        ws.send(output)

    server = ScriptedServer(page, on_resize)
    held = HeldScripts(page)
    page.goto(page_url, wait_until="commit")
    until(page, lambda: page.evaluate("window.capsuleBoot && window.capsuleBoot.frames.length")
          == 2 and held.asked_at, "the output")
    page.wait_for_timeout(200)
    assert not first_screen(page)["visible"]
    held.release()
    wait_screen(page, expected)
    until(page, lambda: server.acked() == len(output), "the ack")
    assert not first_screen(page)["there"]
    assert page.errors == []


def test_first_screen_under_capsules_policy(make_server, new_page):
    """
    Against a real capsule: the first screen shows the session's prompt
    under capsule's Content-Security-Policy, and the terminal takes over.
    """
    server = make_server(*page_args("--grace", "30", "--pool-size", "1"))
    page = new_page()
    violations = []
    page.on("console", lambda m: violations.append(m.text)
            if "Content Security Policy" in m.text else None)
    page.goto(server.url + "/")
    wait_screen(page, r"@capsule:\S*\$", timeout=30000)
    until(page, lambda: not first_screen(page)["there"], "the first screen to go")
    assert violations == []
    assert screen(page).count("@capsule") == 1
    assert page.errors == []
