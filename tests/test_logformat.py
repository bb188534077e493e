"""
--log-format json (capsule.ops.logformat): one object per event and line.
"""

import io
import json

import pytest
from twisted.application.service import Application
from twisted.logger import ILogObserver, Logger, LogPublisher
from twisted.python import usage
from twisted.python.failure import Failure

from capsule.ops.logformat import JSONLinesObserver, check_server_options, json_observer


def logged(namespace="capsule.sessions.session", **kw):
    stream = io.StringIO()
    publisher = LogPublisher(JSONLinesObserver(stream))
    log = Logger(namespace=namespace, observer=publisher)
    return stream, log


def lines(stream):
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_capsule_event():
    """
    time, level, namespace, the formatted message and the event's simple
    fields; a field named like one of the four is event_NAME.
    """
    stream, log = logged()
    log.info("session {session_id} of {user} started in {ms:.0f} ms (container {container})",
             session_id="0b5e2c9a", user="alice", ms=812.4, container="3f1d2c3b4a5e",
             warm=False, message="m")
    (record,) = lines(stream)
    assert set(record) == {"time", "level", "namespace", "message", "session_id", "user", "ms",
                           "container", "warm", "event_message"}
    assert record["level"] == "info"
    assert record["namespace"] == "capsule.sessions.session"
    assert record["message"] == ("session 0b5e2c9a of alice started in 812 ms"
                                 " (container 3f1d2c3b4a5e)")
    assert (record["session_id"], record["user"], record["ms"], record["container"],
            record["warm"], record["event_message"]) == (
        "0b5e2c9a", "alice", 812.4, "3f1d2c3b4a5e", False, "m")
    assert record["time"].endswith("Z") and record["time"][10] == "T"
    assert len(stream.getvalue().splitlines()) == 1


def test_no_bytes_objects_or_secrets():
    """
    bytes, objects and fields named like secrets are not written.
    """
    stream, log = logged()
    log.warn("odd", data=b"\x1b[31mterminal", token="s3cret", password="pw",
             authorization="Bearer x", api_key="k", facts=object(), count=3)
    (record,) = lines(stream)
    assert record["level"] == "warn"
    assert {k: v for k, v in record.items() if k not in ("time",)} == {
        "level": "warn", "namespace": "capsule.sessions.session", "message": "odd", "count": 3}
    assert "s3cret" not in stream.getvalue() and "terminal" not in stream.getvalue()


def test_other_namespaces_text_only():
    """
    Events of Twisted or Autobahn give their text, not their fields.
    """
    stream, log = logged(namespace="twisted.web.server")
    log.info("{peer} asked", peer="10.0.0.1", uri="/x?token=1")
    (record,) = lines(stream)
    assert {k for k in record} == {"time", "level", "namespace", "message"}
    assert record["message"] == "10.0.0.1 asked"


def test_failure():
    stream, log = logged()
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("session {session_id} broke", Failure(), session_id="0b5e2c9a")
    (record,) = lines(stream)
    assert record["level"] == "critical"
    assert record["message"] == "session 0b5e2c9a broke"
    assert "ZeroDivisionError" in record["failure"]


def test_where_it_writes(tmp_path):
    """
    stdout with -n or --logfile -, else the log file twistd would use.
    """
    out = io.StringIO()
    assert json_observer(None, out)._stream is out
    assert json_observer({"nodaemon": True, "logfile": None}, out)._stream is out
    assert json_observer({"nodaemon": False, "logfile": "-"}, out)._stream is out
    opened = []
    observer = json_observer({"nodaemon": True, "logfile": str(tmp_path / "c.log")}, out,
                             open_file=lambda name: opened.append(name) or out)
    assert opened == [str(tmp_path / "c.log")] and observer._stream is out
    json_observer({"nodaemon": False, "logfile": None}, out,
                  open_file=lambda name: opened.append(name) or out)
    assert opened[-1] == "twistd.log"


def test_refused_twistd_options():
    with pytest.raises(usage.UsageError, match="syslog"):
        check_server_options({"syslog": True})
    with pytest.raises(usage.UsageError, match="stdout"):
        check_server_options({"logfile": "-", "nodaemon": False})
    check_server_options({"logfile": "-", "nodaemon": True})
    check_server_options(None)


def test_application_carries_the_observer(tmp_path):
    """
    The service makeService builds gives twistd's application the observer
    twistd then logs to.
    """
    from capsule.services import CapsuleService

    service = CapsuleService(None, _Sessions(), None,
                             log_observer=JSONLinesObserver(io.StringIO()))
    application = Application("capsule")
    service.setServiceParent(application)
    assert application.getComponent(ILogObserver) is service.log_observer


class _Sessions:
    manager = None


def test_level_names():
    stream, log = logged()
    log.debug("d")
    log.error("e")
    assert [r["level"] for r in lines(stream)] == ["debug", "error"]


def test_options():
    """
    --log-format is text or json; json gives the service its observer,
    text none (twistd's own lines).
    """
    from twisted.internet.testing import MemoryReactorClock

    from capsule.tap import Options, makeService

    def parse(*args):
        options = Options()
        options.parseOptions(["-l", "tcp:0:interface=127.0.0.1", *args])
        return options

    assert parse()["log-format"] == "text"
    with pytest.raises(usage.UsageError, match="text or json"):
        parse("--log-format", "xml")
    assert makeService(parse(), MemoryReactorClock()).log_observer is None
    observer = makeService(parse("--log-format", "json"), MemoryReactorClock()).log_observer
    assert isinstance(observer, JSONLinesObserver)


def test_session_events_carry_user_and_duration():
    """
    A session's start and end events have the fields the JSON log gives:
    session id prefix, user, container id prefix, and the duration.
    """
    from twisted.internet.task import Clock
    from twisted.logger import globalLogPublisher

    from capsule.core.spec import ContainerSpec
    from capsule.sessions.manager import SessionManager
    from capsule.sessions.session import SessionConfig
    from tests.support.fakes import FakeDockerAPI, RecordingClient

    clock = Clock()
    manager = SessionManager(FakeDockerAPI(), clock, SessionConfig(
        spec=ContainerSpec(image="capsule-runtime:latest")))
    stream = io.StringIO()
    observer = JSONLinesObserver(stream)
    globalLogPublisher.addObserver(observer)
    try:
        session = manager.create(RecordingClient(), 80, 24, user="alice")
        clock.advance(90.5)
        manager.end(session, "bye")
    finally:
        globalLogPublisher.removeObserver(observer)
    records = [r for r in lines(stream) if r.get("session_id") == session.id[:8]]
    started = next(r for r in records if " started in " in r["message"])
    ended = next(r for r in records if " ended: " in r["message"])
    assert (started["user"], started["container"]) == ("alice", session.container_id[:12])
    assert (ended["user"], ended["duration"], ended["event_message"]) == ("alice", 90.5, "bye")
