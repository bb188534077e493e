"""
Kept sessions in a real Chromium: the Sessions list, the page opened on a
kept session (Resume, then the old screen marked as history and a new
prompt), and what the bar says closing the tab does (#leave-note).

Two kinds of tests.  Those named C{..._for_real} run against a capsule that
keeps sessions (its C{--retention}), with real containers.  The others
hold the page to its side of the protocol: a real capsule serves the page,
and Playwright answers its API requests and its WebSocket as capsule does
(the frames of docs/protocol.md and docs/keeping.md), so that each case
(a kept session, a resume, both closing outcomes) is reached at once.
C{CAPSULE_SCREENSHOTS}: where the screenshots go.
"""

from __future__ import annotations

import base64
import json
import re
import time
import uuid

import pytest

from .test_browser import (  # noqa: F401 (fixtures)
    CHROMIUM, browser, new_page, open_session, page_args, screen, shot, type_line,
    wait_screen, wait_text)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine")


def _keeps_sessions() -> bool:
    from capsule.tap import Options
    return any(option[0] == "retention" for option in Options.optParameters)


def no_retention() -> tuple[str, ...]:
    "The options of a capsule that removes a session when its grace period ends."
    return ("--retention", "0") if _keeps_sessions() else ()


needs_keeping = pytest.mark.skipif(
    not _keeps_sessions(), reason="this capsule does not keep sessions (no --retention)")

PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2,
         "is_mobile": True, "has_touch": True}
DESKTOP = {"viewport": {"width": 1000, "height": 600}}

KEPT_ID = str(uuid.UUID(int=0x4b))
LIVE_ID = str(uuid.UUID(int=0x11))
OTHER_ID = str(uuid.UUID(int=0x22))
FORK_ID = str(uuid.UUID(int=0x33))
MARKER = "\x1b[2m── resumed Mon 7 Dec 09:30: the screen above is from before ──\x1b[0m\r\n"


@pytest.fixture
def server(make_server):
    return make_server(*page_args("--grace", "30"))


def day(t: float) -> str:
    "The page's dayText in this machine's time zone (the browser's)."
    local = time.localtime(t)
    text = time.strftime("%a ", local) + str(local.tm_mday) + time.strftime(" %b", local)
    return text if local.tm_year == time.localtime().tm_year else f"{text} {local.tm_year}"


