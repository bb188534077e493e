"""
"While you were away" in a real Chromium against a real capsule that records
(--record): a command prints over a few seconds after its page was closed;
the page opened again on the session offers to play what happened (it does
not play by itself), the player (asciinema-player) plays the output, and
"Jump to now" (or Escape) gives the live terminal back.  On a desktop and on
a phone.  C{CAPSULE_SCREENSHOTS}: where the screenshots go.
"""

from __future__ import annotations

import time

import pytest

from .test_browser import (  # noqa: F401 (fixtures)
    CHROMIUM, browser, new_page, open_session, page_args, screen, shot, type_line,
    wait_screen, wait_text)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine")


@pytest.fixture
def server(make_server, tmp_path):
    return make_server(*page_args("--grace", "60", "--record", str(tmp_path / "rec")),
                       tuning={"cleanup-interval": 0.5})


def reopen(browser, url: str, session_id: str, **context):
    options = {"viewport": {"width": 1000, "height": 600}, **context}
    page = browser.new_context(**options).new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors
    page.console = []
    page.on("console", lambda m: page.console.append(m.text))
    page.goto(f"{url}/?session_id={session_id}")
    page.wait_for_selector('#status[data-state="connected"]', timeout=20000)
    return page


def print_while_away(page, tag: str, lines: int = 4) -> None:
    """
    Start a command that prints `lines` lines a second apart, after a pause,
    and close the page at once: it prints while no page is attached.
    """
    type_line(page, f"sleep 1.5; for i in $(seq 1 {lines}); do echo {tag}_$((i*11)); sleep 0.7;"
                    " done")
    page.wait_for_timeout(300)
    page.context.close()
    # Away long enough to be offered a playback (js/away.js, MIN_AWAY_SECONDS), and until the
    # command is done.
    time.sleep(max(1.5 + 0.7 * lines + 1.5, 11))


def play(page, tag: str, lines: int = 4) -> None:
    # Offered, not played.
    page.wait_for_selector("#away:not([hidden])", timeout=10000)
    wait_text(page, "#away .away-text", r"While you were away \(1\d s\), this session printed")
    assert page.locator(".away-overlay").count() == 0
    # The live terminal already has it all (the session's replay).
    wait_screen(page, f"{tag}_{lines * 11}")
    page.click(".away-play")
    page.wait_for_selector(".away-overlay", timeout=5000)
    # The player plays the recording since the page was closed: its text is in its DOM.
    try:
        page.wait_for_function(
            "text => (document.querySelector('.away-player') || {}).textContent?.includes(text)",
            arg=f"{tag}_{lines * 11}", timeout=30000)
    except Exception:
        shot(page, f"away-failed-{tag}")
        raise AssertionError(f"the player did not play: {page.inner_text('.away-overlay')!r};"
                             f" console: {page.console}") from None


def test_the_page_plays_what_happened_while_it_was_closed(server, browser, new_page):
    owner = new_page()
    session_id = open_session(owner, server.url)
    assert session_id
    # Nothing printed while away yet: nothing offered.
    assert owner.is_hidden("#away")
    print_while_away(owner, "AWAY")

    page = reopen(browser, server.url, session_id)
    play(page, "AWAY")
    assert "AWAY_11" in page.inner_text(".away-player")
    wait_text(page, ".away-title", r"What happened since \d\d:\d\d")
    wait_text(page, ".away-speed", "2×")
    page.wait_for_timeout(500)
    shot(page, "away-playing-desktop")
    # Faster: the player starts again at 4x, where it was.
    page.click(".away-speed")
    wait_text(page, ".away-speed", "4×")
    page.wait_for_function(
        "() => (document.querySelector('.away-player') || {}).textContent?.includes('AWAY_44')",
        timeout=30000)
    # Keyboard: the focus stays within the overlay; "Jump to now" closes it.
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.closest('.away-overlay') !== null")
    page.click(".away-now")
    assert page.locator(".away-overlay").count() == 0
    assert page.is_hidden("#away")
    # The live terminal takes keys again.
    page.keyboard.type("echo NOW_$((5*5))")
    page.keyboard.press("Enter")
    wait_screen(page, "NOW_25")
    shot(page, "away-jumped-to-now-desktop")

    # A phone, and Escape for "Jump to now".
    print_while_away(page, "PHONE", lines=3)
    phone = reopen(browser, server.url, session_id, viewport={"width": 390, "height": 844},
                   device_scale_factor=2, is_mobile=True, has_touch=True)
    phone.wait_for_selector("#away:not([hidden])", timeout=10000)
    box = phone.locator("#away").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390
    shot(phone, "away-offer-phone")
    play(phone, "PHONE", lines=3)
    assert "PHONE_11" in phone.inner_text(".away-player")
    box = phone.locator(".away-now").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390
    phone.wait_for_timeout(500)
    shot(phone, "away-playing-phone")
    phone.keyboard.press("Escape")
    assert phone.locator(".away-overlay").count() == 0
    wait_screen(phone, "PHONE_33")
    assert owner.errors == [] and page.errors == [] and phone.errors == []


def test_a_dismissed_offer_goes_and_a_page_that_stayed_is_offered_nothing(server, browser,
                                                                          new_page):
    owner = new_page()
    session_id = open_session(owner, server.url)
    # A reload while the session prints: away for a moment, which the terminal's replay
    # shows; no playback offered.
    type_line(owner, "sleep 0.3; echo STAYED_$((2*4))")
    owner.reload()
    owner.wait_for_selector('#status[data-state="connected"]', timeout=20000)
    wait_screen(owner, "STAYED_8")
    owner.wait_for_timeout(1000)
    assert owner.is_hidden("#away")
    print_while_away(owner, "GONE", lines=1)
    page = reopen(browser, server.url, session_id)
    page.wait_for_selector("#away:not([hidden])", timeout=10000)
    shot(page, "away-offer-desktop")
    page.click(".away-dismiss")
    assert page.is_hidden("#away")
    assert page.locator(".away-overlay").count() == 0
    assert page.errors == []
