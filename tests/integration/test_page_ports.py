"""
The open ports notice in a real Chromium against a real capsule: a server
started on port 3000 in the session shows "port 3000 is open" with its
preview link above the terminal (never over it), reachable by keyboard, on
a desktop window and a phone; it goes when the server exits.
C{CAPSULE_SCREENSHOTS}: where the screenshots go.
"""

from __future__ import annotations

import json
import time

import pytest

from .test_browser import (  # noqa: F401 (fixtures)
    CHROMIUM, browser, new_page, open_session, page_args, shot, type_line, wait_screen,
    wait_text)
from .test_ports import SERVE_3000
from tests.support.httpclient import request
from tests.support.live import wait_for

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine")


@pytest.fixture
def server(make_server):
    return make_server(*page_args("--grace", "30", "--pool-size", "0"),
                       tuning={"cleanup-interval": 0.5})


def box(page, selector: str) -> dict:
    return page.eval_on_selector(selector, "e => { const r = e.getBoundingClientRect();"
                                           " return {top: r.top, bottom: r.bottom,"
                                           " right: r.right}; }")


def test_the_page_shows_a_port_as_it_opens_and_drops_it_as_it_closes(server, browser,
                                                                      new_page):
    owner = new_page()
    session_id = open_session(owner, server.url)
    assert owner.is_hidden("#ports"), owner.inner_text("#ports")
    started = time.monotonic()
    type_line(owner, SERVE_3000 + " echo SERVING_$((6*7))")
    wait_screen(owner, "SERVING_42")
    owner.wait_for_selector("#ports:not([hidden])", timeout=15000)
    print(f"the notice came {time.monotonic() - started:.2f} s after the command was typed")
    wait_text(owner, "#ports", "port 3000 is open")
    link = owner.get_attribute("#ports .ports-row a", "href")
    assert link == f"{server.url}/preview/{session_id}/3000/"
    assert owner.get_attribute("#ports .ports-row a", "rel") == "noopener noreferrer"
    # "share" makes a link to the preview (no login needed), which the API lists.
    share = owner.locator("#ports button", has_text="share")
    assert share.count() == 1
    share.click()
    shares = f"{server.url}/api/sessions/{session_id}/ports/3000/shares"
    wait_for(lambda: len(json.loads(request(shares)[2])["shares"]) == 1, 15,
             "the share link to be made")
    # It takes its own room: the terminal starts below it.
    assert box(owner, "#ports")["bottom"] <= box(owner, "#terminal")["top"]
    # Keyboard: the link, then "copy link", "share", then the ×.
    owner.focus("#ports .ports-row a")
    owner.keyboard.press("Tab")
    assert owner.evaluate("document.activeElement.textContent") == "copy link"
    owner.keyboard.press("Tab")
    assert owner.evaluate("document.activeElement.textContent") == "share"
    owner.keyboard.press("Tab")
    assert owner.evaluate("document.activeElement.getAttribute('aria-label')") == (
        "Hide the open ports")
    shot(owner, "ports-desktop")
    # The terminal still types and shows its prompt.
    type_line(owner, "echo STILL_$((2*2))")
    wait_screen(owner, "STILL_4")

    # On a phone (the same session, taken over there).
    phone = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2,
                                is_mobile=True, has_touch=True).new_page()
    phone.goto(f"{server.url}/?session_id={session_id}")
    phone.wait_for_selector('#status[data-state="connected"]', timeout=20000)
    phone.wait_for_selector("#ports:not([hidden])", timeout=15000)
    wait_text(phone, "#ports", "port 3000 is open")
    assert box(phone, "#ports")["right"] <= 390
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    assert box(phone, "#ports")["bottom"] <= box(phone, "#terminal")["top"]
    shot(phone, "ports-phone")

    # Hidden with its ×, until another port opens.
    phone.click(".ports-hide")
    assert phone.is_hidden("#ports")
    # The server exits: the notice goes.
    owner.goto(f"{server.url}/?session_id={session_id}")
    owner.wait_for_selector('#status[data-state="connected"]', timeout=20000)
    owner.wait_for_selector("#ports:not([hidden])", timeout=15000)
    type_line(owner, "kill %1; wait; echo KILLED_$((6*7))")
    wait_screen(owner, "KILLED_42")
    owner.wait_for_selector("#ports", state="hidden", timeout=15000)
    assert owner.errors == []
