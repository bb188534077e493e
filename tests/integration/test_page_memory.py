"""
The memory refusal in a real headless Chromium against a real capsule whose
host is under its reserve: the page shows the server's whole sentence (how
much the host has, under which reserve), on a desktop and on a phone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .test_browser import CHROMIUM, SCREENSHOTS, browser, page_args  # noqa: F401 (fixture)
from .test_page_bar import shown_whole

# The refusal banner over the terminal (issue 20's page): without it the
# page shows refusals in the status bar, a line that may cut them off.
BANNER = Path(__file__).resolve().parents[2] / "www" / "js" / "banner.js"

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine"),
    pytest.mark.skipif(not BANNER.exists(), reason="the page has no refusal banner yet"),
]

DESKTOP = {"width": 1000, "height": 600}
PHONE = {"width": 390, "height": 844}
MEMORY_REFUSAL = (r"^the server is full: the host has \d+ MiB of memory available, under its"
                  r" reserve of 102400000 MiB: try again later$")


def test_the_memory_refusal_is_shown_whole(make_server, browser):
    # A reserve no host has: the host is under it once capsule read it.
    server = make_server(*page_args("--memory-reserve", "100000g", "--pool-size", "0"))
    for _ in range(100):
        if "memory budget:" in server.log():
            break
        __import__("time").sleep(0.1)
    for name, viewport, ratio in [("desktop-1x", DESKTOP, 1), ("desktop-2x", DESKTOP, 2),
                                  ("phone-1x", PHONE, 1), ("phone-2x", PHONE, 2)]:
        context = browser.new_context(viewport=viewport, device_scale_factor=ratio)
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + "/")
        page.wait_for_selector("#banner", state="visible", timeout=20000)
        page.wait_for_function(
            "p => new RegExp(p).test(document.querySelector('#banner-message').textContent)",
            arg=MEMORY_REFUSAL, timeout=20000)
        if SCREENSHOTS:
            Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(Path(SCREENSHOTS) / f"memory-refusal-{name}.png"))
        for selector in ("#banner", "#banner-message"):
            assert shown_whole(page, selector), (name, selector)
        assert errors == []
        context.close()
    assert server.unhandled_errors() == []
