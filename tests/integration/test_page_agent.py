"""
The page's parts for agents, in a real headless Chromium against a scripted
server (the page from disk, its WebSocket and its upload answered by the
test): the profile a new session asks for, a refused profile, the bell and
"your agent is waiting", uploads packed as tar in the page.
"""

import base64
import io
import json
import re
import tarfile
import uuid

import pytest

from . import test_browser
from .test_browser import CHROMIUM, shot, wait_screen, wait_text
from .test_page_protocol import ScriptedServer, connected, page_url, until  # noqa: F401

browser = test_browser.browser
new_page = test_browser.new_page

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine")

WAITING_TITLE = "\u25cf capsule \u2014 your agent is waiting"

# The tab's visibility, set by the test (a headless page is always visible),
# and every notification the page shows, recorded around the browser's own.
HIDDEN_AND_NOTIFICATIONS = """
    window.__hidden = sessionStorage.getItem("test.hidden") === "1";
    Object.defineProperty(Document.prototype, "hidden",
        { configurable: true, get() { return window.__hidden; } });
    Object.defineProperty(Document.prototype, "visibilityState",
        { configurable: true, get() { return window.__hidden ? "hidden" : "visible"; } });
    window.__setHidden = (hidden) => {
        window.__hidden = hidden;
        sessionStorage.setItem("test.hidden", hidden ? "1" : "0");
        document.dispatchEvent(new Event("visibilitychange"));
    };
    window.__notes = [];
    window.__asked = 0;
    if (window.Notification) {
        const Real = window.Notification;
        const ask = Real.requestPermission.bind(Real);
        window.Notification = class extends Real {
            constructor(title, options) {
                super(title, options);
                const note = { title, body: options.body, tag: options.tag, closed: false };
                window.__notes.push(note);
                const close = this.close.bind(this);
                this.close = () => { note.closed = true; close(); };
            }
            static requestPermission() { window.__asked += 1; return ask(); }
        };
    }
"""


def hide(page, hidden: bool = True) -> None:
    page.evaluate("h => window.__setHidden(h)", hidden)


def notes(page) -> list:
    return page.evaluate("window.__notes")


def started(session_id: str, prompt: bytes = b"$ "):
    def on_resize(ws):
        connected(ws, resumed=False, offset=0, replay=0, session_id=session_id)
        ws.send(prompt)
    return on_resize


def ws_query(ws) -> dict:
    """
    The query of a socket the page's bootstrap opened, without the terminal
    size it gives (both C{cols} and C{rows}, as digits: checked here).
    """
    query = dict(re.findall(r"[?&]([^=&]+)=([^&]*)", ws.url))
    cols, rows = query.pop("cols", ""), query.pop("rows", "")
    assert cols.isdigit() and rows.isdigit(), ws.url
    return query


# --- profiles ---------------------------------------------------------------------------

def test_page_asks_for_the_profile_of_its_url_for_a_new_session_only(page_url, new_page):
    """
    C{/?profile=claude} goes on to C{/ws?profile=claude} when the page opens
    a new session; a session it resumes keeps its own profile.
    """
    page = new_page()
    session_id = str(uuid.uuid4())
    server = ScriptedServer(page, started(session_id))
    page.goto(page_url + "?profile=claude")
    page.wait_for_selector('#status[data-state="connected"]')
    assert ws_query(server.sockets[0]) == {"profile": "claude"}

    # A reload resumes the session: its id and offset, no profile.
    page.reload()
    until(page, lambda: len(server.sockets) == 2, "the second connection")
    assert ws_query(server.sockets[1]) == {"session_id": session_id, "offset": "0"}
    page.wait_for_selector('#status[data-state="connected"]')
    assert page.errors == []


def test_page_without_a_profile_asks_for_none(page_url, new_page):
    page = new_page()
    server = ScriptedServer(page, started(str(uuid.uuid4())))
    page.goto(page_url)
    page.wait_for_selector('#status[data-state="connected"]')
    assert ws_query(server.sockets[0]) == {}
    assert page.errors == []


