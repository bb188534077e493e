"""
The page in headless Chromium (Playwright): time from navigation to the
first prompt drawn, for a first visit (a fresh browser context: empty HTTP
cache) and a returning one (a new tab in the same context: the cache warm,
a new session, since a tab's session id lives in its sessionStorage).

Timed inside the page, from its navigation start (C{performance.now()}),
by a script Playwright adds before any of the page's own: the moment the
prompt is first shown, by the page's first screen (index.html's C{<pre>},
drawn before xterm.js runs) or by the terminal's rows (a
C{MutationObserver}, then the next animation frame: the frame that draws
it), and when xterm.js's own rows show it; a terminal without DOM rows,
drawn on a canvas, is timed by the page's C{performance.mark("capsule:prompt")}
instead), and, for the notes, when
the page's first WebSocket was created, when the prompt first arrived on
it, and C{DOMContentLoaded}; and, from Chromium's network layer (the
DevTools protocol), counted from the page's request, when the WebSocket's
handshake went out and was answered, when the page sent its first frame,
and when the prompt's frame came in.  Nothing in the page has to cooperate.

Playwright's sync API is used from one thread of its own
(L{run_visits}); the reactor goes on meanwhile.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import time

from measures import BenchError, say, summary

CHROMIUM = os.environ.get("CAPSULE_CHROMIUM") or shutil.which("chromium") or shutil.which(
    "chromium-browser")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1000, "height": 600}
# What the session image's prompt looks like in the terminal's text (the
# colours stripped): user@capsule:/workspace$
PROMPT = r"@capsule:\S*[$#]"
TIMEOUT_MS = 30_000

# Added to every page before its own scripts.
_PROBE = r"""
(() => {
  const prompt = new RegExp(%(prompt)s);
  const marks = window.__capsuleBench = {};
  const now = () => performance.now();
  const seen = text => prompt.test(text.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, ""));
  const Native = window.WebSocket;
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      if (marks.ws === undefined) marks.ws = now();
      this.addEventListener("message", event => {
        const at = now();
        if (marks.message === undefined) marks.message = at;
        if (marks.arrived !== undefined) return;
        const data = event.data;
        const check = text => { if (marks.arrived === undefined && seen(text)) marks.arrived = at; };
        if (typeof data === "string") check(data);
        else if (data instanceof ArrayBuffer) check(new TextDecoder().decode(data));
        else if (data && data.text) data.text().then(check);
      });
    }
  };
  // The prompt drawn: in the page's first screen (index.html's <pre>, before xterm.js ran) or
  // in xterm.js's rows, whichever shows it first; and when xterm.js's rows show it.
  const shows = el => prompt.test(el.textContent)
    && (!el.checkVisibility || el.checkVisibility());
  const observer = new MutationObserver(() => {
    if (marks.dom === undefined) {
      for (const el of document.querySelectorAll(".first-screen, .xterm-rows")) {
        if (shows(el)) {
          marks.dom = now();
          marks.by = el.classList.contains("first-screen") ? "first-screen" : "xterm";
          requestAnimationFrame(() => { marks.drawn = now(); });
          break;
        }
      }
    }
    if (marks.xterm === undefined) {
      const rows = document.querySelector(".xterm-rows");
      if (rows && shows(rows)) {
        marks.xterm = now();
        requestAnimationFrame(() => { marks.xterm_drawn = now(); });
      }
    }
    if (marks.dom !== undefined && marks.xterm !== undefined) observer.disconnect();
    done();
  });
  // The bench waits for this console message: polling the page from Playwright would inject
  // its own scripts into the page and take the page's main thread while it loads.
  let said = false;
  const done = () => {
    if (said || marks.drawn === undefined) return;
    if (marks.xterm_drawn === undefined && marks.by !== "mark"
        && !performance.getEntriesByName("capsule:terminal").length) return;
    said = true;
    console.debug("capsule-bench: drawn");
  };
  setInterval(done, 20);
  observer.observe(document, {subtree: true, childList: true, characterData: true,
                             attributes: true, attributeFilter: ["hidden"]});
  // A terminal drawn on a canvas has no rows to read: the page may then
  // say when it drew the prompt with performance.mark("capsule:prompt").
  try {
    new PerformanceObserver(list => {
      for (const entry of list.getEntries()) {
        if (entry.name === "capsule:prompt" && marks.drawn === undefined
            && !document.querySelector(".xterm-rows")) {
          marks.drawn = entry.startTime;
          marks.by = "mark";
        }
      }
    }).observe({type: "mark", buffered: true});
  } catch (e) {}
  addEventListener("DOMContentLoaded", () => { marks.dcl = now(); });
})();
"""

_TRANSFERS = """() => {
  const all = [...performance.getEntriesByType("navigation"),
               ...performance.getEntriesByType("resource")]
    .filter(e => !e.name.startsWith("ws"));
  const fetched = all.filter(e => e.transferSize > 0);
  return {requests: fetched.length,
          kb: fetched.reduce((n, e) => n + e.transferSize, 0) / 1024,
          files: all.length};
}"""


class _Wire:
    """
    What Chromium's network layer saw (the DevTools protocol, in its own
    clock): when the page was asked for, when the WebSocket's handshake
    went out, and when the first frame holding the prompt came in, before
    the page's busy main thread could hand it to any script.
    """

    def __init__(self, page, prompt: str) -> None:
        self.prompt = re.compile(prompt.encode())
        self.times: dict[str, float] = {}
        self.cdp = page.context.new_cdp_session(page)
        self.cdp.on("Network.requestWillBeSent", self._request)
        self.cdp.on("Network.webSocketWillSendHandshakeRequest", self._handshake)
        self.cdp.on("Network.webSocketFrameReceived", self._frame)
        self.cdp.on("Network.webSocketHandshakeResponseReceived", self._opened)
        self.cdp.on("Network.webSocketFrameSent", self._sent)
        self.cdp.send("Network.enable")

    def _request(self, event) -> None:
        if event.get("type") == "Document":
            self.times.setdefault("document", event["timestamp"])

    def _handshake(self, event) -> None:
        self.times.setdefault("handshake", event["timestamp"])

    def _opened(self, event) -> None:
        self.times.setdefault("opened", event["timestamp"])

    def _sent(self, event) -> None:
        self.times.setdefault("sent", event["timestamp"])

    def _frame(self, event) -> None:
        if "frame" in self.times:
            return
        response = event.get("response", {})
        data = response.get("payloadData", "")
        raw = (base64.b64decode(data) if response.get("opcode") == 2
               else data.encode("utf-8", "replace"))
        if self.prompt.search(_ESCAPES.sub(b"", raw)):
            self.times["frame"] = event["timestamp"]

    def marks(self) -> dict:
        """
        Milliseconds from the page's request to the handshake, its answer,
        the page's first frame sent, and the prompt's frame (C{None} when
        not seen).
        """
        start = self.times.get("document")
        return {f"wire_{key}": (None if start is None or key not in self.times
                                else (self.times[key] - start) * 1000)
                for key in ("handshake", "opened", "sent", "frame")}


_ESCAPES = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def _visit(context, url: str, prompt: str = PROMPT) -> dict:
    page = context.new_page()
    try:
        wire = _Wire(page, prompt)
        try:
            with page.expect_console_message(lambda m: m.text == "capsule-bench: drawn",
                                             timeout=TIMEOUT_MS):
                page.goto(url, wait_until="commit", timeout=TIMEOUT_MS)
        except Exception as e:
            marks = page.evaluate("() => window.__capsuleBench || {}")
            raise BenchError(f"no prompt drawn within {TIMEOUT_MS / 1000:g} s"
                             f" (marks {marks}): {str(e).splitlines()[0]}") from None
        marks = page.evaluate("() => window.__capsuleBench")
        # What went over the network: the page and each file not taken
        # from the cache unasked (a 304 counts, with its headers' bytes).
        marks.update(page.evaluate(_TRANSFERS))
        marks.update(wire.marks())
        # The page's own performance.mark()s (capsule:...), by name.
        marks["page_marks"] = page.evaluate(
            "() => Object.fromEntries(performance.getEntriesByType('mark')"
            ".filter(m => m.name.startsWith('capsule:')).map(m => [m.name, m.startTime]))")
        return marks
    finally:
        page.close()


# What a traced visit records (see pagetrace.py).
TRACE_CATEGORIES = ["devtools.timeline", "disabled-by-default-devtools.timeline", "v8",
                    "blink", "blink.user_timing", "loading", "toplevel"]


def _traced_visit(browser, context, url: str, prompt: str, kind: str, trace_dir) -> dict:
    """
    One visit under Chromium's tracing; its marks with the trace's
    breakdown (C{"trace"}), the raw trace written to C{trace_dir} if given.
    """
    import json

    from pagetrace import breakdown
    browser.start_tracing(categories=TRACE_CATEGORIES)
    try:
        marks = _visit(context, url, prompt)
    finally:
        raw = browser.stop_tracing()
    if trace_dir is not None:
        path = os.path.join(trace_dir, f"trace-{kind}-{int(time.time())}.json")
        with open(path, "wb") as f:
            f.write(raw)
        marks["trace_file"] = path
    events = json.loads(raw)
    events = events.get("traceEvents", []) if isinstance(events, dict) else events
    marks["trace"] = breakdown(events, url, marks.get("drawn"))
    return marks


def run_visits(url: str, rounds: int, settle, prompt: str = PROMPT, trace: bool = True,
               trace_dir=None) -> dict:
    """
    In a thread: C{rounds} first visits and returning visits in turn, each
    after C{settle()} (which blocks until the capsule is idle and its pool
    full).  Returns C{{"first": [marks...], "returning": [marks...]}}, and,
    with C{trace}, C{"traced"}: one more first and returning visit, not
    counted in the others, each recorded in a Chromium trace
    (C{{"first": marks, "returning": marks}}, each with its C{"trace"}
    breakdown).
    """
    if CHROMIUM is None:
        raise BenchError("no chromium on this machine (CAPSULE_CHROMIUM names one)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise BenchError("playwright is not installed in this Python") from None
    import json
    probe = _PROBE % {"prompt": json.dumps(prompt)}
    visits: dict[str, list] = {"first": [], "returning": []}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            # One visit unmeasured: Chromium's own first-use costs.
            context = browser.new_context(viewport=VIEWPORT)
            context.add_init_script(probe)
            settle()
            _visit(context, url, prompt)
            context.close()
            for i in range(rounds):
                context = browser.new_context(viewport=VIEWPORT)
                context.add_init_script(probe)
                try:
                    for kind in ("first", "returning"):
                        settle()
                        visits[kind].append(_visit(context, url, prompt))
                finally:
                    context.close()
                first, back = visits["first"][-1], visits["returning"][-1]
                say(f"browser #{i + 1}: first visit {first['drawn']:.0f} ms"
                    f" ({first['requests']} of {first['files']} files fetched,"
                    f" {first['kb']:.0f} KiB), returning {back['drawn']:.0f} ms"
                    f" ({back['requests']} of {back['files']} fetched, {back['kb']:.0f} KiB)")
            if trace:
                from pagetrace import describe
                context = browser.new_context(viewport=VIEWPORT)
                context.add_init_script(probe)
                traced = {}
                try:
                    for kind in ("first", "returning"):
                        settle()
                        traced[kind] = _traced_visit(browser, context, url, prompt, kind,
                                                     trace_dir)
                        say(f"browser, traced {kind} visit: prompt drawn at"
                            f" {traced[kind]['drawn']:.0f} ms; {describe(traced[kind]['trace'])}")
                finally:
                    context.close()
                visits["traced"] = traced
        finally:
            browser.close()
    return visits


def digest(marks: list[dict]) -> dict:
    """
    The drawn times' summary, with the medians of the other marks.
    """
    result = summary([m["drawn"] for m in marks])
    for key in ("dcl", "ws", "message", "arrived", "wire_handshake", "wire_opened",
                "wire_sent", "wire_frame", "xterm_drawn"):
        values = [m[key] for m in marks if m.get(key) is not None]
        result[f"{key}_median"] = summary(values)["median"] if values else None
    result["by_mark"] = sum(1 for m in marks if m.get("by") == "mark")
    result["by_first_screen"] = sum(1 for m in marks if m.get("by") == "first-screen")
    for key in ("requests", "files", "kb"):
        result[key] = summary([m[key] for m in marks])["median"]
    return result


def wait_settled(server, timeout: float = 90) -> None:
    """
    Blocking: until the capsule has no session and a full pool.
    """
    deadline = time.monotonic() + timeout
    while not server.settled():
        if time.monotonic() > deadline:
            raise BenchError(f"capsule ({server.label}) did not settle in {timeout:g} s")
        time.sleep(0.05)
    time.sleep(0.2)
