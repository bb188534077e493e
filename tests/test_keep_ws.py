"""
Kept sessions on the WebSocket, in memory (the client of L{tests.in_memory},
the fake engine, a keeping in memory): a kept session asked for is an error
frame C{session_kept} and a close 4404; C{resume=1} resumes it through drain
and admission and attaches, with C{resumed_from} and a notice; every
C{connected} frame says C{on_close}.  The JSON and the binary protocol alike.
"""

from __future__ import annotations

import pytest

from capsule.core.admission import AdmissionControl, AdmissionPolicy
from capsule.core.kept import closing_outcome
from capsule.sessions.drain import Drain
from capsule.sessions.service import SessionService
from capsule.web.websocket_factory import CapsuleServerFactory
from tests.support.fake_keeping import FakeKeeping

from .in_memory import Link, clock, docker, manager  # noqa: F401 (fixtures)

KEPT_ID = "6f9619ff-8b86-4011-b42d-00c04fc964ff"
# 14 Nov 2023 22:13:20 UTC
NOW = 1_700_000_000.0


@pytest.fixture
def keeping(manager, docker, clock):
    clock.advance(NOW)
    return FakeKeeping(manager, docker, clock)


def factory_of(manager, clock, keeping, admission=None, drain=None, user=None):
    sessions = SessionService(manager, admission, drain, keeping)
    factory = CapsuleServerFactory(manager, clock, sessions=sessions)
    return factory


@pytest.fixture
def factory(manager, clock, keeping):
    return factory_of(manager, clock, keeping)


def connect(clock, factory, query: str = "", binary: bool = False) -> Link:
    return Link(clock, factory, query, binary)


@pytest.mark.parametrize("binary", [False, True])
def test_a_kept_session_is_an_error_frame_then_4404(clock, factory, keeping, binary):
    kept = keeping.add(KEPT_ID, kept_at=NOW - 3600)
    link = connect(clock, factory, f"session_id={KEPT_ID}", binary)
    [error] = link.new()
    assert error == {
        "type": "error", "code": "session_kept", "kept_at": NOW - 3600,
        "kept_until": kept.expires_at,
        "message": "this session was put away on 14 Nov 2023 21:13 UTC and is kept until"
                   " 21 Nov 2023 21:13 UTC: resume it"}
    assert link.client.closed[1] == 4404
    assert KEPT_ID in keeping.kept_sessions and keeping.calls == []


def test_another_users_kept_session_is_not_found_as_a_missing_one(clock, manager, keeping):
    keeping.add(KEPT_ID, user="alice")
    link = connect(clock, factory_of(manager, clock, keeping), f"session_id={KEPT_ID}")
    [error] = link.new()
    assert error["code"] == "session_not_found" and "kept" not in error
    assert link.client.closed[1] == 4404


@pytest.mark.parametrize("binary", [False, True])
def test_resume_1_resumes_the_kept_session_and_attaches(clock, factory, keeping, manager,
                                                        docker, binary):
    keeping.add(KEPT_ID, kept_at=NOW - 60)
    link = connect(clock, factory, f"session_id={KEPT_ID}&resume=1&cols=100&rows=30",
                   binary)
    messages = link.new()
    connected = messages[0]
    assert connected["type"] == "connected" and connected["session_id"] == KEPT_ID
    assert connected["resumed_from"] == NOW - 60
    assert connected["on_close"] == closing_outcome(keeping.retention, 60, NOW)
    assert messages[1]["type"] == "notice" and messages[1]["code"] == "resumed"
    assert "put away on 14 Nov 2023 22:12 UTC" in messages[1]["message"]
    session = manager.sessions[KEPT_ID]
    assert session.client is link.server and KEPT_ID not in keeping.kept_sessions
    assert keeping.calls == [("resume", KEPT_ID, None)]
    process = docker.processes[-1]
    assert process.resizes[-1] == (100, 30)
    # Input reaches the new shell.
    if binary:
        link.send_raw(b"ls\r", binary=True)
    else:
        link.send({"type": "input", "data": "ls\r"})
    assert process.written == [b"ls\r"]


def test_resume_1_of_a_live_session_is_a_plain_reconnect(clock, factory, keeping, manager):
    first = connect(clock, factory)
    first.send({"type": "resize", "cols": 80, "rows": 24})
    session_id = first.new()[0]["session_id"]
    first.close()
    second = connect(clock, factory, f"session_id={session_id}&resume=1")
    [connected] = [m for m in second.new() if m["type"] == "connected"]
    assert connected["resumed"] is True and "resumed_from" not in connected
    assert keeping.calls == []


