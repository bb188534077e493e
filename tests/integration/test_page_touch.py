"""
The page's add-ons (js/extras.js) in a real headless Chromium against a
real capsule: the key bar on a phone (touch emulation, 390x844), the
clipboard (OSC 52 with the clipboard permissions granted, the shortcuts),
the search box over the scrollback, and the renderer with its fallback.
"""

import base64
import re

import pytest

from . import test_browser
from .test_browser import (CHROMIUM, open_session, read_file, screen, shot, type_line,
                           wait_file, wait_screen)

browser = test_browser.browser
server = test_browser.server

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine")

PHONE = dict(viewport={"width": 390, "height": 844}, device_scale_factor=3, has_touch=True,
             is_mobile=True)
DESKTOP = dict(viewport={"width": 1000, "height": 600})


@pytest.fixture
def new_context(browser):
    contexts = []

    def make(**options):
        context = browser.new_context(**options)
        contexts.append(context)
        return context
    yield make
    for context in contexts:
        context.close()


def open_page(context, url: str):
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors
    session_id = open_session(page, url)
    # The add-ons come once the page is idle after the first prompt.
    page.wait_for_selector("#options", state="attached", timeout=15000)
    page.wait_for_function("() => document.getElementById('terminal').dataset.renderer !== undefined")
    return page, session_id


def tap(page, key: str) -> None:
    page.locator(f'.keybar button[data-key="{key}"]').tap()


def focus_terminal(page) -> None:
    page.locator(".xterm-helper-textarea").focus()


def test_key_bar_sends_what_on_screen_keyboards_lack(server, new_context):
    """
    On a phone the key bar is under the terminal; Esc, Tab, Shift+Tab and the
    arrows send their bytes, the sticky Ctrl makes the next key typed a
    control character (Ctrl-C stops a program), and a tap keeps the focus in
    the terminal (the on-screen keyboard stays open).
    """
    page, session_id = open_page(new_context(**PHONE), server.url)
    bar = page.locator(".keybar")
    assert bar.is_visible()
    box = bar.bounding_box()
    assert box["y"] + box["height"] <= 844 and box["width"] == 390
    terminal = page.locator("#terminal").bounding_box()
    assert terminal["y"] + terminal["height"] <= box["y"] + 1
    shot(page, "touch-keybar")

    type_line(page, "cat -vT > /tmp/keys")
    focus_terminal(page)
    for key in ("esc", "tab", "backtab", "left", "up"):
        tap(page, key)
    page.keyboard.type("x")
    # Ctrl, then a key typed: Ctrl-A (sent as 0x01), and Ctrl is off again.
    tap(page, "ctrl")
    assert page.get_attribute('.keybar button[data-key="ctrl"]', "aria-pressed") == "true"
    page.keyboard.type("a")
    assert page.get_attribute('.keybar button[data-key="ctrl"]', "aria-pressed") == "false"
    page.keyboard.type("y")
    page.keyboard.press("Enter")
    wait_file(session_id, "/tmp/keys", rb"\n", page)
    assert read_file(session_id, "/tmp/keys") == b"^[^I^[[Z^[[D^[[Ax^Ay\n"
    # The focus stayed in the terminal through the taps.
    assert page.evaluate("document.activeElement.classList.contains('xterm-helper-textarea')")
    # Ctrl-C stops cat.
    tap(page, "ctrl")
    page.keyboard.type("c")
    type_line(page, "echo after-$((40+2))")
    wait_screen(page, r"after-42")
    assert page.errors == []


def test_key_bar_in_vim(server, new_context):
    """
    vim at 390x844: arrows in its application cursor mode, Esc to leave
    insert mode.
    """
    page, session_id = open_page(new_context(**PHONE), server.url)
    type_line(page, "vim /tmp/note")
    # vim's status line ('"/tmp/note" [New]', cut at its left on a narrow screen).
    wait_screen(page, r'note" \[New')
    focus_terminal(page)
    page.keyboard.type("iac")
    tap(page, "left")
    page.keyboard.type("b")
    tap(page, "esc")
    page.keyboard.type(":wq")
    page.keyboard.press("Enter")
    wait_file(session_id, "/tmp/note", rb"\n", page)
    assert read_file(session_id, "/tmp/note") == b"abc\n"


