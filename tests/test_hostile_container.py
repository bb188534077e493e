"""
What a session's relay sends is hostile (issue 9, items 6 to 8): its user
controls every byte of it.  Against the in-memory engine and a Clock.
"""

import struct
import uuid

import pytest
from twisted.internet.task import Clock

from capsule.core.spec import ContainerSpec
from capsule.core.keeper import MAX_FRAME
from capsule.sessions.manager import SessionManager
from capsule.sessions.session import LABEL_INSTANCE, LABEL_SESSION, SessionConfig
from tests.support.fakes import FakeDockerAPI, RecordingClient

MALFORMED = "the session's relay sent malformed data"


@pytest.fixture
def docker():
    return FakeDockerAPI()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def manager(docker, clock):
    spec = ContainerSpec(image="capsule-runtime:latest", memory="1g", cpus=1, pids=64)
    return SessionManager(docker, clock, SessionConfig(spec=spec, instance="t", grace=60))


def lines(events, session_id):
    return [e for e in events if e.get("session_id") == session_id[:8]]


def frame(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack(">I", len(payload)) + payload


BAD = {
    "a forged header": b"o\xff\xff\xff\xff",
    "an oversized output frame": b"o" + struct.pack(">I", MAX_FRAME + 1),
    "an unknown type": frame(b"z", b""),
    "an input frame": frame(b"i", b"ls\r"),
    "a short exit frame": frame(b"x", b"\x00\x00\x00"),
    "a long exit frame": frame(b"x", b"\x00\x00\x00\x00\x00"),
    "a replaced frame with a payload": frame(b"k", b"?"),
    "an exit status no shell has": frame(b"x", struct.pack(">I", 256)),
    "an exit status of 2**32-1": frame(b"x", b"\xff\xff\xff\xff"),
}


@pytest.mark.parametrize("bad", BAD.values(), ids=list(BAD))
def test_bad_frame_ends_the_session_once(manager, docker, clock, logged, bad):
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    process = docker.processes[0]
    protocol = process.process_protocol
    process.emit(b"$ ")
    protocol.childDataReceived(1, frame(b"o", b"before") + bad)
    # The frames before the bad one are the shell's; the session is over.
    assert client.output == b"$ before"
    assert client.events[-1] == ("ended", None, MALFORMED)
    assert not process.connected and session.container_id in docker.removed
    assert session.id not in manager.sessions
    # What follows is neither read nor held nor logged.
    for _ in range(100):
        protocol.childDataReceived(1, b"\xff" * 65536)
    process.end(0)
    assert client.events.count(("ended", None, MALFORMED)) == 1
    assert [e["log_format"] for e in lines(logged, session.id) if "log_failure" in e] == []
    said = [e for e in lines(logged, session.id) if e.get("problem")]
    assert len(said) == 1 and "malformed data" in said[0]["log_format"]


def test_forged_header_holds_nothing(manager, docker):
    session = manager.create(RecordingClient(), 80, 24)
    protocol = docker.processes[0].process_protocol
    protocol.childDataReceived(1, b"o\xff\xff\xff\xff")
    assert protocol._frames._buffer == b""
    protocol._frames.error = None  # even a reader told to go on is not fed again
    protocol.childDataReceived(1, b"o" + b"\x00" * 100000)
    assert protocol._frames._buffer == b"" and session.status() in ("ending", "ended")


def test_good_exit_status_is_the_shells(manager, docker):
    client = RecordingClient()
    manager.create(client, 80, 24)
    docker.processes[0].exit(255)
    assert client.events[-1] == ("ended", 255, "the shell exited with code 255")


def test_other_sessions_go_on(manager, docker):
    victim, other = RecordingClient(), RecordingClient()
    manager.create(victim, 80, 24)
    session = manager.create(other, 80, 24)
    docker.processes[0].process_protocol.childDataReceived(1, b"o\xff\xff\xff\xff")
    manager.write(session, b"ls\r")
    docker.processes[1].emit(b"fine")
    assert victim.events[-1] == ("ended", None, MALFORMED)
    assert other.output == b"fine" and docker.processes[1].written == [b"ls\r"]
    assert session.status() == "running"


def resuming(docker, clock, offset):
    """
    A recovered session whose client asks for C{offset}: the attach's exec
    is held, so that the test says what its relay sends.  (Each gets an id
    of its own: what is logged is counted per session.)
    """
    sid = str(uuid.uuid4())
    docker.add_container("alive", {"io.capsule.managed": "true", LABEL_INSTANCE: "t",
                                   LABEL_SESSION: sid})
    spec = ContainerSpec(image="capsule-runtime:latest")
    manager = SessionManager(docker, clock, SessionConfig(spec=spec, instance="t", grace=60))
    from twisted.internet.defer import Deferred
    Deferred.fromCoroutine(manager.recovery.recover())
    client = RecordingClient()
    docker.hold_exec = True
    manager.reconnect(sid, client, offset=offset)
    [(process, d)] = docker._held_execs
    process.process_protocol.makeConnection(process)
    d.callback(process)
    return manager, client, process, sid


PREAMBLES = {
    "offset 10**60-1": (10**60 - 1, 0),
    "offset past 2**53": (2**53 + 1, 0),
    "dropped 8.9e39": (100, 89 * 10**38),
    "more dropped than the offset": (5, 6),
}


@pytest.mark.parametrize("offset,dropped", PREAMBLES.values(), ids=list(PREAMBLES))
def test_impossible_preamble_ends_the_session(docker, clock, logged, offset, dropped):
    manager, client, process, sid = resuming(docker, clock, 0)
    process.emit(f"\x1b_capsule-keeper;offset={offset};dropped={dropped}\x1b\\$ ".encode())
    assert client.kinds()[-1] in ("ended", "failed")
    assert MALFORMED in client.events[-1]
    assert ("dropped", dropped, offset) not in client.events
    assert not process.connected and sid not in manager.sessions
    assert len([e for e in lines(logged, sid) if e.get("problem")]) == 1


@pytest.mark.parametrize("data", [
    b"no preamble at all",
    b"\x1b_capsule-keeper;offset=x;dropped=0\x1b\\",
    b"\x1b_capsule-keeper;" + b"9" * 200,
], ids=["none", "unparsable", "endless"])
def test_preamble_that_does_not_parse_ends_the_session(docker, clock, data):
    manager, client, process, sid = resuming(docker, clock, 0)
    process.emit(data)
    assert MALFORMED in client.events[-1]
    assert sid not in manager.sessions and not process.connected


def test_possible_preamble_is_believed(docker, clock):
    manager, client, process, sid = resuming(docker, clock, 40)
    process.emit(b"\x1b_capsule-keeper;offset=100;dropped=60\x1b\\$ ")
    assert client.events[:2] == [("started", sid, True), ("dropped", 60, 100)]
    assert client.output == b"$ " and manager.sessions[sid].status() == "running"


def test_output_errors_are_logged_once_a_minute_with_a_count(manager, docker, clock, logged):
    class Broken(RecordingClient):
        def session_output(self, data):
            raise RuntimeError("client blew up")

    session = manager.create(Broken(), 80, 24)
    process = docker.processes[0]
    for _ in range(1000):
        process.emit(b"x")
    failures = [e for e in lines(logged, session.id) if "log_failure" in e]
    assert len(failures) == 1
    clock.advance(59)
    process.emit(b"x")
    assert len([e for e in lines(logged, session.id) if "log_failure" in e]) == 1
    clock.advance(1)
    process.emit(b"x")
    failures = [e for e in lines(logged, session.id) if "log_failure" in e]
    assert len(failures) == 2 and failures[1]["more"] == 1000
    assert process.connected and session.status() == "running"
