"""
Read-only share links in a real Chromium against a real capsule: the owner
makes a link from the page's Share menu; a spectator in a second browser
context opens it, sees the prompt and what the owner types, cannot type, and
is told when the owner revokes the link; the owner's page counts who
watches.  C{CAPSULE_SCREENSHOTS}: where the screenshots go.
"""

from __future__ import annotations

import pytest

from .test_browser import (  # noqa: F401 (fixtures)
    CHROMIUM, browser, new_page, open_session, page_args, screen, shot, trace, type_line,
    wait_connected, wait_screen, wait_text)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine")


@pytest.fixture
def server(make_server):
    return make_server(*page_args("--grace", "30"), tuning={"cleanup-interval": 0.5})


def make_link(owner) -> str:
    owner.click("#share")
    owner.wait_for_selector("#share-menu:not([hidden])")
    owner.click("#share-create")
    owner.wait_for_selector(".share-url", timeout=10000)
    return owner.input_value(".share-url")


def spectator_page(browser, url: str, **context):
    options = {"viewport": {"width": 1000, "height": 600}, **context}
    page = trace(browser.new_context(**options).new_page())
    page.goto(url)
    wait_connected(page)
    return page


def test_a_spectator_watches_without_typing_and_is_told_of_the_revocation(server, browser,
                                                                         new_page):
    owner = new_page()
    open_session(owner, server.url)
    type_line(owner, "echo OWNER_$((2*3))")
    wait_screen(owner, "OWNER_6")
    url = make_link(owner)
    assert url.startswith(server.url + "/watch/#") and len(url.split("#")[1]) >= 43
    shot(owner, "owner-share-menu-desktop")

    watcher = spectator_page(browser, url)
    # The replay: the prompt and what the owner typed before.
    wait_screen(watcher, "developer@capsule")
    wait_screen(watcher, "OWNER_6")
    wait_text(watcher, "#watch-badge", r"read-only · expires in 1 h")
    assert watcher.is_hidden("#upload") and watcher.is_hidden("#export")
    assert watcher.is_hidden("#share")
    wait_text(owner, "#share-count", "1 watching")
    # Live output.
    type_line(owner, "echo LIVE_$((3*3))")
    wait_screen(watcher, "LIVE_9")
    shot(watcher, "spectator-desktop")
    # A reload watches again, from the replay.
    watcher.trail.append("-- reload --")
    watcher.reload()
    wait_connected(watcher)
    wait_screen(watcher, "LIVE_9")
    # Typing in the spectator's page does nothing to the session.
    watcher.click(".xterm-screen")
    watcher.keyboard.type("echo SPECTATOR_TYPED")
    watcher.keyboard.press("Enter")
    wait_text(watcher, "#status-message", "read-only")
    type_line(owner, "echo AFTER_$((4*4))")
    wait_screen(owner, "AFTER_16")
    wait_screen(watcher, "AFTER_16")
    assert "SPECTATOR_TYPED" not in screen(owner) and "SPECTATOR_TYPED" not in screen(watcher)
    # The owner's session was never taken over.
    assert owner.get_attribute("#status", "data-state") == "connected"
    # A phone-sized spectator.
    phone = spectator_page(browser, url, viewport={"width": 390, "height": 844},
                           device_scale_factor=2, is_mobile=True, has_touch=True)
    wait_screen(phone, "AFTER_16")
    wait_text(owner, "#share-count", "2 watching")
    shot(phone, "spectator-phone")
    shot(owner, "owner-two-watching-desktop")

    # Revoking disconnects both, with a reason on their page.
    if owner.is_hidden("#share-menu"):
        owner.click("#share")
    owner.wait_for_selector("#share-menu:not([hidden])")
    owner.click(".share-row button.danger")
    for page in (watcher, phone):
        page.wait_for_selector('#status[data-state="expired"]', timeout=10000)
        wait_text(page, "#status-message", "revoked")
        wait_screen(page, "owner revoked this watch link")
        wait_text(page, "#watch-badge", "not watching")
    shot(watcher, "spectator-revoked-desktop")
    shot(phone, "spectator-revoked-phone")
    owner.wait_for_selector(".share-none")
    wait_text(owner, "#share-count", "^$")
    assert owner.errors == [] and watcher.errors == [] and phone.errors == []


def test_the_owner_s_share_menu_on_a_phone(server, browser):
    context = browser.new_context(viewport={"width": 390, "height": 844},
                                  device_scale_factor=2, is_mobile=True, has_touch=True)
    owner = context.new_page()
    open_session(owner, server.url)
    make_link(owner)
    box = owner.locator("#share-menu").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390
    shot(owner, "owner-share-menu-phone")


def test_a_broken_link_says_so(server, browser):
    page = browser.new_context(viewport={"width": 1000, "height": 600}).new_page()
    page.goto(server.url + "/watch/#" + "A" * 43)
    page.wait_for_selector('#status[data-state="expired"]', timeout=20000)
    wait_text(page, "#status-message", "does not work")
    page.goto(server.url + "/watch/")
    page.wait_for_selector('#status[data-state="expired"]', timeout=20000)
    wait_text(page, "#status-message", "not complete")
    shot(page, "spectator-broken-link-desktop")

