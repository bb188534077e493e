"""
A new session made as the WebSocket opens (C{start_at_open}), before the
client's first frame: in memory, Autobahn's client against the real protocol
and session manager, the fake engine and a Clock (see L{tests.test_websocket}).
"""

from __future__ import annotations

import pytest

from capsule.core.admission import AdmissionControl, AdmissionPolicy
from capsule.sessions.manager import SessionManager
from capsule.sessions.service import SessionService
from capsule.sessions.session import WARM_SIZE
from capsule.web.websocket import CLOSE_INVALID_SESSION, CLOSE_UNAVAILABLE
from capsule.web.websocket_factory import CapsuleServerFactory

from .in_memory import Link, clock, docker, make_manager  # noqa: F401 (fixtures)
from .test_pool import CountingDocker
from tests.support.fakes import RecordingClient
from .test_websocket import MAX_MESSAGE, WINDOW, outputs


def factory_of(manager, clock, sessions=None) -> CapsuleServerFactory:
    return CapsuleServerFactory(manager, clock, max_message_size=MAX_MESSAGE,
                                flow_window=WINDOW, sessions=sessions, start_at_open=True)


def manager_of(docker, clock, pool_size=0) -> SessionManager:
    manager = make_manager(docker, clock, pool_size=pool_size)
    manager.pool.start()
    return manager


def test_the_container_is_asked_for_as_the_connection_opens(docker, clock):
    docker.hold_create = True
    manager = manager_of(docker, clock)
    link = Link(clock, factory_of(manager, clock))
    [session] = manager.sessions.values()
    assert len(docker.containers) == 1 and session.status() == "starting"
    assert link.is_open and link.new() == []
    link.send({"type": "resize", "cols": 100, "rows": 30})
    assert link.new() == []
    docker.release_create()
    link.flush()
    assert link.new() == [{"type": "connected", "grace": 60, "kept": False, "profile": "shell", "profile": "shell",
                           "session_id": session.id, "resumed": False,
                           "replay": 0}]
    [process] = docker.processes
    assert process.resizes == [(100, 30)], "the first size, applied as the shell starts"
    link.send({"type": "input", "data": "ls\r"})
    assert process.written == [b"ls\r"]


def test_what_the_session_says_before_the_first_frame_waits_for_it(docker, clock):
    manager = manager_of(docker, clock)
    link = Link(clock, factory_of(manager, clock))
    [session] = manager.sessions.values()
    [process] = docker.processes
    process.emit(b"banner\r\n$ ")
    assert session.status() == "running" and link.new() == []
    link.send({"type": "resize", "cols": 120, "rows": 40})
    clock.advance(0.01)
    link.flush()
    messages = link.new()
    assert messages[0] == {"type": "connected", "grace": 60, "kept": False, "profile": "shell", "profile": "shell",
                           "session_id": session.id, "resumed": False,
                           "replay": 0}
    assert outputs(messages) == b"banner\r\n$ "
    assert process.resizes == [WARM_SIZE, (120, 40)]


def test_input_before_the_first_frame_is_refused_and_the_connection_stays(docker, clock):
    manager = manager_of(docker, clock)
    link = Link(clock, factory_of(manager, clock))
    link.send({"type": "input", "data": "ls\r"})
    [error] = link.new()
    assert error["type"] == "error" and error["code"] == "not_started"
    assert docker.processes[0].written == []
    link.still_open()


@pytest.mark.parametrize("started", [False, True])
def test_a_client_that_leaves_before_its_first_frame_leaves_nothing(docker, clock, started):
    docker.hold_create = not started
    manager = manager_of(docker, clock)
    link = Link(clock, factory_of(manager, clock))
    [session] = manager.sessions.values()
    link.close()
    docker.release_create()
    assert manager.sessions == {} and docker.containers == {}
    assert session.status() == "ended"
    assert session.core.message == "its client left before it sent its terminal size"


def test_no_first_frame_in_time_closes_and_ends_the_session(docker, clock):
    manager = manager_of(docker, clock)
    factory = factory_of(manager, clock)
    link = Link(clock, factory)
    clock.advance(factory.first_frame_timeout - 0.1)
    link.flush()
    assert link.is_open
    clock.advance(0.1)
    link.flush()
    [error] = link.new()
    assert error["code"] == "not_started" and "no terminal size within 30 s" in error["message"]
    assert link.client.closed[1] == CLOSE_INVALID_SESSION
    assert manager.sessions == {} and docker.containers == {}


def test_output_held_for_a_silent_client_is_bounded(docker, clock):
    manager = manager_of(docker, clock)
    factory = factory_of(manager, clock)
    factory.max_held_output = 100
    link = Link(clock, factory)
    [process] = docker.processes
    process.emit(b"x" * 100)
    assert link.is_open
    process.emit(b"y")
    link.flush()
    [error] = link.new()
    assert error["code"] == "not_started" and "grew past 100 bytes" in error["message"]
    assert link.client.closed[1] == CLOSE_INVALID_SESSION
    assert manager.sessions == {} and docker.containers == {}


def test_admission_decides_before_anything_is_made(docker, clock):
    manager = manager_of(docker, clock)
    factory = factory_of(manager, clock, sessions=SessionService(manager, AdmissionControl(
        manager, clock, AdmissionPolicy(max_sessions=1, max_per_client=1, rate=None))))
    first = Link(clock, factory)
    assert len(manager.sessions) == 1
    second = Link(clock, factory)
    [error] = second.new()
    assert error["code"] == "server_full"
    assert second.client.closed[1] == CLOSE_UNAVAILABLE
    assert len(manager.sessions) == 1 and len(docker.containers) == 1
    first.still_open()


def test_a_warm_session_is_taken_as_the_connection_opens_without_a_docker_call(docker, clock):
    counting = CountingDocker(docker)
    manager = manager_of(counting, clock, pool_size=1)
    warm = manager.pool["shell"].ready[0]
    warm.shell.process._stream.emit(b"banner\r\n$ ")
    counting.calls.clear()
    link = Link(clock, factory_of(manager, clock))
    assert counting.calls == []
    assert manager.sessions == {warm.id: warm} and warm.client is link.server
    link.send({"type": "resize", "cols": 120, "rows": 40})
    clock.advance(0.01)
    link.flush()
    messages = link.new()
    assert messages[0] == {"type": "connected", "grace": 60, "kept": False, "profile": "shell", "profile": "shell",
                           "session_id": warm.id, "resumed": False,
                           "replay": 10}
    assert outputs(messages) == b"banner\r\n$ "
    assert docker.processes[0].resizes == [WARM_SIZE, WARM_SIZE, (120, 40)]
    assert counting.calls == []


def test_removals_in_flight_are_counted_for_admission(docker, clock):
    manager = manager_of(docker, clock)
    session = manager.create(RecordingClient(), 80, 24)
    docker.hold_remove = True
    manager.end(session, "done")
    assert manager.removing == 1
    docker.release_removes()
    assert manager.removing == 0 and docker.containers == {}