class FakeCapsule:
    """
    capsule's answers to the page, for one browser context: its session
    API (GET /api/sessions and a session's actions) and its WebSocket.
    """

    def __init__(self, context, now: float, on_close: dict | None = None) -> None:
        self.now = now
        self.on_close = on_close or {"outcome": "kept", "after": 60,
                                     "until": now + 60 + 7 * 86400}
        self.kept = {KEPT_ID}
        self.requests: list[tuple[str, str]] = []
        self.sockets: list[str] = []
        context.route(re.compile(r".*/api/sessions(/.*)?(\?.*)?$"), self._api)
        context.route_web_socket(re.compile(r".*/ws(\?.*)?$"), self._socket)

    def describe(self, session_id: str) -> dict:
        if session_id in self.kept:
            return {"id": session_id, "state": "kept", "profile": "shell",
                    "created": self.now - 2 * 86400, "kept_at": self.now - 86400,
                    "kept_until": self.now + 6 * 86400, "age": 2 * 86400,
                    "size": 1_300_000_000, "command": "bash", "reason": "grace",
                    "reason_text": "its last tab closed and the grace period ended"}
        return {"id": session_id, "state": "running", "status": "running",
                "profile": "shell", "created": self.now - 600,
                "client_attached": session_id == LIVE_ID,
                "url": f"/?session_id={session_id}"}

    def _api(self, route) -> None:
        request = route.request
        path = re.sub(r"^.*?/api/sessions", "", request.url.split("?")[0])
        self.requests.append((request.method, path))
        if request.method == "GET" and path in ("", "/"):
            ids = [LIVE_ID, OTHER_ID, KEPT_ID]
            body = {"user": None, "sessions": [self.describe(i) for i in ids]}
            return route.fulfill(status=200, json=body)
        match = re.fullmatch(r"/([0-9a-f-]{36})(/[a-z-]+)?", path)
        if not match:
            return route.fulfill(status=404, json={"error": "no such path", "code": "not_found"})
        session_id, action = match.group(1), match.group(2) or ""
        if request.method == "GET" and not action:
            return route.fulfill(status=200, json=self.describe(session_id))
        if request.method == "POST" and action == "/resume":
            self.kept.discard(session_id)
            return route.fulfill(status=200, json={"id": session_id,
                                                   "url": f"/?session_id={session_id}"})
        if request.method == "POST" and action == "/fork":
            return route.fulfill(status=409, json={
                "error": "you keep 20 sessions already, as many as capsule allows: delete one",
                "code": "kept_limit"})
        return route.fulfill(status=405, json={"error": "not here", "code": "method"})

    def _socket(self, ws) -> None:
        url = ws.url
        self.sockets.append(url)
        session_id = re.search(r"session_id=([0-9a-f-]+)", url)
        session_id = session_id.group(1) if session_id else LIVE_ID
        if session_id in self.kept and "resume=1" not in url:
            ws.send(json.dumps({
                "type": "error", "code": "session_kept",
                "message": "this session was put away on Sun 6 Dec and is kept until"
                           " Sun 13 Dec: resume it"}))
            ws.close(code=4404, reason="session kept")
            return
        resumed = session_id in self.kept or session_id == KEPT_ID
        self.kept.discard(session_id)
        frame = {"type": "connected", "session_id": session_id, "resumed": False,
                 "replay": 0, "grace": 60, "kept": self.on_close["outcome"] == "kept",
                 "on_close": self.on_close, "profile": "shell"}
        output = ""
        if resumed:
            frame["resumed_from"] = self.now - 86400
            output = ("developer@capsule:/workspace$ echo OLD_WORK\r\nOLD_WORK\r\n"
                      "developer@capsule:/workspace$ \r\n" + MARKER)
        output += "developer@capsule:/workspace$ "
        ws.send(json.dumps(frame))
        ws.send(json.dumps({"type": "output",
                            "data": base64.b64encode(output.encode()).decode()}))
        if resumed:
            ws.send(json.dumps({"type": "notice", "code": "resumed", "message": "resumed"}))


def fake_page(browser, options: dict, now: float | None = None, on_close: dict | None = None):
    context = browser.new_context(**options)
    fake = FakeCapsule(context, now or time.time(), on_close)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors
    page.fake = fake
    return page


@pytest.mark.parametrize("size", ["desktop", "phone"])
def test_the_page_opened_on_a_kept_session_offers_resume(server, browser, size):
    page = fake_page(browser, PHONE if size == "phone" else DESKTOP)
    page.goto(f"{server.url}/?session_id={KEPT_ID}")
    page.wait_for_selector('#status[data-state="kept"]', timeout=20000)
    wait_text(page, "#status-label", "^put away$")
    page.wait_for_selector("#banner", state="visible")
    assert page.inner_text("#banner-title") == "This session is put away"
    # What it is, in the page's words once the API answered: when, why, until when.
    wait_text(page, "#banner-message", r"^This session was put away yesterday \d\d:\d\d "
              r"\(its last tab closed and the grace period ended\)\. It is kept until ")
    assert page.inner_text("#banner-action") == "Resume"
    # Nothing resumed it by itself.
    page.wait_for_timeout(1500)
    assert page.get_attribute("#status", "data-state") == "kept"
    assert all("resume=1" not in url for url in page.fake.sockets)
    # The bar's Resume is on the screen, a phone's too.
    box = page.locator("#action").bounding_box()
    assert page.inner_text("#action") == "Resume"
    assert box is not None and box["x"] + box["width"] <= page.viewport_size["width"]
    shot(page, f"kept-offer-{size}")

    page.click("#banner-action")
    page.wait_for_selector('#status[data-state="connected"]', timeout=10000)
    assert "resume=1" in page.fake.sockets[-1]
    assert f"session_id={KEPT_ID}" in page.fake.sockets[-1]
    # The old screen, the marker saying it is history, and a new prompt.
    # (A phone's narrow terminal wraps the marker.)
    wait_screen(page, r"OLD_WORK[\s\S]*resumed\s+Mon\s+7\s+Dec[\s\S]*from\s+before"
                r"[\s\S]*developer@capsule:/workspace\$\s*$")
    wait_text(page, "#status-message", "resumed")
    assert page.is_hidden("#banner")
    shot(page, f"kept-resumed-{size}")
    assert page.errors == []