def test_resume_1_passes_drain(clock, manager, keeping):
    drain = Drain(manager, clock)
    drain.start(None)
    keeping.add(KEPT_ID)
    link = connect(clock, factory_of(manager, clock, keeping, drain=drain),
                   f"session_id={KEPT_ID}&resume=1")
    [error] = link.new()
    assert error["code"] == "draining" and link.client.closed[1] == 4503
    assert KEPT_ID in keeping.kept_sessions and keeping.calls == []


def test_resume_1_passes_admission(clock, manager, keeping):
    admission = AdmissionControl(manager, clock, AdmissionPolicy(max_sessions=0, rate=None))
    keeping.add(KEPT_ID)
    link = connect(clock, factory_of(manager, clock, keeping, admission=admission),
                   f"session_id={KEPT_ID}&resume=1")
    [error] = link.new()
    assert error["code"] == "server_full" and link.client.closed[1] == 4503
    assert KEPT_ID in keeping.kept_sessions


def held_resume(keeping):
    """
    Hold the keeping's resumes until the returned Deferred fires.
    """
    from twisted.internet.defer import Deferred
    release = Deferred()
    resume = keeping.resume
    keeping.resume = lambda session_id, user: release.addCallback(
        lambda _: resume(session_id, user))
    return release


def test_input_while_the_kept_session_is_resumed_is_refused_and_the_size_kept(
        clock, manager, docker, keeping):
    keeping.add(KEPT_ID, kept_at=NOW)
    release = held_resume(keeping)
    link = connect(clock, factory_of(manager, clock, keeping),
                   f"session_id={KEPT_ID}&resume=1")
    link.send({"type": "input", "data": "early"})
    [error] = link.new()
    assert error["code"] == "resuming"
    link.send({"type": "resize", "cols": 90, "rows": 20})
    release.callback(None)
    link.flush()
    assert [m["type"] for m in link.new()] == ["connected", "notice"]
    assert docker.processes[-1].resizes[-1] == (90, 20)
    assert docker.processes[-1].written == []


def test_a_client_gone_during_the_resume_leaves_the_session_live_and_waiting(
        clock, manager, keeping):
    keeping.add(KEPT_ID)
    release = held_resume(keeping)
    link = connect(clock, factory_of(manager, clock, keeping),
                   f"session_id={KEPT_ID}&resume=1")
    link.close()
    release.callback(None)
    session = manager.sessions[KEPT_ID]
    assert session.client is None and not session.over


def test_two_resumes_of_one_kept_session_share_the_work(clock, manager, keeping):
    keeping.add(KEPT_ID)
    release = held_resume(keeping)
    factory = factory_of(manager, clock, keeping)
    first = connect(clock, factory, f"session_id={KEPT_ID}&resume=1")
    second = connect(clock, factory, f"session_id={KEPT_ID}&resume=1")
    release.callback(None)
    first.flush()
    second.flush()
    assert keeping.calls == [("resume", KEPT_ID, None)]
    # Both attached in turn: the second took the session over from the first.
    assert manager.sessions[KEPT_ID].client is second.server
    assert first.client.closed[1] == 4409


def test_a_new_session_is_told_what_closing_its_tab_does(clock, factory, keeping):
    link = connect(clock, factory)
    link.send({"type": "resize", "cols": 80, "rows": 24})
    [connected] = link.new()
    assert connected["on_close"] == {"outcome": "kept", "after": 60,
                                     "until": NOW + 60 + keeping.retention}
    assert "resumed_from" not in connected
    keeping.retention = 0
    again = connect(clock, factory)
    again.send({"type": "resize", "cols": 80, "rows": 24})
    keeping_off = [m for m in again.new() if m["type"] == "connected"][0]
    assert keeping_off["on_close"] == {"outcome": "removed", "after": 60}


def test_without_a_keeping_the_connected_frame_is_as_before(clock, manager):
    factory = CapsuleServerFactory(manager, clock, sessions=SessionService(manager))
    link = connect(clock, factory)
    link.send({"type": "resize", "cols": 80, "rows": 24})
    [connected] = link.new()
    assert "on_close" not in connected and "resumed_from" not in connected
    missing = connect(clock, factory, f"session_id={KEPT_ID}&resume=1")
    [error] = missing.new()
    assert error["code"] == "session_not_found" and missing.client.closed[1] == 4404


@pytest.mark.parametrize("binary", [False, True])
def test_a_session_being_put_away_as_a_client_attaches_is_session_kept_and_4404(
        clock, factory, manager, binary):
    # What the lifecycle tells a client that attaches to a session being put away.
    first = connect(clock, factory, binary=binary)
    first.send({"type": "resize", "cols": 80, "rows": 24})
    first.new()
    first.server.session_failed("the session is being put away", "session_kept")
    first.flush()
    assert first.new() == [{"type": "error", "code": "session_kept",
                            "message": "the session is being put away"}]
    assert first.client.closed[1] == 4404