@pytest.mark.parametrize("close_code", [4400, 1008])
def test_page_shows_an_unknown_profile_and_does_not_retry(page_url, new_page, close_code):
    """
    An C{unknown_profile} error frame: its message (the profiles there are)
    is in the status bar, and the page does not ask again, whatever the
    close code.
    """
    page = new_page()
    sockets = []
    message = "there is no profile 'nope'; the profiles are: shell, claude"

    def route(ws):
        sockets.append(ws)
        ws.send(json.dumps({"type": "error", "code": "unknown_profile", "message": message}))
        ws.close(code=close_code, reason="unknown_profile")

    page.route_web_socket(re.compile(r"/ws(\?|$)"), route)
    page.goto(page_url + "?profile=nope")
    page.wait_for_selector('#status[data-state="refused"]')
    assert ws_query(sockets[0]) == {"profile": "nope"}
    assert page.inner_text("#status-message") == message
    assert "is-error" in page.get_attribute("#status-message", "class")
    assert page.inner_text("#status-label") == "error"
    assert page.is_hidden("#action")
    assert page.is_disabled("#upload") and page.is_disabled("#export")
    shot(page, "unknown-profile")
    # No second attempt (the first retry would come after 500 ms).
    page.wait_for_timeout(1500)
    assert len(sockets) == 1
    assert page.errors == []


# --- the bell, and an agent waiting -----------------------------------------------------

@pytest.fixture
def watched_page(new_page):
    def make(grant: bool):
        page = new_page()
        if grant:
            page.context.grant_permissions(["notifications"])
        page.add_init_script(HIDDEN_AND_NOTIFICATIONS)
        return page
    return make


def test_page_says_when_the_agent_waits_while_the_tab_is_hidden(page_url, watched_page):
    """
    While the tab is hidden, output that stops (after 10 s) changes the title
    and, with notifications on, shows one; the tab seen again has its title
    back and the notification closed.
    """
    page = watched_page(grant=True)
    session_id = str(uuid.uuid4())
    server = ScriptedServer(page, started(session_id))
    page.goto(page_url)
    page.wait_for_selector('#status[data-state="connected"]')
    assert page.title() == "capsule"
    assert page.get_attribute("#notify", "data-on") == "false"
    page.click("#notify")
    until(page, lambda: page.get_attribute("#notify", "data-on") == "true", "notifications on")
    # Granted already: nothing was asked.
    assert page.evaluate("window.__asked") == 0
    wait_text(page, "#status-message", "^notifications on")
    shot(page, "notify-on")

    ws = server.sockets[0]
    hide(page)
    ws.send(b"thinking...\r\n")
    wait_screen(page, "thinking")
    assert page.title() == "capsule"
    until(page, lambda: page.title() == WAITING_TITLE, "the waiting title", 20000)
    [note] = notes(page)
    assert note["title"] == "your agent is waiting"
    assert note["body"] == f"capsule {session_id[:8]}: its output stopped 10 s ago"
    assert note["closed"] is False
    shot(page, "waiting-title")

    hide(page, False)
    assert page.title() == "capsule"
    assert notes(page)[0]["closed"] is True

    # The bell while hidden: at once.
    hide(page)
    ws.send(b"\x07")
    until(page, lambda: page.title() == WAITING_TITLE, "the title after the bell")
    assert notes(page)[1]["body"] == f"capsule {session_id[:8]}: the terminal rang its bell"
    hide(page, False)
    assert page.title() == "capsule"
    assert page.errors == []


