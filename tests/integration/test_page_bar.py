"""
The status bar and the banner in a real headless Chromium against a real
capsule: a refusal shown whole with what to do, a countdown and "Try now";
Upload and Export while disconnected; "new session" for a moment only; who
is logged in; a session id the API takes; and what closing the tab would do.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import websocket  # websocket-client

from .test_browser import (  # noqa: F401 (fixtures)
    CHROMIUM,
    SCREENSHOTS,
    browser,
    page_args,
    type_line,
    wait_screen,
    wait_text,
)
from .test_page_auth import htpasswd, log_in  # noqa: F401 (fixtures)
from .test_page_keep import no_retention
from .test_security_auth import PASSWORDS, http

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine")

DESKTOP = {"width": 1000, "height": 600}
PHONE = {"width": 390, "height": 844}


def new_page(browser, viewport=DESKTOP, ratio=1, **options):
    context = browser.new_context(viewport=viewport, device_scale_factor=ratio, **options)
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    return page


def shot(page, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"))


def hold_session(server) -> websocket.WebSocket:
    """
    A session of capsule's, held open by a WebSocket of the test's.
    """
    ws = websocket.create_connection(server.ws_url, timeout=30)
    ws.send(json.dumps({"type": "resize", "cols": 80, "rows": 24}))
    assert json.loads(ws.recv())["type"] == "connected"
    return ws


def shown_whole(page, selector: str) -> bool:
    """
    Whether the element is on screen with none of its text cut off.
    """
    return page.evaluate("""(s) => {
        const e = document.querySelector(s);
        const box = e.getBoundingClientRect();
        return box.width > 0 && box.top >= 0 && box.left >= 0 && box.bottom <= innerHeight
            && box.right <= innerWidth && e.scrollWidth <= e.clientWidth
            && e.scrollHeight <= e.clientHeight;
    }""", selector)


FULL = "the server is full (1 sessions): try again later"


def test_a_refusal_is_shown_whole_with_a_countdown_and_try_now(make_server, browser):
    """
    A full capsule refuses the page's new session: the banner over the
    terminal shows the server's whole sentence, what can be done, a
    countdown to the next attempt and "Try now" (which tries at once); once
    the server has room the page connects by itself and the banner goes.
    """
    server = make_server(*page_args("--max-sessions", "1", "--pool-size", "0", "--grace", "1"),
                         tuning={"cleanup-interval": 0.5})
    holder = hold_session(server)
    try:
        for name, viewport, ratio in [("desktop-1x", DESKTOP, 1), ("desktop-2x", DESKTOP, 2),
                                      ("phone-2x", PHONE, 2)]:
            page = new_page(browser, viewport, ratio)
            sockets = []
            page.on("websocket", lambda ws: sockets.append(ws.url))
            page.goto(server.url + "/")
            page.wait_for_selector("#banner", state="visible", timeout=20000)
            assert page.inner_text("#banner-title") == "capsule is full"
            assert page.inner_text("#banner-message") == FULL
            assert "tries again by itself" in page.inner_text("#banner-hint")
            wait_text(page, "#banner-countdown", r"^next try in \d+ s \(attempt \d+\)$")
            shot(page, f"refusal-{name}")
            for selector in ("#banner", "#banner-message", "#banner-hint"):
                assert shown_whole(page, selector), (name, selector)
            assert page.locator("#banner-retry").is_visible()
            box = page.locator("#banner-retry").bounding_box()
            assert box["x"] + box["width"] <= viewport["width"], name
            # Try now: another attempt at once, refused again.
            before = len(sockets)
            page.click("#banner-retry")
            for _ in range(100):
                if len(sockets) > before:
                    break
                page.wait_for_timeout(50)
            assert len(sockets) > before
            page.wait_for_selector("#banner", state="visible")
            assert page.inner_text("#banner-message") == FULL
            page.context.close()
        page = new_page(browser)
        page.goto(server.url + "/")
        page.wait_for_selector("#banner", state="visible", timeout=20000)
    finally:
        holder.close()
    # Room again (the held session ends after its 1 s grace): the page gets its session.
    page.wait_for_selector('#status[data-state="connected"]', timeout=30000)
    assert page.is_hidden("#banner")
    wait_screen(page, r"developer@capsule")
    assert page.errors == []


def test_a_refused_profile_says_what_to_do(make_server, browser):
    server = make_server(*page_args("--grace", "5"))
    page = new_page(browser)
    page.goto(server.url + "/?profile=nosuch")
    page.wait_for_selector("#banner", state="visible", timeout=20000)
    assert page.inner_text("#banner-title") == "no such profile"
    assert "nosuch" in page.inner_text("#banner-message")
    assert "without ?profile=" in page.inner_text("#banner-hint")
    assert page.is_hidden("#banner-retry") and page.is_hidden("#banner-countdown")
    assert shown_whole(page, "#banner-message")
    shot(page, "refused-profile-desktop-1x")
    assert page.errors == []


def test_the_bar_while_connected_and_disconnected(make_server, browser, htpasswd, tmp_path):
    """
    Logged in: the bar says who; the session id it holds is the whole id,
    which the API takes; "new session" goes after a moment; Upload and
    Export are disabled, with a title that says why, while the page is
    disconnected.
    """
    server = make_server(*page_args("--auth", str(htpasswd), "--state-dir", str(tmp_path / "s"),
                                    "--grace", "30", "--pool-size", "0"))
    page = new_page(browser)
    page.goto(server.url + "/")
    log_in(page, server.url)
    page.wait_for_selector("#user", state="visible", timeout=10000)
    assert page.inner_text("#user") == "alice"
    session_id = page.text_content("#session")
    assert re.fullmatch(r"[0-9a-f-]{36}", session_id), session_id
    cookie = [c["value"] for c in page.context.cookies() if c["name"] == "capsule_session"][0]
    status, _, body = http(f"{server.url}/api/sessions/{session_id}",
                           headers={"Cookie": f"capsule_session={cookie}"})
    assert status == 200, body
    # "new session" is news for a moment, not the bar's state for ever.
    assert page.inner_text("#status-message") == "new session"
    page.wait_for_function("() => document.getElementById('status-message').textContent === ''",
                           timeout=10000)
    # A click selects the whole id (and copies it where the browser lets the page).
    page.click("#session")
    assert page.evaluate("getSelection().toString()") == session_id
    wait_text(page, "#status-message", "^session id (copied|selected)")
    assert page.is_enabled("#upload") and page.is_enabled("#export")
    shot(page, "bar-connected-desktop-1x")
    # Disconnected (capsule is gone): no upload, no export, and the titles say why.
    server.stop()
    page.wait_for_selector('#status[data-state="reconnecting"]', timeout=20000)
    assert page.is_disabled("#upload") and page.is_disabled("#export")
    assert page.get_attribute("#upload", "title") == \
        "Upload is not available: the page is disconnected from the session (reconnecting)"
    assert page.get_attribute("#export", "title") == \
        "Export is not available: the page is disconnected from the session (reconnecting)"
    shot(page, "bar-disconnected-desktop-1x")
    assert page.errors == []


def test_closing_the_tab_says_what_is_lost(make_server, browser):
    """
    While the page holds a session with work in it that nothing keeps past
    the grace period, closing the tab asks first (a beforeunload handler),
    and the page itself says how long the grace period is and what is lost.
    """
    server = make_server(*page_args("--grace", "45", *no_retention()))
    dialogs = []

    def on_dialog(dialog):
        dialogs.append(dialog.type)
        dialog.dismiss()  # stay

    # Nothing typed: nothing to lose, the tab closes without a question.
    idle = new_page(browser)
    idle.on("dialog", on_dialog)
    idle.goto(server.url + "/")
    idle.wait_for_selector('#status[data-state="connected"]', timeout=20000)
    wait_screen(idle, r"developer@capsule")
    idle.click(".xterm-screen")  # a user gesture, which a browser asks for before it asks
    with idle.expect_event("close", timeout=10000):
        idle.close(run_before_unload=True)
    assert dialogs == []

    page = new_page(browser)
    page.goto(server.url + "/")
    page.wait_for_selector('#status[data-state="connected"]', timeout=20000)
    wait_screen(page, r"developer@capsule")
    type_line(page, "echo work > /workspace/notes")
    page.wait_for_function(
        "() => document.getElementById('leave-note').textContent"
        " === 'Closing this tab removes this session and its files 45 s later'", timeout=10000)
    assert "Export first" in page.get_attribute("#leave-note", "title")
    shot(page, "closing-bar-desktop-1x")
    page.on("dialog", on_dialog)
    page.close(run_before_unload=True)
    for _ in range(100):
        if dialogs:
            break
        page.wait_for_timeout(50)
    assert dialogs == ["beforeunload"]
    # Stayed: the page says the truth the browser's question does not.
    page.wait_for_selector("#banner", state="visible", timeout=5000)
    assert page.inner_text("#banner-title") == "Leaving this page?"
    assert page.inner_text("#banner-message") == (
        "Closing this tab removes this session 45 s later (capsule's grace period), and its"
        " /workspace is lost with it: Export first what you want to keep.")
    shot(page, "closing-asked-desktop-1x")
    page.click("#banner-action")
    assert page.is_hidden("#banner")
    assert page.errors == []
