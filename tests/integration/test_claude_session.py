"""
The URL opens Claude Code, end to end: a real twistd capsule with
--default-profile claude, the agent image (CAPSULE_TEST_AGENT_IMAGE, e.g.
capsule-agent:latest), real WebSockets and a real Chromium.  No key
anywhere: Claude Code cannot reach its service from here, and is not meant
to.

Without the agent image these tests are skipped, unless
CAPSULE_REQUIRE_DOCKER=1 makes them fail.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.support.httpclient import request

from .harness import WSClient, docker_client, poll, session_container, wait_for

AGENT_IMAGE = os.environ.get("CAPSULE_TEST_AGENT_IMAGE")
CONFIG_DIR = "/home/developer/.claude"
NO_LOGIN = "capsule: no Anthropic key, no login yet."
SHOTS = Path(os.environ.get("CAPSULE_SCREENSHOTS") or "/tmp/shots/claude")
# Every key capsule or Claude Code reads as a credential: none here.
KEYS = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN")

needs_agent = pytest.mark.skipif(
    not AGENT_IMAGE and not os.environ.get("CAPSULE_REQUIRE_DOCKER"),
    reason="set CAPSULE_TEST_AGENT_IMAGE to the agent image (make image)")


def claude_server(make_server, *args):
    assert AGENT_IMAGE, "CAPSULE_TEST_AGENT_IMAGE is not set"
    server = make_server("--pool-size", "0", "--grace", "30", "--agent-image", AGENT_IMAGE,
                         "--default-profile", "claude", *args, start=False)
    for name in KEYS:
        server.env.pop(name, None)
    return server.start()


def container_of(session_id):
    return docker_client().containers.get(session_container(session_id))


def in_container(session_id: str, command: str) -> str:
    code, out = container_of(session_id).exec_run(["sh", "-c", command], user="developer")
    assert code == 0, out
    return out.decode()


def volumes(instance: str) -> list:
    return docker_client().volumes.list(filters={"label": f"io.capsule.instance={instance}"})


def remove_volumes(instance: str) -> None:
    for volume in volumes(instance):
        try:
            volume.remove(force=True)
        except Exception:
            pass


async def end(server, session_id: str, headers=()) -> None:
    answer = await deferToThread(request, f"{server.url}/api/sessions/{session_id}",
                                 "DELETE", list(headers))
    assert answer.status in (200, 204), answer
    await deferToThread(wait_for, lambda: server.containers() == [], 60,
                        "the session's container removed")


async def claude_runs(session_id: str) -> None:
    container = container_of(session_id)

    async def running():
        top = await deferToThread(container.top, ps_args="-eo pid,args")
        return any(p[-1].split()[0].endswith("claude") for p in top["Processes"])
    await poll(running, 90, "claude running in the container")


async def open_claude(server, headers=None) -> tuple[WSClient, str]:
    # No ?profile=: the default one.
    client = await WSClient.connect(server.ws_url, headers=headers) if headers \
        else await WSClient.connect(server.ws_url)
    # A large image on a busy engine may take a while to start.
    session_id = await client.start(120, 40, timeout=90)
    return client, session_id


@needs_agent
@pytest_twisted.ensureDeferred
async def test_without_users_claude_says_how_to_log_in_and_a_login_survives(make_server):
    server = claude_server(make_server)
    try:
        client, first = await open_claude(server)
        container = container_of(first)
        assert container.labels["io.capsule.profile"] == "claude"
        assert f"CLAUDE_CONFIG_DIR={CONFIG_DIR}" in container.attrs["Config"]["Env"]
        # No key: the terminal says so, and how to log in, before Claude Code.
        await client.until(NO_LOGIN, 90)
        await client.until("type /login in Claude Code\r\n"
                           r"\(the login is kept for your next sessions\),", 10)
        await claude_runs(first)
        # Claude Code's whole state on the local user's volume: onboarded,
        # /workspace trusted.
        [mount] = [m for m in container.attrs["Mounts"] if m["Destination"] == CONFIG_DIR]
        assert mount["Type"] == "volume"
        assert mount["Name"].startswith(f"capsule-{server.instance}-claude-local-")
        config = json.loads(in_container(first, "cat $CLAUDE_CONFIG_DIR/.claude.json"))
        assert config["hasCompletedOnboarding"] is True
        assert config["projects"]["/workspace"]["hasTrustDialogAccepted"] is True
        # A login (what /login leaves there), and a file of the user's.
        in_container(first, "echo kept > $CLAUDE_CONFIG_DIR/mine;"
                            " echo '{\"claudeAiOauth\": {}}' > $CLAUDE_CONFIG_DIR/.credentials.json")
        await client.close()
        await end(server, first)

        client, second = await open_claude(server)
        assert second != first
        await claude_runs(second)
        assert in_container(second, "cat $CLAUDE_CONFIG_DIR/mine") == "kept\n"
        # Logged in: nothing said.
        assert NO_LOGIN.encode() not in client.out.kept
        [mount] = [m for m in container_of(second).attrs["Mounts"]
                   if m["Destination"] == CONFIG_DIR]
        assert mount["Name"].startswith(f"capsule-{server.instance}-claude-local-")
        await client.close()
        assert [v.attrs["Labels"]["io.capsule.user"] for v in volumes(server.instance)] == [""]
    finally:
        server.stop()
        server.remove_containers()
        remove_volumes(server.instance)


@needs_agent
@pytest_twisted.ensureDeferred
async def test_a_users_claude_state_is_in_their_next_session(make_server, tmp_path):
    token = "ann-token-" + "1" * 30
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ann:{token}\n")
    tokens.chmod(0o600)
    server = claude_server(make_server, "--tokens", str(tokens))
    headers = {"Authorization": f"Bearer {token}"}
    try:
        client, first = await open_claude(server, headers)
        await client.until(NO_LOGIN, 90)
        in_container(first, "echo ann > $CLAUDE_CONFIG_DIR/mine")
        await client.close()
        await end(server, first, headers.items())
        client, second = await open_claude(server, headers)
        await client.until(NO_LOGIN, 90)
        assert in_container(second, "cat $CLAUDE_CONFIG_DIR/mine") == "ann\n"
        await client.close()
        [volume] = volumes(server.instance)
        assert volume.attrs["Labels"]["io.capsule.user"] == "ann"
        assert volume.name.startswith(f"capsule-{server.instance}-claude-ann-")
    finally:
        server.stop()
        server.remove_containers()
        remove_volumes(server.instance)


# -- in Chromium ----------------------------------------------------------------------------

from .test_browser import CHROMIUM, browser, wait_text  # noqa: E402,F401


def unwrapped(page) -> str:
    """
    The terminal's text with its rows joined: a line wrapped on a narrow
    screen reads whole.
    """
    return page.evaluate("() => { const rows = document.querySelector('.xterm-rows');"
                         " return rows === null ? '' : rows.innerText"
                         ".replace(/\\u00a0/g, ' ').replace(/\\n/g, ''); }")


def wait_unwrapped(page, text: str, timeout: float) -> None:
    page.wait_for_function(
        "t => { const rows = document.querySelector('.xterm-rows');"
        " return rows !== null && rows.innerText.replace(/\\u00a0/g, ' ')"
        ".replace(/\\n/g, '').includes(t); }", arg=text, timeout=timeout)


@needs_agent
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine")
@pytest.mark.parametrize("viewport", [(1000, 600), (390, 844)], ids=["desktop", "phone"])
def test_the_plain_url_shows_claude_code(make_server, browser, viewport):  # noqa: F811
    server = claude_server(make_server)
    try:
        width, height = viewport
        context = browser.new_context(viewport={"width": width, "height": height})
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + "/")
        page.wait_for_selector('#status[data-state="connected"]', timeout=90000)
        wait_text(page, "#profile", "^claude$")
        assert page.title() == "capsule \u00b7 claude"
        wait_unwrapped(page, NO_LOGIN, 90000)
        SHOTS.mkdir(parents=True, exist_ok=True)
        name = f"claude-{width}x{height}"
        page.screenshot(path=str(SHOTS / f"{name}-message.png"))
        # Then Claude Code's own screen, in /workspace, onboarded (no theme
        # to pick, no folder to trust): it asks for a login.
        wait_unwrapped(page, "Not logged in", 90000)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(SHOTS / f"{name}.png"))
        text = unwrapped(page)
        assert "To log in, type /login in Claude Code(the login is kept" in text and "/workspace" in text, text
        assert "trust" not in text.lower(), text
        assert errors == []
        context.close()
    finally:
        server.stop()
        server.remove_containers()
        remove_volumes(server.instance)


@needs_agent
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine")
def test_a_bypass_profile_runs_claude_code_without_asking(make_server, browser,  # noqa: F811
                                                          tmp_path):
    profiles = tmp_path / "profiles.toml"
    profiles.write_text('[profiles.yolo]\nextends = "claude"\nagent_permissions = "bypass"\n')
    server = claude_server(make_server, "--profiles", str(profiles))
    try:
        context = browser.new_context(viewport={"width": 1000, "height": 600})
        page = context.new_page()
        page.goto(server.url + "/?profile=yolo")
        page.wait_for_selector('#status[data-state="connected"]', timeout=90000)
        wait_text(page, "#profile", "^yolo$")
        # As uid 1000, no IS_SANDBOX needed; its warning accepted ahead:
        # straight to its prompt, in bypass mode.
        wait_unwrapped(page, "Not logged in", 90000)
        wait_unwrapped(page, "bypass permissions on", 10000)
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "claude-bypass-1000x600.png"))
        session_id = page.get_attribute("#session", "title")
        top = container_of(session_id).top(ps_args="-eo pid,args")["Processes"]
        assert any(p[-1].startswith("claude --dangerously-skip-permissions") for p in top), top
        settings = json.loads(in_container(session_id, "cat $CLAUDE_CONFIG_DIR/settings.json"))
        assert settings == {"skipDangerousModePermissionPrompt": True}
        context.close()
    finally:
        server.stop()
        server.remove_containers()
        remove_volumes(server.instance)


# -- the page, against a scripted server ---------------------------------------------------

from . import test_page_agent  # noqa: E402
from .test_page_protocol import ScriptedServer, page_url, until  # noqa: E402,F401

new_page = test_page_agent.new_page
watched_page = test_page_agent.watched_page


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine")
def test_the_page_names_the_profile_and_keeps_it_in_the_title(page_url, watched_page):  # noqa: F811
    """
    The bar and the title name the session's profile (the connected
    frame's); the title says so again once the tab, having shown "your
    agent is waiting", is seen again.
    """
    page = watched_page(grant=False)

    def on_resize(ws):
        ws.send(json.dumps({"type": "connected", "session_id": str(uuid.uuid4()),
                            "resumed": False, "offset": 0, "window": 1 << 20, "replay": 0,
                            "profile": "claude"}))
        ws.send(b"$ ")
    server = ScriptedServer(page, on_resize)
    page.goto(page_url)
    page.wait_for_selector('#status[data-state="connected"]')
    wait_text(page, "#profile", "^claude$")
    assert page.title() == "capsule \u00b7 claude"
    test_page_agent.hide(page)
    server.sockets[0].send(b"\x07")
    until(page, lambda: page.title() == test_page_agent.WAITING_TITLE, "the waiting title")
    test_page_agent.hide(page, False)
    assert page.title() == "capsule \u00b7 claude"
    assert page.errors == []