def test_page_ignores_a_bell_while_visible_or_replayed(page_url, watched_page):
    """
    A bell in a tab that is seen, or in replayed output (it rang before this
    page saw it), changes nothing.
    """
    page = watched_page(grant=True)
    session_id = str(uuid.uuid4())
    server = ScriptedServer(page, started(session_id))
    page.goto(page_url)
    page.wait_for_selector('#status[data-state="connected"]')
    page.click("#notify")
    until(page, lambda: page.get_attribute("#notify", "data-on") == "true", "notifications on")
    server.sockets[0].send(b"\x07seen\r\n")
    wait_screen(page, "seen")
    assert page.title() == "capsule"

    # Hidden, and a reload resumes with a replay that holds a bell.
    replay = b"\x07replayed\r\n"
    server._on_resize = lambda ws: (connected(ws, replay=len(replay), session_id=session_id),
                                    ws.send(replay + b"live\r\n"))
    hide(page)
    page.reload()
    wait_screen(page, "live")
    # xterm rings the bell as it parses, before the text after it is drawn.
    assert page.evaluate("document.hidden") is True
    assert page.title() == "capsule"
    assert notes(page) == []
    assert page.errors == []


def test_page_asks_for_notifications_on_a_click_only(page_url, watched_page):
    """
    Nothing is asked when the page loads; a click on the bell asks, and a
    refusal is said (Chromium refuses without a prompt in a test).
    """
    page = watched_page(grant=False)
    ScriptedServer(page, started(str(uuid.uuid4())))
    page.goto(page_url)
    page.wait_for_selector('#status[data-state="connected"]')
    assert page.evaluate("window.__asked") == 0
    page.click("#notify")
    until(page, lambda: page.evaluate("window.__asked") == 1, "the permission request")
    wait_text(page, "#status-message", "^notifications (were not allowed|are blocked)")
    assert page.get_attribute("#notify", "data-on") == "false"
    shot(page, "notify-refused")
    assert page.errors == []


# --- upload -----------------------------------------------------------------------------

def read_tar(data: bytes) -> dict:
    """
    name -> (type, mode, content) of every member of a tar archive.
    """
    members = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            content = tar.extractfile(member).read() if member.isfile() else None
            members[member.name] = ("dir" if member.isdir() else "file", member.mode, content)
    return members


# The page's tar writer (www/js/tar.js), imported by the page.
TAR = "const { pack } = await import(new URL('js/tar.js', location.href).href);"

PACK = """async (entries) => {
    """ + TAR + """
    const packed = pack(entries.map(([path, text]) => text === null
        ? { path, directory: true }
        : { path, file: new File([text], path.split("/").pop()) }));
    const bytes = new Uint8Array(await packed.blob.arrayBuffer());
    let binary = "";
    for (const byte of bytes) binary += String.fromCharCode(byte);
    return { data: btoa(binary), files: packed.files, directories: packed.directories,
             bytes: packed.bytes, type: packed.blob.type };
}"""