def test_key_bar_paste_and_a_tap_on_the_terminal(server, new_context):
    """
    A tap on the terminal gives it the keys (the on-screen keyboard opens);
    the key bar's Paste reads the clipboard into the terminal.
    """
    context = new_context(**PHONE)
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    page, _ = open_page(context, server.url)
    page.evaluate("() => document.activeElement.blur()")
    page.locator("#terminal").tap()
    assert page.evaluate("document.activeElement.classList.contains('xterm-helper-textarea')")
    page.evaluate("navigator.clipboard.writeText('echo c$((6+6))b')")
    tap(page, "paste")
    wait_screen(page, r"echo c\$\(\(6")
    page.keyboard.press("Enter")
    wait_screen(page, r"\nc12b")
    assert page.errors == []


def swipe(page, x: float, y0: float, y1: float, steps: int = 12) -> None:
    cdp = page.context.new_cdp_session(page)
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x, "y": y0}]})
    for i in range(1, steps + 1):
        y = y0 + (y1 - y0) * i / steps
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [{"x": x, "y": y}]})
        page.wait_for_timeout(16)
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})


def test_scrollback_scrolls_by_touch(server, new_context):
    """
    xterm.js 6 has no touch scrolling: the page's. A finger drawn down the
    terminal goes back through the scrollback; in the alternate screen it
    goes to the program (arrow keys, or mouse reports if it asked for them).
    """
    page, session_id = open_page(new_context(**PHONE), server.url)
    type_line(page, "seq -f 'n%g' 1 400")
    wait_screen(page, r"n400\s")
    assert "n250" not in screen(page)
    box = page.locator("#terminal").bounding_box()
    # A finger drawn down the terminal moves the view back through the scrollback.
    for _ in range(4):
        swipe(page, box["x"] + box["width"] / 2, box["y"] + 60, box["y"] + box["height"] - 60)
    page.wait_for_function("() => !/n400\\s/.test(document.querySelector('.xterm-rows').innerText)")
    lines = [int(n) for n in re.findall(r"n(\d+)", screen(page))]
    assert lines and max(lines) < 400
    # A finger drawn up comes back.
    for _ in range(8):
        swipe(page, box["x"] + box["width"] / 2, box["y"] + box["height"] - 60, box["y"] + 60)
    wait_screen(page, r"n400\s")

    # In the alternate screen (less), the swipe goes to the program.
    type_line(page, "seq -f 'm%g' 1 400 | less")
    wait_screen(page, r"m1\s")
    assert "m200" not in screen(page)
    for _ in range(3):
        swipe(page, box["x"] + box["width"] / 2, box["y"] + box["height"] - 60, box["y"] + 60)
    page.wait_for_function("() => !/m1\\s/.test(document.querySelector('.xterm-rows').innerText)")
    page.keyboard.type("q")

    # A program that asked for the mouse gets the wheel's reports (SGR: 65 is the wheel down).
    type_line(page, "printf '\\e[?1000h\\e[?1006h\\e[?1049h'; stty raw -echo;"
                    " head -c 20 > /tmp/wheel; stty sane; printf '\\e[?1000l\\e[?1049l'")
    page.wait_for_timeout(500)
    swipe(page, box["x"] + box["width"] / 2, box["y"] + box["height"] - 60, box["y"] + 60)
    wait_file(session_id, "/tmp/wheel", rb"^\x1b\[<65;\d+;\d+M", page)


def test_terminal_stays_above_the_on_screen_keyboard(server, new_context):
    """
    An on-screen keyboard shrinks the visual viewport: the page follows it,
    the key bar sits above the keyboard and the terminal has fewer rows.
    """
    page, _ = open_page(new_context(**PHONE), server.url)
    type_line(page, "clear; stty size")
    wait_screen(page, r"^\s*\d+ \d+")
    before = int(re.search(r"(\d+) \d+", screen(page)).group(1))
    page.evaluate("""() => {
        Object.defineProperty(visualViewport, "height", { get: () => 480, configurable: true });
        visualViewport.dispatchEvent(new Event("resize"));
    }""")
    page.wait_for_function("() => document.querySelector('.keybar').getBoundingClientRect().bottom <= 480")
    type_line(page, "clear; stty size")
    page.wait_for_function(
        "b => { const m = /(\\d+) \\d+/.exec(document.querySelector('.xterm-rows').innerText);"
        " return m && Number(m[1]) < b; }", arg=before)
    after = int(re.search(r"(\d+) \d+", screen(page)).group(1))
    assert 10 <= after < before
    terminal = page.locator("#terminal").bounding_box()
    assert terminal["y"] + terminal["height"] <= page.locator(".keybar").bounding_box()["y"] + 1


