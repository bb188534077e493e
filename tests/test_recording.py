"""
Recordings of sessions' output (capsule.ops.recording): asciicast v2, cut at a
size, resizes, UTF-8 across chunks.
"""

import json
import os
import stat
from types import SimpleNamespace

import pytest

from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from capsule.ops.recording import FLUSH_DELAY, FLUSH_SIZE, SessionRecorder

SID = "0b5e2c9a-6a0e-4e4a-9d2a-3f1d2c3b4a5e"
START = 1_790_000_000.25  # 2026-09-21T14:13:20Z


def make_session(cols=80, rows=24, sid=SID):
    return SimpleNamespace(id=sid, core=SimpleNamespace(size=(cols, rows)))


def make_recorder(tmp_path, max_bytes=50 * 1024 * 1024):
    clock = Clock()
    clock.advance(START)
    recorder = SessionRecorder(str(tmp_path / "rec"), clock, max_bytes,
                               run_in_thread=lambda f, *a: maybeDeferred(f, *a))
    recorder.startService()
    return recorder, clock


def read_cast(tmp_path):
    (name,) = os.listdir(tmp_path / "rec")
    with open(tmp_path / "rec" / name, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f.read().splitlines()]
    return name, lines[0], lines[1:]


def test_format(tmp_path):
    """
    A header with version, size, start and TERM; output events with the
    seconds since the start; the file named by session id and start time.
    """
    recorder, clock = make_recorder(tmp_path)
    session = make_session(100, 30)
    recorder.session_output(session, b"$ ")
    clock.advance(1.5)
    recorder.session_output(session, b"ls\r\n")
    recorder.session_ended(session)
    name, head, events = read_cast(tmp_path)
    assert name == f"{SID}-20260921T141320Z.cast"
    assert head == {"version": 2, "width": 100, "height": 30, "timestamp": 1790000000,
                    "env": {"TERM": "xterm-256color"}}
    # Seconds since the header's timestamp (the whole second it began in).
    assert events == [[0.25, "o", "$ "], [1.75, "o", "ls\r\n"]]
    mode = os.stat(tmp_path / "rec" / name).st_mode
    assert stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "rec").st_mode) == 0o700


def test_written_later_or_when_large(tmp_path):
    """
    Small output waits for the flush delay; output past the flush size is
    written at once.
    """
    recorder, clock = make_recorder(tmp_path)
    session = make_session()
    recorder.session_output(session, b"hello")
    assert os.listdir(tmp_path / "rec") == []
    clock.advance(FLUSH_DELAY)
    assert [e[2] for e in read_cast(tmp_path)[2]] == ["hello"]
    recorder.session_output(session, b"x" * FLUSH_SIZE)
    assert [len(e[2]) for e in read_cast(tmp_path)[2]] == [5, FLUSH_SIZE]
    assert clock.getDelayedCalls() == []


def test_resize(tmp_path):
    """
    A resize is an "r" event; one before any output is in the header.
    """
    recorder, clock = make_recorder(tmp_path)
    session = make_session(80, 24)
    recorder.session_resized(session, 90, 25)  # not begun: nothing written
    session.core.size = (90, 25)
    recorder.session_output(session, b"a")
    clock.advance(2)
    session.core.size = (120, 40)
    recorder.session_resized(session, 120, 40)
    recorder.session_ended(session)
    _, head, events = read_cast(tmp_path)
    assert (head["width"], head["height"]) == (90, 25)
    assert events == [[0.25, "o", "a"], [2.25, "r", "120x40"]]


def test_utf8_across_chunks(tmp_path):
    """
    A character split between chunks is written whole, with the second
    chunk; bytes that are not UTF-8, and a character cut by the end, are
    U+FFFD.
    """
    recorder, clock = make_recorder(tmp_path)
    session = make_session()
    euro = "€".encode()  # three bytes
    recorder.session_output(session, b"a" + euro[:1])
    recorder.session_output(session, euro[1:2])
    recorder.session_output(session, euro[2:] + b"b\xff")
    recorder.session_output(session, euro[:2])
    recorder.session_ended(session)
    _, _, events = read_cast(tmp_path)
    assert events == [[0.25, "o", "a"], [0.25, "o", "€b\ufffd"], [0.25, "o", "\ufffd"]]


