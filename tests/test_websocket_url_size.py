"""
The terminal's size in the WebSocket's URL (C{/ws?cols=C&rows=R}): the
session starts at the upgrade, at that size, and its first output goes out
without waiting for a C{resize} message; a size that is not one is refused
like a bad C{session_id}, with nothing made.  In memory, as in
test_websocket.
"""

from __future__ import annotations

import pytest

from capsule.web.wire import url_size
from capsule.core.protocol import ProtocolError

from .test_websocket import (  # noqa: F401 (fixtures)
    WINDOW, clock, connect, docker, factory, manager, outputs, start)


def test_a_new_session_starts_at_the_urls_size_without_a_resize(connect, manager, docker):
    link = connect("cols=100&rows=30", binary=True)
    [session] = manager.sessions.values()
    assert link.new() == [{"type": "connected", "grace": 60, "kept": False, "profile": "shell", "profile": "shell",
                           "session_id": session.id, "resumed": False,
                           "offset": 0, "window": WINDOW, "replay": 0}]
    [process] = docker.processes
    assert process.resizes == [(100, 30)]
    process.emit(b"user@capsule:/workspace$ ")
    link.flush()
    assert link.new() == [b"user@capsule:/workspace$ "]
    # Input needs no resize first; the page's resize (the same size) and a later one go on.
    link.send({"type": "input", "data": "ls\r"})
    assert process.written == [b"ls\r"]
    link.send({"type": "resize", "cols": 100, "rows": 30})
    link.send({"type": "resize", "cols": 120, "rows": 40})
    assert process.resizes[-1] == (120, 40)
    assert len(manager.sessions) == 1 and link.new() == []


def test_a_json_client_gets_it_too(connect, manager, docker):
    link = connect("cols=2&rows=1")
    [session] = manager.sessions.values()
    assert link.new() == [{"type": "connected", "grace": 60, "kept": False, "profile": "shell", "profile": "shell",
                           "session_id": session.id, "resumed": False,
                           "replay": 0}]
    assert docker.processes[0].resizes == [(2, 1)]


def test_a_resumed_session_is_resized_to_the_urls_size(connect, manager, docker):
    first = connect()
    session_id = start(first, 80, 24)
    process = docker.processes[0]
    first.close()
    second = connect(f"session_id={session_id}&cols=132&rows=43")
    assert second.new()[0]["resumed"] is True
    assert process.resizes[-1] == (132, 43)
    assert manager.sessions[session_id].client is second.server


@pytest.mark.parametrize("query, said", [
    ("cols=0&rows=24", "cols must be an integer from 1 to 1000"),
    ("cols=80&rows=1001", "rows must be an integer from 1 to 1000"),
    ("cols=80", "rows must be an integer from 1 to 1000 (with cols), got nothing"),
    ("rows=24", "cols must be an integer from 1 to 1000 (with rows), got nothing"),
    ("cols=-1&rows=24", "got '-1'"),
    ("cols=8x&rows=24", "got '8x'"),
    ("cols=%D9%A3&rows=24", "cols must be"),  # an Arabic-Indic digit three
    ("cols=00080&rows=24", "got '00080'"),
    ("cols=%20%2080&rows=24", "cols must be"),
    ("cols=" + "9" * 5000 + "&rows=24", "got '" + "9" * 20 + "'"),
])
def test_a_size_that_is_not_one_is_refused_with_4400(connect, manager, docker, query, said):
    link = connect(query, binary=True)
    [error] = link.messages
    assert error["type"] == "error" and error["code"] == "bad_resize"
    assert said in error["message"]
    assert link.client.closed[:2] == (True, 4400)
    assert manager.sessions == {} and docker.processes == []


def test_url_size():
    assert url_size(None, None) is None
    assert url_size("1", "1000") == (1, 1000)
    assert url_size("0080", "024") == (80, 24)
    with pytest.raises(ProtocolError):
        url_size("1", None)