def test_page_tar_writer(page_url, new_page):
    """
    The page's tar holds files, their parent directories and empty ones,
    names of any length and characters (ustar's prefix, or a pax header),
    and is read back by Python's tarfile exactly.
    """
    page = new_page()
    page.goto(page_url)
    long_dir = "d" * 120
    split_name = f"{long_dir}/{'f' * 90}.txt"          # 215 bytes: ustar prefix + name
    pax_name = "p" * 300 + ".txt"                         # no slash to split at: pax
    deep_name = "/".join(["segment"] * 40) + "/x"         # 321 bytes: pax
    entries = [
        ["top.txt", "top\n"],
        ["/dir//sub/./nested.txt", "nested"],
        [split_name, "split"],
        [pax_name, "pax"],
        [deep_name, ""],
        ["\u00fcn\u00efc\u00f6de \U0001F600.txt", "utf-8 \u00e9"],
        ["empty", None],
        ["block.bin", "x" * 512],
    ]
    packed = page.evaluate(PACK, entries)
    data = base64.b64decode(packed["data"])
    assert len(data) % 512 == 0 and data[-1024:] == bytes(1024)
    assert packed["type"] == "application/x-tar"
    members = read_tar(data)
    assert members["top.txt"] == ("file", 0o644, b"top\n")
    assert members["dir"] == ("dir", 0o755, None)
    assert members["dir/sub"] == ("dir", 0o755, None)
    assert members["dir/sub/nested.txt"] == ("file", 0o644, b"nested")
    assert members[long_dir] == ("dir", 0o755, None)
    assert members[split_name] == ("file", 0o644, b"split")
    assert members[pax_name] == ("file", 0o644, b"pax")
    assert members[deep_name] == ("file", 0o644, b"")
    assert members["\u00fcn\u00efc\u00f6de \U0001F600.txt"] == ("file", 0o644, "utf-8 \u00e9".encode())
    assert members["empty"] == ("dir", 0o755, None)
    assert members["block.bin"] == ("file", 0o644, b"x" * 512)
    directories = {name for name, (kind, _, _) in members.items() if kind == "dir"}
    assert len(members) == 8 + len(directories) - 1
    assert packed["files"] == 7 and packed["directories"] == len(directories)
    assert packed["bytes"] == sum(len(c) for _, (k, _, c) in members.items() if k == "file")
    # The ustar fields themselves: the split name is in prefix and name.
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        member = tar.getmember(split_name)
        assert member.pax_headers == {}
        assert tar.getmember(pax_name).pax_headers == {"path": pax_name}
    assert page.errors == []


@pytest.mark.parametrize("path, message", [
    ("../escape.txt", 'a name may not contain "..": ../escape.txt'),
    ("a/../../b", 'a name may not contain "..": a/../../b'),
    ("..", 'a name may not contain "..": ..'),
    ("/", 'not a file name: "/"'),
    ("", 'not a file name: ""'),
    ("a\0b", "a name may not contain a NUL character"),
])
def test_page_tar_writer_refuses_names_that_leave_the_directory(page_url, new_page, path,
                                                                message):
    page = new_page()
    page.goto(page_url)
    error = page.evaluate("""async p => {
        """ + TAR + """
        try { pack([{ path: p, file: new File(["x"], "x") }]); return null; }
        catch (e) { return e.message; }
    }""", path)
    assert error == message


class UploadCatcher:
    """
    Answers the page's uploads with C{status} and C{body}; keeps each request.
    """

    def __init__(self, page, status=200, body=None) -> None:
        self.requests = []
        self.status = status
        self.body = body or {"files": 1}
        page.route(re.compile(r"/api/sessions/[^/]+/workspace$"), self._route)

    def _route(self, route) -> None:
        request = route.request
        self.requests.append({
            "url": request.url, "method": request.method,
            "headers": request.headers, "body": request.post_data_buffer,
        })
        route.fulfill(status=self.status, content_type="application/json",
                      body=json.dumps(self.body))


DROP = """(files) => {
    const transfer = new DataTransfer();
    for (const [name, text] of files) transfer.items.add(new File([text], name));
    const target = document.querySelector("#terminal .xterm-screen") || document.body;
    for (const type of ["dragenter", "dragover", "drop"]) {
        target.dispatchEvent(new DragEvent(type,
            { dataTransfer: transfer, bubbles: true, cancelable: true }));
    }
}"""


def drop(page, files) -> None:
    page.evaluate(DROP, files)


def upload_page(page_url, new_page, session_id: str | None = None, **answer):
    """
    A page connected to a scripted session (C{session_id}, else a new one)
    whose uploads an L{UploadCatcher} answers (with C{answer}): the page
    and the catcher.
    """
    page = new_page()
    ScriptedServer(page, started(session_id or str(uuid.uuid4())))
    catcher = UploadCatcher(page, **answer)
    page.goto(page_url)
    page.wait_for_selector('#status[data-state="connected"]')
    return page, catcher