def test_cut_at_max_bytes(tmp_path):
    """
    Past --record-max-bytes, a marker is the last line and nothing more
    is recorded of the session; the file is at most the cap plus that line.
    """
    recorder, clock = make_recorder(tmp_path, max_bytes=1000)
    session = make_session()
    for _ in range(30):
        recorder.session_output(session, b"y" * 40)
        clock.advance(0.1)
    recorder.session_resized(session, 100, 30)
    recorder.session_ended(session)
    name, _, events = read_cast(tmp_path)
    assert events[-1][1:] == ["m", "recording cut: it reached --record-max-bytes (1000)"]
    assert all(e[1:] == ["o", "y" * 40] for e in events[:-1])
    with open(tmp_path / "rec" / name, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    assert sum(map(len, lines[:-1])) <= 1000
    assert sum(map(len, lines[:-1])) + len(lines[1]) > 1000


def test_sessions_apart_and_stop(tmp_path):
    """
    Each session has a file of its own; stopping writes what waits, and a
    session's end before any output writes nothing.
    """
    recorder, clock = make_recorder(tmp_path)
    one, two = make_session(sid="a" * 36), make_session(sid="b" * 36)
    recorder.session_output(one, b"1")
    recorder.session_output(two, b"2")
    recorder.session_ended(make_session(sid="c" * 36))
    d = recorder.stopService()
    assert d.called
    names = sorted(os.listdir(tmp_path / "rec"))
    assert [n[:36] for n in names] == ["a" * 36, "b" * 36]
    for name, text in zip(names, "12"):
        with open(tmp_path / "rec" / name, encoding="utf-8") as f:
            assert json.loads(f.read().splitlines()[1]) == [0.25, "o", text]


def test_write_failure_stops_recording(tmp_path):
    """
    A file that cannot be written ends that session's recording with one
    error logged; the session's output still goes on being accepted.
    """
    recorder, clock = make_recorder(tmp_path)
    os.chmod(tmp_path / "rec", 0o500)
    try:
        if os.access(tmp_path / "rec", os.W_OK):  # root writes anyway
            os.rmdir(tmp_path / "rec")
            (tmp_path / "rec").write_text("not a directory")
        events = []
        globalLogPublisher.addObserver(events.append)
        try:
            session = make_session()
            recorder.session_output(session, b"x")
            clock.advance(FLUSH_DELAY)
            recorder.session_output(session, b"y")
            clock.advance(FLUSH_DELAY)
            recorder.session_ended(session)
        finally:
            globalLogPublisher.removeObserver(events.append)
        errors = [e for e in events if e.get("log_namespace") == "capsule.ops.recording"]
        assert [e["log_level"] for e in errors] == [LogLevel.error]
        assert "no longer recorded" in formatEvent(errors[0])
        # The session by its id's prefix, as every log line names one.
        assert f"session {SID[:8]} " in formatEvent(errors[0])
        assert SID not in formatEvent(errors[0])
        assert not [v for v in errors[0].values() if isinstance(v, str) and SID in v]
        assert clock.getDelayedCalls() == []
    finally:
        if (tmp_path / "rec").is_dir():
            os.chmod(tmp_path / "rec", 0o700)


def test_a_loose_directory_is_tightened_at_start(tmp_path):
    """
    A recordings' directory made beforehand with a looser mode is made
    readable by capsule only when recording starts (its file names are full
    session ids), and the log says so; one that is tight already is left
    alone, without a word.
    """
    os.makedirs(tmp_path / "rec", mode=0o755)
    os.chmod(tmp_path / "rec", 0o755)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        recorder, _ = make_recorder(tmp_path)
        recorder.stopService()
        said = [formatEvent(e) for e in events
                if e.get("log_namespace") == "capsule.ops.recording"]
        assert stat.S_IMODE(os.stat(tmp_path / "rec").st_mode) == 0o700
        assert said == [f"the recordings' directory {tmp_path / 'rec'} was mode 0755: made it"
                        " 0700 (its file names are session ids)"]
        del events[:]
        recorder, _ = make_recorder(tmp_path)
        recorder.stopService()
        assert [e for e in events if e.get("log_namespace") == "capsule.ops.recording"] == []
        assert stat.S_IMODE(os.stat(tmp_path / "rec").st_mode) == 0o700
    finally:
        globalLogPublisher.removeObserver(events.append)


def test_options_and_wiring(tmp_path):
    """
    --record DIR gives the session manager a recorder, a child of the
    server that stops after the sessions; --record-max-bytes takes sizes.
    """
    from twisted.internet.testing import MemoryReactorClock

    from capsule.tap import Options, makeService
    from capsule.services import SessionService

    options = Options()
    options.parseOptions(["-l", "tcp:0:interface=127.0.0.1", "--record", str(tmp_path),
                          "--record-max-bytes", "2m"])
    assert options["record-max-bytes"] == 2 * 1024 * 1024
    service = makeService(options, MemoryReactorClock())
    [recorder] = [o for o in service.manager.observers if isinstance(o, SessionRecorder)]
    assert (recorder.directory, recorder.max_bytes) == (str(tmp_path), 2 * 1024 * 1024)
    children = list(service)
    assert children.index(recorder) < children.index(service.sessions)
    assert isinstance(service.sessions, SessionService)
    plain = Options()
    plain.parseOptions(["-l", "tcp:0:interface=127.0.0.1"])
    assert not [o for o in makeService(plain, MemoryReactorClock()).manager.observers
                if isinstance(o, SessionRecorder)]
    assert plain["record-max-bytes"] == 50 * 1024 * 1024


def test_manager_tells_the_recorder():
    """
    The session manager passes each session's output, resizes and end to
    its recorder.
    """
    from capsule.core.spec import ContainerSpec
    from capsule.sessions.manager import SessionManager
    from capsule.sessions.observers import SessionObserver
    from capsule.sessions.session import SessionConfig
    from tests.support.fakes import FakeDockerAPI, RecordingClient

    told = []

    class Recorder(SessionObserver):
        def session_output(self, session, data):
            told.append(("o", session.id, data))

        def session_resized(self, session, cols, rows):
            told.append(("r", session.id, cols, rows))

        def session_ended(self, session):
            told.append(("end", session.id))

    clock, docker = Clock(), FakeDockerAPI()
    manager = SessionManager(docker, clock, SessionConfig(
        spec=ContainerSpec(image="capsule-runtime:latest")), observers=[Recorder()])
    session = manager.create(RecordingClient(), 80, 24)
    docker.processes[0].emit(b"hi")
    manager.resize(session, 100, 30)
    manager.end(session, "bye")
    assert told == [("o", session.id, b"hi"), ("r", session.id, 100, 30), ("end", session.id)]


def test_a_directory_that_cannot_be_one_is_a_usage_error(tmp_path):
    from twisted.python import usage

    from capsule.tap import Options

    (tmp_path / "file").write_text("")
    options = Options()
    with pytest.raises(usage.UsageError, match="--record: cannot make"):
        options.parseOptions(["--record", str(tmp_path / "file" / "rec")])
    Options().parseOptions(["--record", str(tmp_path / "new" / "rec")])
    assert stat.S_IMODE(os.stat(tmp_path / "new" / "rec").st_mode) == 0o700


def test_output_after_stop_is_not_recorded(tmp_path):
    """
    Sessions may still speak while capsule stops: once the recorder has
    stopped, their output is let through unrecorded.
    """
    recorder, clock = make_recorder(tmp_path)
    session = make_session()
    recorder.session_output(session, b"before")
    recorder.stopService()
    recorder.session_output(session, b"after" * FLUSH_SIZE)
    recorder.session_resized(session, 1, 1)
    recorder.session_ended(session)
    clock.advance(FLUSH_DELAY)
    _, _, events = read_cast(tmp_path)
    assert events == [[0.25, "o", "before"]]
    assert clock.getDelayedCalls() == []
