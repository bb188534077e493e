"""
Where a page visit's time goes, read from a Chromium performance trace
(the DevTools protocol's C{Tracing}, through Playwright's
C{browser.start_tracing}), in milliseconds from the navigation's start.

Pure: L{breakdown} takes the trace's events (the JSON's C{traceEvents}) and
the page's URL and returns a flat dict; L{describe} makes one line of it.
The renderer's main thread is the one whose C{navigationStart} names the
page's URL.  What is read:

 - C{html}: the page's first C{ParseHTML} (its first bytes are parsed);
 - C{ws_created}, C{ws_handshake}, C{ws_open}: C{WebSocketCreate},
   C{WebSocketSendHandshakeRequest}, C{WebSocketReceiveHandshakeResponse}
   (Blink's WebSocket lives on the main thread: a busy thread sees the
   answer late);
 - C{first_paint}, C{first_contentful_paint};
 - C{scripts_ms}: time in C{EvaluateScript} and C{v8.evaluateModule} of the
   page's scripts (the inline ones included), C{compile_ms}: in
   C{v8.compile}/C{v8.compileModule} on the main thread (what a code cache
   would spare), C{xterm_ms}: evaluating C{xterm.js} and its addons;
 - C{busy_ms}: main-thread tasks (C{RunTask}) until C{until} (the prompt
   drawn), C{longest_task_ms}: the longest of them, C{tasks_before_ms}: the
   task the prompt waited behind, if any;
 - C{layout_ms}, C{paint_ms}: C{Layout}, C{Paint} and C{UpdateLayoutTree}
   until C{until}.
"""

from __future__ import annotations

_SCRIPT_EVENTS = ("EvaluateScript", "v8.evaluateModule")
_COMPILE_EVENTS = ("v8.compile", "v8.compileModule")
_ADDONS = ("xterm.js", "addon-fit", "addon-unicode11", "addon-web-links")


def _url(event: dict) -> str:
    data = event.get("args", {}).get("data") or {}
    return data.get("url") or data.get("fileName") or event.get("args", {}).get("fileName") or ""


def navigation(events: list[dict], page_url: str) -> tuple | None:
    """
    The (pid, tid, ts) of the last C{navigationStart} of C{page_url} (its
    query aside) on a renderer's main thread.
    """
    wanted = page_url.split("?")[0].split("#")[0]
    found = None
    for event in events:
        if event.get("name") != "navigationStart":
            continue
        url = ((event.get("args") or {}).get("data") or {}).get("documentLoaderURL") or ""
        if url.split("?")[0].split("#")[0] == wanted and (found is None or event["ts"] > found[2]):
            found = (event["pid"], event["tid"], event["ts"])
    return found


def breakdown(events: list[dict], page_url: str, until_ms: float | None = None) -> dict:
    """
    The visit's phases (see the module), in ms from C{navigationStart};
    C{until_ms}: the prompt drawn, in the same clock (the page's
    C{performance.now()}), bounding the busy, layout and paint sums.
    """
    found = navigation(events, page_url)
    if found is None:
        return {}
    pid, tid, start = found

    def at(ts: float) -> float:
        return (ts - start) / 1000

    until = until_ms if until_ms is not None else float("inf")
    own = [e for e in events if e.get("pid") == pid and e.get("tid") == tid
           and e.get("ts", 0) >= start]
    result: dict = {}

    def first(name: str, key: str, condition=lambda e: True) -> None:
        times = [at(e["ts"]) for e in events
                 if e.get("name") == name and e.get("pid") == pid and e.get("ts", 0) >= start
                 and condition(e)]
        result[key] = min(times) if times else None

    first("ParseHTML", "html")
    first("WebSocketCreate", "ws_created")
    first("WebSocketSendHandshakeRequest", "ws_handshake")
    first("WebSocketReceiveHandshakeResponse", "ws_open")
    first("firstPaint", "first_paint")
    first("firstContentfulPaint", "first_contentful_paint")

    def complete(e: dict) -> bool:
        return e.get("ph") == "X" and "dur" in e

    scripts = compile_ms = xterm = 0.0
    for e in own:
        if not complete(e):
            continue
        name = e.get("name")
        if name in _SCRIPT_EVENTS and "devtools.timeline" in e.get("cat", "").split(","):
            scripts += e["dur"] / 1000
            if any(part in _url(e) for part in _ADDONS):
                xterm += e["dur"] / 1000
        elif name in _COMPILE_EVENTS:
            compile_ms += e["dur"] / 1000
    result["scripts_ms"] = scripts
    result["compile_ms"] = compile_ms
    result["xterm_ms"] = xterm

    busy = longest = layout = paint = 0.0
    waited = None
    for e in own:
        if not complete(e):
            continue
        begin, length = at(e["ts"]), e["dur"] / 1000
        if begin >= until:
            continue
        name = e.get("name")
        if name == "RunTask":
            busy += min(length, until - begin)
            longest = max(longest, length)
            if begin + length > until and begin < until:
                waited = length
        elif name in ("Layout", "UpdateLayoutTree"):
            layout += length
        elif name in ("Paint", "PaintImage"):
            paint += length
    result["busy_ms"] = busy
    result["longest_task_ms"] = longest
    result["task_at_prompt_ms"] = waited
    result["layout_ms"] = layout
    result["paint_ms"] = paint
    return result


def describe(phases: dict) -> str:
    """
    One line: the moments, then where the main thread's time went.
    """
    if not phases:
        return "no trace of the page's main thread"

    def ms(key: str) -> str:
        value = phases.get(key)
        return "—" if value is None else f"{value:.0f}"

    return (f"HTML parsed from {ms('html')}, WebSocket created {ms('ws_created')},"
            f" handshake sent {ms('ws_handshake')}, answered {ms('ws_open')}, first paint"
            f" {ms('first_paint')} (contentful {ms('first_contentful_paint')});"
            f" main thread until the prompt: {ms('busy_ms')} ms busy (longest task"
            f" {ms('longest_task_ms')}), scripts {ms('scripts_ms')} ms in all (xterm.js and"
            f" addons {ms('xterm_ms')}, compiling {ms('compile_ms')}), style and layout"
            f" {ms('layout_ms')}, paint {ms('paint_ms')}")
