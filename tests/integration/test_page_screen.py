"""
The page on a session whose container restarted while capsule was down, in
a real headless Chromium (see tests/integration/test_browser.py): the
keeper of the container started again shows the saved screen, marked
(docs/protocol.md, "The keeper's screen file"); the open page, coming back
from the offset it had, shows the dim "resumed" line under what it already
showed, then the new shell, which works.

C{CAPSULE_SCREENSHOTS} names a directory for screenshots (desktop and phone).
"""

from __future__ import annotations

import time

from capsule.core.kept import screen_path

from .harness import docker_client, session_container
from .test_browser import (browser, new_page, on_port, open_session, page_args,  # noqa: F401
                           read_file, screen, shot, type_line, wait_screen)


def test_an_open_page_shows_the_resumed_line_under_what_it_had(make_server, new_page):
    first = make_server(*page_args("--grace", "60", "--pool-size", "0"))
    page = new_page()
    session_id = open_session(page, first.url)
    type_line(page, "echo before-$((6*7))")
    wait_screen(page, r"before-42")
    # The keeper saves it at most 2 s after it was printed.
    deadline = time.monotonic() + 20
    while b"before-42\r\n" not in (read_file(session_id, screen_path(session_id)) or b""):
        assert time.monotonic() < deadline, "the screen was not saved"
        time.sleep(0.2)
    first.stop()
    page.wait_for_selector('#status[data-state="reconnecting"]', timeout=10000)
    docker_client().api.restart(session_container(session_id), timeout=1)
    on_port(make_server(*page_args("--grace", "60", "--pool-size", "0"),
                        instance=first.instance, start=False), first.port).start()
    page.wait_for_selector('#status[data-state="connected"]', timeout=30000)
    assert page.get_attribute("#session", "title") == session_id
    wait_screen(page, r"resumed \d{4}-\d\d-\d\d \d\d:\d\d UTC: the screen above is from before"
                      r" the session was put away")
    text = screen(page)
    # What the page had stays above the line, once (nothing was sent twice).
    assert text.count("before-42") == 1, text
    assert text.index("before-42") < text.index("resumed")
    type_line(page, "echo after-$((6*8))")
    wait_screen(page, r"after-48")
    shot(page, "resumed-screen-desktop")
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(300)  # the terminal fits itself to the new size
    shot(page, "resumed-screen-phone")
    assert page.errors == []
