"""
What the terminal draws, read from screenshots of a real headless Chromium
(the page from disk, its WebSocket answered by the test): the pixels of the
terminal's cells, not its DOM, at device pixel ratios 1 and 2.
"""

import json

import pytest

from tests.support import png

from . import test_browser
from .test_browser import CHROMIUM, SCREENSHOTS, wait_screen
from .test_page_protocol import ScriptedServer, connected, page_url, until  # noqa: F401

browser = test_browser.browser

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine")

BACKGROUND = (0x0D, 0x11, 0x17)


def lit(pixel, background=BACKGROUND) -> bool:
    # Anything drawn in the foreground colour (or its antialiased edge) over the background.
    return sum(abs(a - b) for a, b in zip(pixel, background)) > 90


def cell_box(page, server, row: int, col: int, count: int) -> dict:
    """
    The page's box (CSS pixels) of C{count} cells from C{row}, C{col} (from 0): the
    terminal's screen element divided by the size the page gave the server.
    """
    size = [json.loads(m) for m in server.received if isinstance(m, str)
            and json.loads(m).get("type") == "resize"][-1]
    screen = page.locator(".xterm-screen").bounding_box()
    width = screen["width"] / size["cols"]
    height = screen["height"] / size["rows"]
    return {"x": screen["x"] + col * width, "y": screen["y"] + row * height,
            "width": count * width, "height": height}


def lit_columns(page, box: dict) -> tuple[int, int]:
    """
    How many pixel columns of C{box} (read from a screenshot, at the page's
    device pixel ratio) have a pixel drawn in them, and how many there are.
    """
    image = png.decode(page.screenshot(clip=box))
    columns = sum(1 for x in range(image.width)
                  if any(lit(image.pixel(x, y)) for y in range(image.height)))
    return columns, image.width


@pytest.mark.parametrize("ratio", [1, 2])
def test_page_draws_underscores(page_url, browser, ratio):
    """
    A row of underscores, and underscores between letters, are drawn in
    their cells at device pixel ratios 1 and 2 (at 1 DejaVu Sans Mono's
    underscore fell below a 16 px row and was cut off).
    """
    context = browser.new_context(viewport={"width": 1000, "height": 600},
                                  device_scale_factor=ratio)
    page = context.new_page()

    def on_resize(ws):
        connected(ws, resumed=False, offset=0, replay=0)
        # The cursor hidden, so that only the text is drawn; underscores on row 2.
        ws.send(b"\x1b[?25l\x1b[2J\x1b[H$ echo en_US a_b___c\r\nen_US a_b___c\r\n"
                + b"_" * 40 + b"\r\n")
    server = ScriptedServer(page, on_resize)
    page.goto(page_url)
    wait_screen(page, "_{40}")
    page.wait_for_timeout(200)  # drawn at the next frame
    if SCREENSHOTS:
        page.screenshot(path=f"{SCREENSHOTS}/underscores-{ratio}x.png")
    columns, width = lit_columns(page, cell_box(page, server, 2, 0, 40))
    assert columns >= 0.9 * width, f"a row of underscores: {columns} of {width} columns drawn"
    # "en_US a_b___c": the cells of the underscores alone (columns 2, 8, 10-12).
    for col in (2, 8, 10, 11, 12):
        columns, width = lit_columns(page, cell_box(page, server, 1, col, 1))
        assert columns >= 0.6 * width, f"the underscore in column {col}: {columns} of {width}"
    context.close()
