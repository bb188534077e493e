"""
The terminal page with users, in a real headless Chromium against a real
capsule with C{--auth}: the login page leads to the terminal, Log out ends
the login, and a login that ends while the page is open sends the page to
the login page, after which the same session resumes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest

from .test_browser import (  # noqa: F401 (fixtures)
    CHROMIUM,
    SCREENSHOTS,
    browser,
    new_page,
    page_args,
    screen,
    shot,
    type_line,
    wait_screen,
)
from .test_security_auth import PASSWORDS, htpasswd_line, http, refused_upgrade

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine")


@pytest.fixture
def htpasswd(tmp_path):
    path = tmp_path / "htpasswd"
    path.write_text("".join(htpasswd_line(u, p) for u, p in PASSWORDS.items()))
    return path


def auth_args(htpasswd, tmp_path, *extra: str) -> tuple[str, ...]:
    return page_args("--auth", str(htpasswd), "--state-dir", str(tmp_path / "state"),
                     "--grace", "60", "--pool-size", "0", *extra)


def on_login_page(page, base: str) -> dict:
    """
    Wait for the login page; return its query.
    """
    page.wait_for_url(re.compile(re.escape(base) + r"/login(\?.*)?$"), timeout=20000)
    page.wait_for_selector("#username")
    return urllib.parse.parse_qs(urllib.parse.urlsplit(page.url).query)


def log_in(page, base: str, user: str = "alice") -> None:
    on_login_page(page, base)
    page.fill("#username", user)
    page.fill("#password", PASSWORDS[user])
    page.click("button[type=submit]")
    page.wait_for_selector('#status[data-state="connected"]', timeout=20000)
    wait_screen(page, r"developer@capsule")


def drop_connections(port: int) -> None:
    """
    Reset every TCP connection to C{port} on this machine (C{ss -K}).
    """
    if shutil.which("ss") is None:
        pytest.skip("no ss (iproute2) to drop connections with")
    result = subprocess.run(["ss", "-K", "dst", "127.0.0.1", "dport", "=", f":{port}"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "ESTAB" in result.stdout, result


def cookie(page) -> str:
    values = [c["value"] for c in page.context.cookies() if c["name"] == "capsule_session"]
    assert len(values) == 1, page.context.cookies()
    return values[0]


def test_log_in_use_the_terminal_and_log_out(make_server, new_page, htpasswd, tmp_path):
    server = make_server(*auth_args(htpasswd, tmp_path))
    page = new_page()
    page.goto(server.url + "/")
    assert on_login_page(page, server.url) == {"next": ["/"]}
    log_in(page, server.url)
    assert page.url == server.url + "/"
    type_line(page, "echo logged-in-$((6*7))")
    wait_screen(page, r"logged-in-42")
    page.wait_for_selector("#logout", state="visible", timeout=10000)
    assert page.inner_text("#logout") == "Log out"
    shot(page, "auth-logout-button")
    if SCREENSHOTS:
        page.locator(".bar").screenshot(path=str(Path(SCREENSHOTS) / "auth-status-bar.png"))
    value = cookie(page)
    status, _, _ = http(server.url + "/api/sessions",
                        headers={"Cookie": f"capsule_session={value}"})
    assert status == 200

    page.click("#logout")
    assert on_login_page(page, server.url) == {}
    shot(page, "auth-logged-out")
    # The login is over: the old cookie opens nothing, the page's own socket included.
    status, _, _ = http(server.url + "/api/sessions",
                        headers={"Cookie": f"capsule_session={value}"})
    assert status == 401
    assert refused_upgrade(server.ws_url, f"Cookie: capsule_session={value}") == 401
    assert [c for c in page.context.cookies() if c["name"] == "capsule_session"] == []
    # Logged out on purpose: this tab forgets its session.
    assert page.evaluate("sessionStorage.getItem('capsule.session_id')") is None
    page.goto(server.url + "/")
    on_login_page(page, server.url)
    assert page.errors == []


def test_no_logout_button_without_users(make_server, new_page):
    server = make_server(*page_args("--grace", "30"))
    page = new_page()
    with page.expect_response(lambda r: r.url.endswith("/api/sessions")) as answer:
        page.goto(server.url + "/")
    assert (answer.value.status, answer.value.json()["user"]) == (200, None)
    page.wait_for_selector('#status[data-state="connected"]', timeout=20000)
    assert page.is_hidden("#logout")
    assert page.errors == []


def test_an_ended_login_sends_the_page_to_log_in_and_the_session_resumes(
        make_server, new_page, htpasswd, tmp_path):
    """
    The login ends in another tab (Log out there) while this tab's socket
    is up; when that socket drops, its upgrade is refused (401) and the
    page, instead of retrying, goes to the login page; after logging in it
    resumes the same shell.
    """
    server = make_server(*auth_args(htpasswd, tmp_path))
    page = new_page()
    page.goto(server.url + "/")
    log_in(page, server.url)
    session_id = page.get_attribute("#session", "title")
    type_line(page, "export KEPT=login-again; cd /tmp")

    other = page.context.new_page()
    other.goto(server.url + "/")
    other.wait_for_selector("#logout", state="visible", timeout=20000)
    other.click("#logout")
    on_login_page(other, server.url)
    other.close()

    # The socket drops (as a flaky network drops it): the page's upgrade is refused now.
    drop_connections(server.port)
    assert on_login_page(page, server.url) == {"next": ["/"]}
    shot(page, "auth-login-expired")
    assert page.evaluate("sessionStorage.getItem('capsule.session_id')") == session_id

    log_in(page, server.url)
    assert page.get_attribute("#session", "title") == session_id
    type_line(page, "echo $KEPT:$PWD")
    wait_screen(page, r"login-again:/tmp")
    shot(page, "auth-resumed")
    assert "login-again:/tmp" in screen(page)
    assert page.errors == []


def test_a_logged_in_upload_reaches_the_workspace(make_server, new_page, htpasswd, tmp_path):
    """
    With users, an upload carries the login and the page's own Origin (not
    "null", which capsule refuses as cross-site): the file arrives.
    """
    server = make_server(*auth_args(htpasswd, tmp_path))
    page = new_page()
    page.goto(server.url + "/")
    log_in(page, server.url)
    page.evaluate("""() => {
        const transfer = new DataTransfer();
        transfer.items.add(new File(["with a login\\n"], "logged-in.txt"));
        document.querySelector("#terminal .xterm-screen").dispatchEvent(new DragEvent("drop",
            { dataTransfer: transfer, bubbles: true, cancelable: true }));
    }""")
    page.wait_for_function(
        "() => /^upload(ed| failed)/.test(document.querySelector('#status-message').textContent)",
        timeout=20000)
    assert page.inner_text("#status-message") == "uploaded 1 file (13 B) to /workspace"
    type_line(page, "cat /workspace/logged-in.txt")
    wait_screen(page, r"with a login")
    assert page.errors == []
