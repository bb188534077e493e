"""
The terminal page in a real headless Chromium against a real capsule.
"""

import os
import re
import shutil

import pytest

from .harness import docker_client

CHROMIUM = os.environ.get("CAPSULE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine")


@pytest.fixture
def page(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"])
        try:
            context = browser.new_context(viewport={"width": 1000, "height": 600},
                                          accept_downloads=True)
            page = context.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.errors = errors
            yield page
        finally:
            browser.close()


def screen(page) -> str:
    return page.inner_text(".xterm-rows")


def wait_screen(page, pattern: str, timeout: float = 15000) -> None:
    page.wait_for_function(
        "p => new RegExp(p).test(document.querySelector('.xterm-rows').innerText)",
        arg=pattern, timeout=timeout)


def type_line(page, text: str) -> None:
    page.locator(".xterm-helper-textarea").focus()
    page.keyboard.type(text)
    page.keyboard.press("Enter")


def stty_size(page, tag: str) -> tuple[int, int]:
    type_line(page, f"clear; echo SZ{tag} $(stty size) ZS{tag}")
    # xterm's DOM rows may hold non-breaking spaces: match any space.
    wait_screen(page, rf"SZ{tag}\s+\d+\s+\d+\s+ZS{tag}")
    rows, cols = re.search(rf"SZ{tag}\s+(\d+)\s+(\d+)\s+ZS{tag}", screen(page)).groups()
    return int(rows), int(cols)


def test_page_terminal_reload_export_and_exit(server, page, tmp_path):
    page.goto(server.url + "/")
    page.wait_for_selector('#status[data-state="connected"]', timeout=20000)
    wait_screen(page, r"developer@capsule")
    type_line(page, "echo $((6*7))__RDY")
    wait_screen(page, r"42__RDY")

    # The shell sees the window's size, and a new one when it changes.
    first = stty_size(page, "A")
    page.set_viewport_size({"width": 700, "height": 400})
    page.wait_for_timeout(500)
    second = stty_size(page, "B")
    assert second[1] < first[1] and second[0] < first[0]

    # A reload comes back to the same shell.
    session_id = page.get_attribute("#session", "title")
    type_line(page, "export KEPT=yes-it-is; touch /workspace/from-browser.txt")
    page.reload()
    page.wait_for_selector('#status[data-state="connected"]', timeout=20000)
    type_line(page, "echo $KEPT")
    wait_screen(page, r"yes-it-is")
    assert page.get_attribute("#session", "title") == session_id

    with page.expect_download() as info:
        page.click("#export")
    download = info.value
    assert download.suggested_filename.endswith(".tar.gz")
    assert download.suggested_filename.startswith("capsule-")

    type_line(page, "exit 7")
    page.wait_for_selector('#status[data-state="ended"]', timeout=20000)
    assert "7" in page.inner_text("#status-message") + page.inner_text("#status")
    assert page.errors == []