def test_the_sessions_list_resumes_exports_forks_and_says_why_not(server, browser):
    page = fake_page(browser, {**DESKTOP, "accept_downloads": True})
    page.goto(f"{server.url}/?session_id={LIVE_ID}")
    page.wait_for_selector('#status[data-state="connected"]', timeout=20000)
    page.click("#sessions")
    page.wait_for_selector("#sessions-menu:not([hidden]) .sessions-row", timeout=10000)
    rows = page.locator(".sessions-row")
    assert rows.count() == 3
    # This tab's session first, then the other live one, then the kept one.
    assert [rows.nth(i).get_attribute("data-id") for i in range(3)] == [LIVE_ID, OTHER_ID, KEPT_ID]
    kept = page.locator(f'.sessions-row[data-id="{KEPT_ID}"]')
    assert kept.get_attribute("data-state") == "kept"
    details = kept.inner_text()
    assert re.search(r"put away yesterday \d\d:\d\d", details), details
    assert f"kept until {day(page.fake.now + 6 * 86400)}" in details
    assert "1.3 GB" in details and "ran bash" in details and "2 days old" in details
    assert [b.inner_text() for b in kept.locator("button").all()] == [
        "Resume", "Export", "Fork", "Delete"]
    mine = page.locator(f'.sessions-row[data-id="{LIVE_ID}"]')
    assert mine.locator(".sessions-state").inner_text() == "this tab"
    assert [b.inner_text() for b in mine.locator("button").all()] == [
        "Export", "Fork", "Put away", "Delete"]
    assert "Closing this tab keeps your work until" in page.inner_text("#sessions-menu")
    shot(page, "sessions-list-desktop")

    # A refusal is shown whole.
    kept.locator('button[data-action="fork"]').click()
    wait_text(page, "#sessions-error", r"^Fork failed: you keep 20 sessions already, as many as"
              r" capsule allows: delete one \(kept_limit\)$")
    shot(page, "sessions-error-desktop")
    # Delete asks first; dismissed, nothing is sent.
    page.once("dialog", lambda dialog: dialog.dismiss())
    kept.locator('button[data-action="delete"]').click()
    page.wait_for_timeout(300)
    assert ("DELETE", f"/{KEPT_ID}") not in page.fake.requests
    # Export downloads the kept session's /workspace through the API.
    with page.expect_request(re.compile(rf".*/api/sessions/{KEPT_ID}/workspace$")):
        kept.locator('button[data-action="export"]').click()
    # Resume: asked of the API, then the session's page, resumed, with its history.
    kept.locator('button[data-action="resume"]').click()
    page.wait_for_url(re.compile(rf".*session_id={KEPT_ID}|.*/$"), timeout=10000)
    page.wait_for_selector('#status[data-state="connected"]', timeout=20000)
    assert ("POST", f"/{KEPT_ID}/resume") in page.fake.requests
    wait_screen(page, r"OLD_WORK[\s\S]*the screen above is from before")
    assert page.get_attribute("#session", "title") == KEPT_ID
    assert page.errors == []


def test_the_sessions_list_on_a_phone(server, browser):
    page = fake_page(browser, PHONE)
    page.goto(f"{server.url}/?session_id={LIVE_ID}")
    page.wait_for_selector('#status[data-state="connected"]', timeout=20000)
    assert page.is_visible("#sessions")
    box = page.locator("#sessions").bounding_box()
    assert box["x"] + box["width"] <= 390
    page.click("#sessions")
    page.wait_for_selector("#sessions-menu:not([hidden]) .sessions-row", timeout=10000)
    menu = page.locator("#sessions-menu").bounding_box()
    assert menu["x"] >= 0 and menu["x"] + menu["width"] <= 390
    for button in page.locator(".sessions-actions button").all():
        b = button.bounding_box()
        assert b["x"] >= 0 and b["x"] + b["width"] <= 390
    # The bar has no room for what closing the tab does: the list says it.
    assert "Closing this tab keeps your work until" in page.inner_text("#sessions-menu")
    shot(page, "sessions-list-phone")
    assert page.errors == []


