"""
bench/pagetrace.py: a visit's breakdown read from a (synthetic) Chromium
trace.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from pagetrace import breakdown, describe  # noqa: E402

URL = "http://127.0.0.1:3001/"
PID, TID, OTHER = 10, 11, 20
T0 = 1_000_000  # µs


def event(name, at_ms, dur_ms=None, pid=PID, tid=TID, cat="devtools.timeline", **data):
    e = {"name": name, "ts": T0 + at_ms * 1000, "pid": pid, "tid": tid, "cat": cat,
         "ph": "X" if dur_ms is not None else "I", "args": {"data": data}}
    if dur_ms is not None:
        e["dur"] = dur_ms * 1000
    return e


def trace():
    return [
        # Another page's navigation, in another renderer: not this one.
        {"name": "navigationStart", "ts": T0 - 5000, "pid": OTHER, "tid": OTHER, "ph": "R",
         "cat": "blink.user_timing", "args": {"data": {"documentLoaderURL": "about:blank"}}},
        {"name": "navigationStart", "ts": T0, "pid": PID, "tid": TID, "ph": "R",
         "cat": "blink.user_timing", "args": {"data": {"documentLoaderURL": URL + "?x=1"}}},
        event("ParseHTML", 40, 5),
        event("RunTask", 40, 10, cat="disabled-by-default-devtools.timeline"),
        event("EvaluateScript", 41, 3, url=URL),
        event("WebSocketCreate", 44),
        event("WebSocketSendHandshakeRequest", 46),
        event("WebSocketReceiveHandshakeResponse", 60),
        event("firstPaint", 70, cat="loading"),
        event("RunTask", 100, 60, cat="disabled-by-default-devtools.timeline"),
        event("EvaluateScript", 100, 30, url=URL + "node_modules/@xterm/xterm/lib/xterm.js?v=1"),
        event("v8.compile", 100, 4),
        event("EvaluateScript", 100, 30, cat="disabled-by-default-devtools.timeline"),
        event("v8.evaluateModule", 130, 25, cat="v8,devtools.timeline"),
        event("Layout", 150, 2),
        event("Paint", 158, 1),
        # After the prompt: not counted as busy before it.
        event("RunTask", 300, 50, cat="disabled-by-default-devtools.timeline"),
        # Another thread's task.
        event("RunTask", 50, 500, pid=PID, tid=99, cat="disabled-by-default-devtools.timeline"),
    ]


def test_breakdown_reads_the_pages_main_thread():
    phases = breakdown(trace(), URL, until_ms=120)
    assert phases["html"] == 40
    assert (phases["ws_created"], phases["ws_handshake"], phases["ws_open"]) == (44, 46, 60)
    assert phases["first_paint"] == 70
    assert phases["scripts_ms"] == 3 + 30 + 25  # the duplicate EvaluateScript left out
    assert phases["xterm_ms"] == 30
    assert phases["compile_ms"] == 4
    # Tasks until the prompt (120 ms): 10 ms, and 20 of the task that held it.
    assert phases["busy_ms"] == 30
    assert phases["longest_task_ms"] == 60
    assert phases["task_at_prompt_ms"] == 60
    assert "HTML parsed from 40" in describe(phases)


def test_breakdown_of_another_page_is_empty():
    assert breakdown(trace(), "http://elsewhere/") == {}
    assert describe({}) == "no trace of the page's main thread"