def test_page_uploads_dropped_files_as_a_tar(page_url, new_page):
    """
    Files dropped onto the terminal are posted, as one tar, to the session's
    C{/workspace}; the status bar says what went.
    """
    session_id = str(uuid.uuid4())
    page, catcher = upload_page(page_url, new_page, session_id)
    assert not page.is_disabled("#upload")
    drop(page, [["notes.md", "# notes\n"], ["data.bin", "\x00\x01"]])
    wait_text(page, "#status-message", "^uploaded ")
    assert page.inner_text("#status-message") == "uploaded 2 files (10 B) to /workspace"
    [request] = catcher.requests
    assert request["method"] == "POST"
    assert request["url"].endswith(f"/api/sessions/{session_id}/workspace")
    assert request["headers"]["content-type"] == "application/x-tar"
    assert read_tar(request["body"]) == {
        "notes.md": ("file", 0o644, b"# notes\n"),
        "data.bin": ("file", 0o644, b"\x00\x01"),
    }
    assert page.is_hidden("#drop-zone")
    shot(page, "uploaded")
    assert page.errors == []


def test_page_uploads_picked_files(page_url, new_page, tmp_path):
    page, catcher = upload_page(page_url, new_page)
    (tmp_path / "one.txt").write_text("one")
    (tmp_path / "two.txt").write_text("two!")
    with page.expect_file_chooser() as chooser:
        page.click("#upload")
    assert chooser.value.is_multiple()
    chooser.value.set_files([tmp_path / "one.txt", tmp_path / "two.txt"])
    wait_text(page, "#status-message", "^uploaded ")
    assert page.inner_text("#status-message") == "uploaded 2 files (7 B) to /workspace"
    [request] = catcher.requests
    assert read_tar(request["body"]) == {
        "one.txt": ("file", 0o644, b"one"),
        "two.txt": ("file", 0o644, b"two!"),
    }
    assert page.errors == []


@pytest.mark.parametrize("status, body, message", [
    (413, {"error": "the upload is larger than 1.0 GiB", "code": "too_large"},
     "upload failed: the upload is larger than 1.0 GiB"),
    (400, {"error": "refused ../x: outside /workspace", "code": "bad_entry"},
     "upload failed: refused ../x: outside /workspace"),
    (413, "not json", "upload failed: too large for capsule's upload limit"),
    (502, "x" * 5000, "upload failed: HTTP 502"),
])
def test_page_says_why_an_upload_failed(page_url, new_page, status, body, message):
    page, _ = upload_page(page_url, new_page, status=status, body=body)
    drop(page, [["big.bin", "0123456789"]])
    wait_text(page, "#status-message", "^upload failed")
    assert page.inner_text("#status-message") == message
    assert "is-error" in page.get_attribute("#status-message", "class")
    assert not page.is_disabled("#upload")
    if status == 413 and isinstance(body, dict):
        shot(page, "upload-too-large")
    assert page.errors == []


def test_page_has_no_upload_without_a_session(page_url, new_page):
    """
    Before a session is connected (and after it ended) there is nowhere to
    upload to: the button is disabled and a drop posts nothing.
    """
    page = new_page()
    catcher = UploadCatcher(page)
    page.route_web_socket(re.compile(r"/ws(\?|$)"), lambda ws: None)
    page.goto(page_url)
    # The page's scripts run after its first screen: the terminal says they did.
    page.wait_for_selector(".xterm")
    assert page.is_disabled("#upload")
    drop(page, [["x.txt", "x"]])
    wait_text(page, "#status-message", "^Upload is not available: there is no session")
    assert catcher.requests == []
    assert page.errors == []


# --- links ------------------------------------------------------------------------------

