"""
The terminal page in a real headless Chromium against a real capsule.

C{CAPSULE_TEST_WWW} serves another copy of the page (to check that a test
fails against an older one); C{CAPSULE_SCREENSHOTS} names a directory that
receives a screenshot of each state the tests reach.
"""

import json
import os
import re
import shutil
import tarfile
import uuid
from pathlib import Path

import pytest

from .harness import docker_client, session_container

CHROMIUM = os.environ.get("CAPSULE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
WWW = os.environ.get("CAPSULE_TEST_WWW")
SCREENSHOTS = os.environ.get("CAPSULE_SCREENSHOTS")

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine")


def page_args(*args: str) -> tuple[str, ...]:
    return (*args, "--www", WWW) if WWW else args


@pytest.fixture
def server(make_server):
    return make_server(*page_args("--grace", "30"), tuning={"cleanup-interval": 0.5})


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def new_page(browser):
    def make():
        context = browser.new_context(viewport={"width": 1000, "height": 600},
                                      accept_downloads=True)
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.errors = errors
        return page
    return make


@pytest.fixture
def page(server, new_page):
    return new_page()


def screen(page) -> str:
    return page.inner_text(".xterm-rows")


def wait_screen(page, pattern: str, timeout: float = 15000) -> None:
    # The terminal's rows may not be there yet: the page's modules run after it loaded.
    page.wait_for_function(
        "p => { const rows = document.querySelector('.xterm-rows');"
        " return rows !== null && new RegExp(p).test(rows.innerText); }",
        arg=pattern, timeout=timeout)


def wait_text(page, selector: str, pattern: str, timeout: float = 15000) -> None:
    page.wait_for_function(
        "([s, p]) => new RegExp(p).test(document.querySelector(s).textContent)",
        arg=[selector, pattern], timeout=timeout)


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


def trace(page):
    """
    Keep what C{page}'s console and WebSockets say (C{page.trail}), for
    L{wait_connected} to tell when the page does not connect.
    """
    if getattr(page, "trail", None) is not None:
        return page
    trail = page.trail = []
    if getattr(page, "errors", None) is None:
        page.errors = []
        page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("console", lambda m: trail.append(f"console {m.type}: {m.text[:300]}"))

    def socket(ws):
        trail.append(f"websocket {ws.url[:160]}")
        ws.on("framereceived", lambda payload: trail.append(
            f"  frame: {payload[:200]!r}") if isinstance(payload, str) else None)
        ws.on("socketerror", lambda error: trail.append(f"  socket error: {error}"))
        ws.on("close", lambda _: trail.append("  closed"))
    page.on("websocket", socket)
    return page


def wait_connected(page, timeout: float = 20000) -> None:
    """
    Wait for the page's terminal to be connected; if it is not, fail with
    what the page shows, and what its console and WebSockets said (where
    L{trace} was on).
    """
    try:
        page.wait_for_selector('#status[data-state="connected"]', timeout=timeout)
    except Exception:
        state = page.get_attribute("#status", "data-state")
        bar = page.text_content("#status")
        pytest.fail(f"the page is not connected: state {state!r}, bar {bar!r}, page errors"
                    f" {getattr(page, 'errors', None)}; what happened:\n"
                    + "\n".join(getattr(page, "trail", None) or ["(not traced)"]))


def open_session(page, url: str) -> str:
    trace(page)
    page.goto(url + "/")
    wait_connected(page)
    wait_screen(page, r"developer@capsule")
    return page.get_attribute("#session", "title")


def status(page) -> str:
    return page.inner_text("#status-label") + " | " + page.inner_text("#status-message") \
        + " | " + page.inner_text("#status-countdown")


def shot(page, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"))


def read_file(session_id: str, path: str) -> bytes | None:
    container = docker_client().containers.get(session_container(session_id))
    result = container.exec_run(["cat", path])
    return result.output if result.exit_code == 0 else None


def wait_file(session_id: str, path: str, pattern: bytes, page, timeout_ms: float = 15000) -> bytes:
    """
    The file's content once it matches C{pattern} (polled with a deadline).
    """
    deadline = timeout_ms
    while True:
        content = read_file(session_id, path)
        if content is not None and re.search(pattern, content):
            return content
        if deadline <= 0:
            raise AssertionError(f"{path} never matched {pattern!r}: {content!r}")
        page.wait_for_timeout(200)
        deadline -= 200


def test_page_terminal_reload_export_and_exit(server, page, tmp_path):
    session_id = open_session(page, server.url)
    type_line(page, "echo $((6*7))__RDY")
    wait_screen(page, r"42__RDY")

    # The shell sees the window's size, and a new one when it changes.
    first = stty_size(page, "A")
    page.set_viewport_size({"width": 700, "height": 400})
    page.wait_for_timeout(500)
    second = stty_size(page, "B")
    assert second[1] < first[1] and second[0] < first[0]

    # A reload comes back to the same shell.
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
    archive = tmp_path / "export.tar.gz"
    download.save_as(archive)
    with tarfile.open(archive) as tar:
        assert any(name.endswith("from-browser.txt") for name in tar.getnames())
    assert page.inner_text("#status-message") == "resumed session"

    type_line(page, "exit 7")
    page.wait_for_selector('#status[data-state="ended"]', timeout=20000)
    assert "7" in page.inner_text("#status-message") + page.inner_text("#status")
    assert page.errors == []


# --- replayed output is not answered (issue 8, defect 4) ---------------------------

QUERIES = (r"\e[?1004h\e[c\e[>c\e[6n\e[?6n\e[5n\e]10;?\a\e]11;?\e\\"
           r"\e]4;1;?\a\e[?2004\$p\e[18t\eP\$qm\e\\\e[?1004l")


def test_page_does_not_answer_replayed_queries(server, page):
    """
    Terminal queries in replayed output are not answered again: after a
    reload, nothing but what is typed reaches a program reading the
    terminal. Queries made after the replay are answered.
    """
    session_id = open_session(page, server.url)
    # The page answers the queries live; read swallows the answers.
    type_line(page, f"printf '{QUERIES}'; read -rs -t 2 -N 100000 live; echo ANSWERED${{#live}}BYTES")
    wait_screen(page, r"ANSWERED\d+BYTES")
    answered = int(re.search(r"ANSWERED(\d+)BYTES", screen(page)).group(1))
    assert answered > 0, "the page did not answer live queries"
    type_line(page, "stty -echo; cat -v > /workspace/replayed.txt")
    wait_file(session_id, "/workspace/replayed.txt", rb"^$", page)

    page.reload()
    page.wait_for_selector('#status[data-state="connected"]', timeout=20000)
    # The replay is on screen: xterm has parsed the queries in it.
    wait_screen(page, r"ANSWERED\d+BYTES")
    type_line(page, "MARK")
    page.keyboard.press("Control+D")
    content = wait_file(session_id, "/workspace/replayed.txt", rb"MARK", page)
    assert content == b"MARK\n"

    # A query made now is answered.
    type_line(page, r"stty echo; printf '\e[6n'; read -rs -d R -t 5 cpr; echo CPR${cpr#*[}RPC")
    wait_screen(page, r"CPR\d+;\d+RPC")
    assert page.errors == []


# --- a restart of capsule (issue 8, defects 5 and 1) ----------------------------------

def on_port(server, port: int):
    """
    C{server}, set to listen on C{port} (before it starts).
    """
    server.port = port
    server.args = [f"tcp:{port}:interface=127.0.0.1" if a.startswith("tcp:") else a
                   for a in server.args]
    return server


def test_page_waits_for_a_restarting_capsule(make_server, new_page):
    """
    A clean stop of capsule (close 4001): the page says capsule is restarting
    and when it tries again, keeps trying, and resumes the same shell once
    capsule is back on its port.
    """
    first = make_server(*page_args("--grace", "60", "--pool-size", "0"))
    page = new_page()
    session_id = open_session(page, first.url)
    type_line(page, "export KEPT=restart-ok; cd /tmp")

    first.stop()
    page.wait_for_selector('#status[data-state="reconnecting"]', timeout=10000)
    wait_text(page, "#status-message", r"^capsule is restarting$")
    wait_text(page, "#status-countdown", r"^(next try in \d+ s|trying now) \(attempt \d+\)$")
    # Attempts keep failing while capsule is down; the page still knows why.
    wait_text(page, "#status-countdown", r"\(attempt [4-9]\)$", timeout=20000)
    assert page.inner_text("#status-message") == "capsule is restarting", status(page)
    assert page.get_attribute("#status", "data-state") == "reconnecting"
    # The page cannot reach the session meanwhile: no export, and its title says why.
    assert page.is_disabled("#export")
    assert page.get_attribute("#export", "title") == \
        "Export is not available: the page is disconnected from the session (reconnecting)"
    shot(page, "restarting")

    # The same instance on the same port: the page's URL.
    on_port(make_server(*page_args("--grace", "60", "--pool-size", "0"),
                        instance=first.instance, start=False), first.port).start()
    page.wait_for_selector('#status[data-state="connected"]', timeout=30000)
    assert page.get_attribute("#session", "title") == session_id
    assert page.inner_text("#status-countdown") == ""
    type_line(page, "echo $KEPT:$PWD")
    wait_screen(page, r"restart-ok:/tmp")
    shot(page, "resumed")
    assert page.errors == []


def test_page_keeps_its_session_through_refusals_during_a_restart(server, new_page):
    """
    A restarting capsule may refuse a session it has not recovered yet
    (4404): within the restart window the page keeps its session id and
    tries again.
    """
    page = new_page()
    plan: list[str] = []
    live = []

    def route(ws):
        if plan and plan.pop(0) == "refuse":
            ws.send('{"type": "error", "code": "session_not_found", "message": "no such session"}')
            ws.close(code=4404, reason="session_not_found")
            return
        ws.connect_to_server()
        live.append(ws)

    page.route_web_socket(re.compile(r"/ws(\?|$)"), route)
    session_id = open_session(page, server.url)
    type_line(page, "export KEPT=still-here")
    plan.extend(["refuse", "refuse"])
    live[-1].close(code=4001, reason="capsule is restarting")
    page.wait_for_selector('#status[data-state="connected"]', timeout=30000)
    assert plan == []
    assert page.get_attribute("#session", "title") == session_id
    type_line(page, "echo $KEPT")
    wait_screen(page, r"still-here")
    assert page.errors == []


# --- sessions that are gone, and exports that fail (issue 8, defects 1 and 6) ---------

def test_page_forgets_an_unknown_session_and_disables_export(server, page):
    """
    Outside a restart, a refusal (4404) means the session is gone: the page
    forgets it and offers a new one; Export is disabled.
    """
    page.goto(f"{server.url}/?session_id={uuid.uuid4()}")
    page.wait_for_selector('#status[data-state="expired"]', timeout=20000)
    assert page.is_disabled("#export")
    assert page.get_attribute("#export", "title").startswith("Export is not available")
    assert page.evaluate("sessionStorage.getItem('capsule.session_id')") is None
    page.click("#action")
    page.wait_for_selector('#status[data-state="connected"]', timeout=20000)
    assert not page.is_disabled("#export")
    assert page.errors == []


def test_page_export_error_and_ended_session(make_server, new_page):
    """
    A failed export says why (the server's message); an ended session has
    Export disabled.  (The session moves its workspace away with sudo,
    which only --allow-sudo gives.)
    """
    server = make_server(*page_args("--grace", "30", "--allow-sudo"),
                         tuning={"cleanup-interval": 0.5})
    page = new_page()
    session_id = open_session(page, server.url)
    type_line(page, "cd / && sudo mv /workspace /tmp/moved && echo MOVED")
    wait_screen(page, r"MOVED")
    page.click("#export")
    wait_text(page, "#status-message", r"^export failed: ")
    message = page.inner_text("#status-message")
    assert "is-error" in page.get_attribute("#status-message", "class")
    assert page.get_attribute("#status", "data-state") == "connected"
    shot(page, "export-error")
    # The message is the server's own.
    code, _, body = server.get(f"/api/export/{session_id}")
    assert code == 404 or code >= 500
    assert message == json.loads(body)["error"]

    type_line(page, "exit")
    page.wait_for_selector('#status[data-state="ended"]', timeout=20000)
    assert page.is_disabled("#export")
    shot(page, "ended")
    assert page.errors == []


# --- the terminal tuned for agents (issue 11) -------------------------------------------

AGENT_IMAGE = os.environ.get("CAPSULE_TEST_AGENT_IMAGE")

# Where the last "│" of the screen's rows that hold `mark` is drawn, in pixels from the
# left: a row's cells line up only when xterm gave each character the cells the shell
# counted.
BAR_POSITIONS = """(mark) => {
    const rows = Array.from(document.querySelectorAll(".xterm-rows > div"))
        .filter((row) => row.textContent.includes(mark));
    return rows.map((row) => {
        const walker = document.createTreeWalker(row, NodeFilter.SHOW_TEXT);
        let last = null;
        for (let node = walker.nextNode(); node; node = walker.nextNode()) {
            const at = node.data.lastIndexOf("\\u2502");
            if (at >= 0) last = [node, at];
        }
        const range = document.createRange();
        range.setStart(last[0], last[1]);
        range.setEnd(last[0], last[1] + 1);
        return Math.round(range.getBoundingClientRect().left);
    });
}"""


def test_page_unicode11_widths(server, page):
    """
    Unicode 11 widths: an emoji takes two cells, in xterm as in the shell's
    count, so box drawing around it lines up.
    """
    open_session(page, server.url)
    assert page.get_attribute("#terminal", "data-unicode") == "11"
    # The cursor after "┌─😀─┐" at the start of a line: column 1 + 1 + 1 + 2 + 1 + 1.
    type_line(page, r"clear; printf '\u250c\u2500\U0001F600\u2500\u2510';"
                    r" IFS='[;' read -rs -d R -t 5 -p $'\e[6n' _ row col; echo; echo COL${col}LOC")
    wait_screen(page, r"COL\d+LOC")
    assert re.search(r"COL(\d+)LOC", screen(page)).group(1) == "7"
    # The same widths when drawn: the closing bars of these two rows are one above the other.
    type_line(page, r"clear; printf 'W\u2502\U0001F600\u2502\nW\u2502ab\u2502\n'")
    wait_screen(page, "W\u2502ab\u2502")
    first, second = page.evaluate(BAR_POSITIONS, "W\u2502")
    assert first == second
    shot(page, "unicode11")
    assert page.errors == []


def test_page_dropped_file_lands_in_the_workspace(server, page):
    """
    A file dropped onto the terminal is in /workspace: the shell reads it.
    """
    session_id = open_session(page, server.url)
    page.evaluate("""() => {
        const transfer = new DataTransfer();
        transfer.items.add(new File(["dropped \\u00e9 content\\n"], "dropped file.txt"));
        transfer.items.add(new File([new Uint8Array([0, 1, 2, 255])], "bytes.bin"));
        document.querySelector("#terminal .xterm-screen").dispatchEvent(new DragEvent("drop",
            { dataTransfer: transfer, bubbles: true, cancelable: true }));
    }""")
    wait_text(page, "#status-message", "^upload(ed| failed)")
    assert page.inner_text("#status-message") == "uploaded 2 files (23 B) to /workspace"
    type_line(page, "cat '/workspace/dropped file.txt'; od -An -tx1 /workspace/bytes.bin;"
                    " stat -c '%U %a' '/workspace/dropped file.txt'")
    wait_screen(page, r"developer \d+")
    text = screen(page)
    assert "dropped \u00e9 content" in text
    assert re.search(r"00\s+01\s+02\s+ff", text)
    assert read_file(session_id, "/workspace/dropped file.txt") == "dropped \u00e9 content\n".encode()
    shot(page, "dropped")
    assert page.errors == []


@pytest.mark.skipif(not AGENT_IMAGE and not os.environ.get("CAPSULE_REQUIRE_DOCKER"),
                    reason="set CAPSULE_TEST_AGENT_IMAGE to the agent image (make image)")
def test_page_profile_claude_shows_the_agent(make_server, new_page):
    """
    C{/?profile=claude} opens a session of the claude profile: Claude Code
    runs in its terminal.
    """
    assert AGENT_IMAGE, "CAPSULE_TEST_AGENT_IMAGE is not set"
    server = make_server(*page_args("--pool-size", "0", "--agent-image", AGENT_IMAGE))
    page = new_page()
    page.goto(server.url + "/?profile=claude")
    page.wait_for_selector('#status[data-state="connected"]', timeout=30000)
    session_id = page.get_attribute("#session", "title")
    container = docker_client().containers.get(session_container(session_id))
    assert container.labels["io.capsule.profile"] == "claude"
    assert container.attrs["Config"]["Image"] == AGENT_IMAGE
    # Claude Code's own screen (its welcome, or its first question).
    wait_screen(page, r"Claude Code|Welcome to Claude|theme", timeout=60000)
    shot(page, "claude")
    assert page.errors == []


def test_page_upload_shows_its_progress(server, page):
    """
    A large upload (the browser's upload slowed to 4 MB/s) says how far it
    got, then that it arrived; the file is whole in /workspace.
    """
    session_id = open_session(page, server.url)
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {
        "offline": False, "latency": 0, "downloadThroughput": -1,
        "uploadThroughput": 4 * 1024 * 1024})
    page.evaluate("""() => {
        window.__said = [];
        const message = document.querySelector("#status-message");
        new MutationObserver(() => window.__said.push(message.textContent))
            .observe(message, { childList: true, characterData: true, subtree: true });
        const transfer = new DataTransfer();
        const big = new Uint8Array(6 * 1024 * 1024);
        for (let i = 0; i < big.length; i += 4096) big[i] = i / 4096 % 251;
        transfer.items.add(new File([big], "big.bin"));
        document.querySelector("#terminal .xterm-screen").dispatchEvent(new DragEvent("drop",
            { dataTransfer: transfer, bubbles: true, cancelable: true }));
    }""")
    wait_text(page, "#status-message", "^upload(ed| failed)", timeout=60000)
    said = page.evaluate("window.__said")
    assert said[-1] == "uploaded 1 file (6.0 MiB) to /workspace", said
    percents = [int(m.group(1)) for m in
                (re.fullmatch(r"uploading 1 file \(6\.0 MiB\): (\d+)%", s) for s in said) if m]
    assert said[0] == "uploading 1 file (6.0 MiB)\u2026"
    assert any(0 < p < 100 for p in percents), said
    assert percents == sorted(percents)
    result = docker_client().containers.get(session_container(session_id)).exec_run(
        ["sh", "-c", "stat -c %s /workspace/big.bin && od -An -tu1 -j 4096 -N 1 /workspace/big.bin"])
    assert result.output.split() == [b"6291456", b"1"]
    assert page.errors == []