def test_key_bar_is_not_on_the_desktop_until_asked(server, new_context):
    page, _ = open_page(new_context(**DESKTOP), server.url)
    assert page.locator(".keybar").is_hidden()
    page.click("#options")
    page.check('[data-option="keybar"]')
    assert page.locator(".keybar").is_visible()
    page.reload()
    page.wait_for_selector(".keybar", state="visible", timeout=15000)
    page.click("#options")
    page.uncheck('[data-option="keybar"]')
    assert page.locator(".keybar").is_hidden()


def clipboard(page) -> str:
    return page.evaluate("navigator.clipboard.readText()")


def wait_clipboard(page, text: str, timeout_ms: float = 10000) -> None:
    """Wait until the system clipboard holds C{text} (polled: reading it is a promise)."""
    while clipboard(page) != text:
        if timeout_ms <= 0:
            raise AssertionError(f"the clipboard holds {clipboard(page)!r}, not {text!r}")
        page.wait_for_timeout(100)
        timeout_ms -= 100


def granted(new_context, **options):
    context = new_context(**options)
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    return context


def osc52(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_osc52_copies_to_the_clipboard_and_never_reads_it(server, new_context):
    page, session_id = open_page(granted(new_context, **DESKTOP), server.url)
    type_line(page, "printf '\\e]52;c;%s\\a' \"$(printf 'hello from tmux' | base64)\"")
    wait_clipboard(page, "hello from tmux")
    page.wait_for_selector(".notice:not([hidden])")
    assert "copied 15 characters" in page.inner_text(".notice")

    # A program asking to read the clipboard gets no answer.
    page.evaluate("navigator.clipboard.writeText('secret')")
    type_line(page, "printf '\\e]52;c;?\\a'; read -t 3 -n 200 -r got; echo \"got[${#got}]\"")
    wait_screen(page, r"got\[\d+\]")
    assert "got[0]" in screen(page)
    assert clipboard(page) == "secret"

    # Past 1 MiB: not copied, and said so.
    type_line(page, "printf '\\e]52;c;%s\\a' \"$(head -c 1100000 /dev/zero | tr '\\0' a | base64 -w0)\"; echo big-done")
    wait_screen(page, r"big-done")
    page.wait_for_function("() => /too large/.test(document.querySelector('.notice').textContent)")
    assert clipboard(page) == "secret"

    # Replayed output's copies were made before this page: a reload does not make them again.
    page.reload()
    page.wait_for_selector("#options", state="attached", timeout=15000)
    wait_screen(page, r"big-done")
    type_line(page, "echo reloaded")
    wait_screen(page, r"reloaded")
    assert clipboard(page) == "secret"
    assert page.errors == []


def test_osc52_refused_offers_a_copy_button(server, new_context):
    """
    Without the browser's permission (no user gesture), the text waits in a
    notice whose Copy button (a click) puts it on the clipboard.
    """
    context = new_context(**DESKTOP)
    page, _ = open_page(context, server.url)
    # The browser refuses the write made without a gesture, as Firefox and Safari do.
    page.evaluate("""() => {
        const real = navigator.clipboard.writeText.bind(navigator.clipboard);
        let refuse = true;
        navigator.clipboard.writeText = (text) => {
            if (refuse) { refuse = false; return Promise.reject(new DOMException("no", "NotAllowedError")); }
            return real(text);
        };
        document.execCommand = () => false;
    }""")
    type_line(page, "printf '\\e]52;c;%s\\a' \"$(printf offered | base64)\"")
    page.wait_for_selector('.notice[data-kind="offer"]:not([hidden])')
    shot(page, "clipboard-offer")
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.click(".notice button:has-text('Copy')")
    wait_clipboard(page, "offered")


def select_word(page, word: str) -> None:
    """Double-click `word` on the terminal's screen (xterm selects it)."""
    box = page.evaluate("""(word) => {
        const walker = document.createTreeWalker(document.querySelector('.xterm-rows'), NodeFilter.SHOW_TEXT);
        for (let node = walker.nextNode(); node; node = walker.nextNode()) {
            const at = node.data.indexOf(word);
            if (at < 0) continue;
            const range = document.createRange();
            range.setStart(node, at);
            range.setEnd(node, at + word.length);
            const rect = range.getBoundingClientRect();
            return { x: rect.left + rect.width / 2, y: rect.top + rect.height / 2 };
        }
        return null;
    }""", word)
    assert box, word
    page.mouse.dblclick(box["x"], box["y"])


def test_copy_and_paste_shortcuts(server, new_context):
    page, session_id = open_page(granted(new_context, **DESKTOP), server.url)
    type_line(page, "clear; echo WORD$((1+1))XYZ")
    wait_screen(page, r"WORD2XYZ")
    select_word(page, "WORD2XYZ")
    page.keyboard.press("Control+Shift+C")
    wait_clipboard(page, "WORD2XYZ")

    # Ctrl+C with a selection copies (and sends nothing); without one it is ^C.
    page.evaluate("navigator.clipboard.writeText('')")
    type_line(page, "sleep 300")
    select_word(page, "WORD2XYZ")
    page.keyboard.press("Control+c")
    wait_clipboard(page, "WORD2XYZ")
    page.wait_for_timeout(500)
    assert not re.search(r"sleep 300\s*\n.*\$ ", screen(page))
    focus_terminal(page)
    page.keyboard.press("Control+c")
    type_line(page, "echo stopped-$((2+3))")
    wait_screen(page, r"stopped-5")

    # Ctrl+Shift+V and Shift+Insert paste (xterm brackets a paste for bash).
    page.evaluate("navigator.clipboard.writeText('echo pasted-$((3+4))')")
    focus_terminal(page)
    page.keyboard.press("Control+Shift+V")
    page.keyboard.press("Enter")
    wait_screen(page, r"pasted-7")
    page.evaluate("navigator.clipboard.writeText('echo inserted-$((4+4))')")
    page.keyboard.press("Shift+Insert")
    page.keyboard.press("Enter")
    wait_screen(page, r"inserted-8")

    # Ctrl+Insert copies too.
    select_word(page, "WORD2XYZ")
    page.evaluate("navigator.clipboard.writeText('')")
    page.keyboard.press("Control+Insert")
    wait_clipboard(page, "WORD2XYZ")
    assert page.errors == []


def test_copy_on_selection_is_an_option(server, new_context):
    page, _ = open_page(granted(new_context, **DESKTOP), server.url)
    type_line(page, "clear; echo SELECTME")
    wait_screen(page, r"SELECTME\s")
    page.evaluate("navigator.clipboard.writeText('before')")
    select_word(page, "SELECTME")
    page.wait_for_timeout(500)
    assert clipboard(page) == "before"
    page.click("#options")
    page.check('[data-option="copyOnSelect"]')
    page.click("#options")
    select_word(page, "SELECTME")
    wait_clipboard(page, "SELECTME")
    assert page.evaluate("localStorage.getItem('capsule.copyOnSelect')") == "on"


def test_search_finds_a_word_in_the_scrollback(server, new_context):
    page, _ = open_page(new_context(**DESKTOP), server.url)
    type_line(page, "seq -f 'row%g' 1 300; echo NEEDLE$((6*7)); seq -f 'tail%g' 1 200")
    wait_screen(page, r"tail200")
    assert "NEEDLE42" not in screen(page)
    focus_terminal(page)
    page.keyboard.press("Control+Shift+F")
    page.wait_for_selector(".search-box:not([hidden]) input:focus")
    page.keyboard.type("NEEDLE42")
    page.keyboard.press("Enter")
    page.wait_for_function("() => /NEEDLE42/.test(document.querySelector('.xterm-rows').innerText)")
    page.wait_for_function("() => document.querySelector('.search-count').textContent === '1 of 1'")
    shot(page, "search")
    page.keyboard.type("X")
    page.wait_for_function("() => document.querySelector('.search-count').textContent === 'no match'")
    page.keyboard.press("Escape")
    assert page.locator(".search-box").is_hidden()
    assert page.evaluate("document.activeElement.classList.contains('xterm-helper-textarea')")
    # The keys are the terminal's again.
    type_line(page, "echo back-$((5+5))")
    wait_screen(page, r"back-10")


def text_pixels(page) -> int:
    """
    How many pixels of the terminal's top rows are lit (text on its dark
    background), read from a screenshot decoded in the page itself.
    """
    box = page.locator("#terminal").bounding_box()
    png = page.screenshot(clip={"x": box["x"], "y": box["y"], "width": box["width"], "height": 60})
    return page.evaluate("""async (data) => {
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const image = await createImageBitmap(new Blob([bytes], { type: "image/png" }));
        const canvas = new OffscreenCanvas(image.width, image.height);
        const context = canvas.getContext("2d");
        context.drawImage(image, 0, 0);
        const pixels = context.getImageData(0, 0, image.width, image.height).data;
        let lit = 0;
        for (let i = 0; i < pixels.length; i += 4) if (pixels[i] + pixels[i + 1] + pixels[i + 2] > 300) lit++;
        return lit;
    }""", base64.b64encode(png).decode())


def test_renderer_falls_back_to_the_dom(server, new_context):
    """
    The headless browser's WebGL is SwiftShader, a software one: "auto"
    keeps xterm's DOM renderer. Asked for WebGL, the terminal draws with it;
    when its context is lost, the DOM renderer draws again by itself.
    """
    page, _ = open_page(new_context(**DESKTOP), server.url)
    assert page.get_attribute("#terminal", "data-renderer") == "dom"
    # The fonts for CJK and emoji are in the terminal's font stack.
    family = page.evaluate("() => getComputedStyle(document.querySelector('.xterm-rows')).fontFamily")
    assert "DejaVu Sans Mono" in family and "Noto Sans Mono CJK SC" in family
    assert "Noto Color Emoji" in family
    page.evaluate("localStorage.setItem('capsule.renderer', 'webgl')")
    page.reload()
    page.wait_for_function("() => document.getElementById('terminal').dataset.renderer === 'webgl'",
                           timeout=15000)
    assert page.locator("#terminal canvas").count() >= 1
    type_line(page, "clear; echo drawn-$((8*8))")
    page.wait_for_timeout(500)
    shot(page, "webgl")
    # WebGL drew the text: the terminal's pixels (not its DOM, which WebGL leaves empty).
    assert text_pixels(page) > 200
    # The context goes away (as on a GPU reset): the DOM renderer takes over.
    page.evaluate("""() => {
        for (const canvas of document.querySelectorAll('#terminal canvas')) {
            const gl = canvas.getContext('webgl2');
            if (gl) gl.getExtension('WEBGL_lose_context').loseContext();
        }
    }""")
    page.wait_for_function("() => document.getElementById('terminal').dataset.renderer === 'dom'")
    assert page.get_attribute("#terminal", "data-renderer-lost") == "true"
    type_line(page, "clear; echo after-loss-$((9*9))")
    wait_screen(page, r"after-loss-81")
    assert text_pixels(page) > 200
    assert page.errors == []


def test_a_spectator_has_no_key_bar_and_programs_do_not_write_its_clipboard(server, new_context):
    """
    A read-only link's spectator, on a phone: no key bar (it types nothing),
    and an OSC 52 copy in the session reaches the owner's clipboard only.
    """
    from .test_page_share import make_link
    owner, _ = open_page(granted(new_context, **DESKTOP), server.url)
    url = make_link(owner)
    watcher = granted(new_context, **PHONE).new_page()
    # One browser has one clipboard for all its contexts: what the spectator's
    # page writes to it is recorded instead.
    watcher.add_init_script("""
        window.__writes = [];
        if (navigator.clipboard) {
            const write = navigator.clipboard.writeText.bind(navigator.clipboard);
            navigator.clipboard.writeText = (text) => { window.__writes.push(text); return write(text); };
        }""")
    watcher.goto(url)
    watcher.wait_for_selector('#status[data-state="connected"]', timeout=20000)
    watcher.wait_for_selector("#options", state="attached", timeout=15000)
    assert watcher.locator(".keybar").count() == 0
    owner.keyboard.press("Escape")
    type_line(owner, "printf '\\e]52;c;%s\\a' \"$(printf for-the-owner | base64)\"; echo sent-$((2*3))")
    wait_clipboard(owner, "for-the-owner")
    wait_screen(watcher, r"sent-6")
    watcher.wait_for_timeout(500)
    assert watcher.evaluate("window.__writes") == []