@pytest.mark.parametrize("outcome", ["kept", "removed"])
def test_the_bar_says_what_closing_the_tab_does(server, browser, outcome):
    now = time.time()
    on_close = ({"outcome": "kept", "after": 60, "until": now + 60 + 7 * 86400}
                if outcome == "kept" else {"outcome": "removed", "after": 60})
    page = fake_page(browser, DESKTOP, now=now, on_close=on_close)
    page.goto(f"{server.url}/?session_id={LIVE_ID}")
    page.wait_for_selector('#status[data-state="connected"]', timeout=20000)
    expected = (f"Closing this tab keeps your work until {day(now + 60 + 7 * 86400)}"
                if outcome == "kept"
                else "Closing this tab removes this session and its files 60 s later")
    wait_text(page, "#leave-note", "^" + re.escape(expected) + "$")
    assert page.get_attribute("#leave-note", "data-outcome") == outcome
    # Work typed in: the tab asks before closing only when that work would be removed.
    type_line(page, "echo work")
    dialogs = []

    def on_dialog(dialog):
        dialogs.append(dialog.type)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    shot(page, f"leave-note-{outcome}-desktop")
    if outcome == "kept":
        with page.expect_event("close", timeout=10000):
            page.close(run_before_unload=True)
        assert dialogs == []
        return
    page.close(run_before_unload=True)
    for _ in range(100):
        if dialogs:
            break
        page.wait_for_timeout(50)
    assert dialogs == ["beforeunload"]
    page.wait_for_selector("#banner", state="visible", timeout=5000)
    assert page.inner_text("#banner-message").startswith(
        "Closing this tab removes this session 60 s later")
    assert page.errors == []


# --- against a capsule that keeps sessions --------------------------------------------


@needs_keeping
def test_put_away_listed_and_resumed_for_real(make_server, browser, new_page):
    server = make_server(*page_args("--grace", "30", "--retention", "3600"))
    page = new_page()
    session_id = open_session(page, server.url)
    wait_text(page, "#leave-note", r"^Closing this tab keeps your work until ")
    type_line(page, "echo kept-file > /workspace/f; echo BEFORE_$((6*7))")
    wait_screen(page, "BEFORE_42")
    # Put away from the list: this tab is then on a kept session, and offers Resume.
    page.click("#sessions")
    row = page.locator(f'.sessions-row[data-id="{session_id}"]')
    row.locator('button[data-action="put-away"]').click(timeout=10000)
    page.wait_for_selector('#status[data-state="kept"]', timeout=30000)
    page.wait_for_selector("#banner", state="visible")
    wait_text(page, "#banner-message", r"This session was put away today \d\d:\d\d \(put away by"
              r" its owner\)\. It is kept until ")
    page.wait_for_selector(f'.sessions-row[data-id="{session_id}"][data-state="kept"]',
                           timeout=20000)
    shot(page, "real-kept-list-desktop")
    # Opened again (a bookmark, another tab): the same offer; nothing resumes by itself.
    other = new_page()
    other.goto(f"{server.url}/?session_id={session_id}")
    other.wait_for_selector('#status[data-state="kept"]', timeout=20000)
    wait_text(other, "#banner-message", r"put away today")
    shot(other, "real-kept-offer-desktop")
    other.click("#banner-action")
    other.wait_for_selector('#status[data-state="connected"]', timeout=60000)
    # The old screen, marked as history, then a new shell's prompt; the files are there.
    wait_screen(other, r"BEFORE_42[\s\S]*resumed[\s\S]*developer@capsule", timeout=30000)
    type_line(other, "cat /workspace/f; echo AFTER_$((7*7))")
    wait_screen(other, r"kept-file[\s\S]*AFTER_49")
    assert other.get_attribute("#session", "title") == session_id
    shot(other, "real-resumed-desktop")
    assert page.errors == [] and other.errors == []


@needs_keeping
def test_the_leave_note_without_retention_for_real(make_server, browser, new_page):
    server = make_server(*page_args("--grace", "45", "--retention", "0"))
    page = new_page()
    open_session(page, server.url)
    wait_text(page, "#leave-note",
              r"^Closing this tab removes this session and its files 45 s later$")
    assert page.is_hidden("#sessions-menu")
    assert page.errors == []