def test_page_opens_a_link_in_a_new_tab_without_an_opener(page_url, new_page):
    """
    A URL in the terminal is a link: a click opens it in a new tab, which
    cannot reach back to the terminal's page.
    """
    page = new_page()
    page.context.route("http://capsule-link.test/**", lambda route: route.fulfill(
        status=200, content_type="text/html", body="<title>linked</title>"))
    ScriptedServer(page, started(str(uuid.uuid4()), b"see http://capsule-link.test/path?q=1 ok\r\n$ "))
    page.goto(page_url)
    wait_screen(page, "capsule-link")
    box = page.evaluate("""() => {
        const row = Array.from(document.querySelectorAll(".xterm-rows > div"))
            .find((r) => r.textContent.includes("capsule-link"));
        const text = row.firstChild.nodeType === Node.TEXT_NODE ? row.firstChild : row.querySelector("span").firstChild;
        const range = document.createRange();
        const at = text.data.indexOf("capsule-link");
        range.setStart(text, at);
        range.setEnd(text, at + 1);
        const rect = range.getBoundingClientRect();
        return { x: rect.left + rect.width / 2, y: rect.top + rect.height / 2 };
    }""")
    page.mouse.move(box["x"], box["y"])
    page.mouse.move(box["x"] + 2, box["y"])
    with page.context.expect_page() as opened:
        page.mouse.click(box["x"] + 2, box["y"])
    tab = opened.value
    tab.wait_for_load_state()
    assert tab.url == "http://capsule-link.test/path?q=1"
    assert tab.evaluate("window.opener") is None
    assert page.errors == []


# A dropped folder, as the browser's FileSystemEntry API gives it (here made up by the test:
# a synthetic drop has no folders): readEntries answers in batches of 100, then an empty one.
FOLDER_DROP = """([count, name]) => {
    const file = (path, text) => ({ isFile: true, isDirectory: false, name: path.split("/").pop(),
        file: (ok) => ok(new File([text], path.split("/").pop())) });
    const dir = (dirName, children) => ({ isFile: false, isDirectory: true, name: dirName,
        createReader() {
            let at = 0;
            return { readEntries(ok) {
                const batch = children.slice(at, at + 100);
                at += batch.length;
                setTimeout(() => ok(batch), 0);
            } };
        } });
    const many = Array.from({ length: count }, (_, i) => file("f" + i, "n" + i));
    const root = dir(name, [file("a.txt", "top"), dir("empty", []), dir("src", many)]);
    const transfer = new DataTransfer();
    transfer.items.add(new File(["x"], name));
    DataTransferItem.prototype.webkitGetAsEntry = function () { return root; };
    document.querySelector("#terminal .xterm-screen").dispatchEvent(new DragEvent("drop",
        { dataTransfer: transfer, bubbles: true, cancelable: true }));
}"""


def test_page_uploads_a_dropped_folder_with_its_empty_folders(page_url, new_page):
    page, catcher = upload_page(page_url, new_page)
    page.evaluate(FOLDER_DROP, [150, "proj"])
    wait_text(page, "#status-message", "^upload(ed| failed)")
    [request] = catcher.requests
    members = read_tar(request["body"])
    expected = {"proj": ("dir", 0o755, None), "proj/a.txt": ("file", 0o644, b"top"),
                "proj/empty": ("dir", 0o755, None), "proj/src": ("dir", 0o755, None)}
    expected.update({f"proj/src/f{i}": ("file", 0o644, f"n{i}".encode()) for i in range(150)})
    assert members == expected
    size = 3 + sum(len(f"n{i}") for i in range(150))
    assert page.inner_text("#status-message") == \
        f"uploaded 151 files and 3 folders ({size} B) to /workspace"
    assert page.errors == []


def test_page_refuses_a_folder_of_too_many_files(page_url, new_page):
    page, catcher = upload_page(page_url, new_page)
    page.evaluate(FOLDER_DROP, [10001, "huge"])
    wait_text(page, "#status-message", "^upload failed", timeout=30000)
    assert page.inner_text("#status-message") == \
        "upload failed: more than 10000 files and folders"
    assert catcher.requests == []
    assert page.errors == []
