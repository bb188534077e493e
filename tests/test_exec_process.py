"""
The exec stream protocol, in memory: the exec-start upgrade, the stream,
refusals, demultiplexing and resizes, over a StringTransport.
"""

import json
import struct

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from capsule.core.errors import DockerError
from capsule.engine.exec_process import (
    MAX_FRAME, Demultiplexer, DemultiplexError, ExecStreamProtocol, exec_start_request,
)
from capsule.core.interfaces import IExecProcess

UPGRADED = (b"HTTP/1.1 101 UPGRADED\r\n"
            b"Content-Type: application/vnd.docker.raw-stream\r\n"
            b"Connection: Upgrade\r\n"
            b"Upgrade: tcp\r\n"
            b"\r\n")


class Recorder(ProcessProtocol):
    def __init__(self, events: list) -> None:
        self.events = events

    def makeConnection(self, transport) -> None:
        self.events.append(("connected", transport))
        super().makeConnection(transport)

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.events.append(("data", fd, data))


class Resizes:
    """
    The engine's exec resize: each call waits until the test answers it.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.pending: list[Deferred] = []

    def __call__(self, exec_id: str, cols: int, rows: int) -> Deferred:
        self.calls.append((exec_id, cols, rows))
        d = Deferred()
        self.pending.append(d)
        return d

    def answer(self, result=None) -> None:
        d = self.pending.pop(0)
        if isinstance(result, Exception):
            d.errback(result)
        else:
            d.callback(result)


def make(tty: bool = True):
    """
    A protocol connected to a StringTransport, and what it did so far:
    C{events} in order (the process protocol's calls, C{("fired", result)}
    when C{upgraded} fires, C{("closed", reason)} from C{on_closed}).
    """
    events: list = []
    resizes = Resizes()
    protocol = ExecStreamProtocol(
        "exec1", exec_start_request("1.45", "exec1", tty), Recorder(events),
        on_closed=lambda stream, reason: events.append(("closed", reason)),
        resize=resizes, tty=tty)
    upgraded = protocol.upgraded
    upgraded.addBoth(lambda result: (events.append(("fired", result)), None)[1])
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, events, resizes


@pytest.fixture
def logged():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def test_the_upgrade_request():
    body = b'{"Detach": false, "Tty": true}'
    assert exec_start_request("1.45", "abc123", True) == (
        b"POST /v1.45/exec/abc123/start HTTP/1.1\r\n"
        b"Host: docker\r\n"
        b"User-Agent: capsule\r\n"
        b"Content-Type: application/json\r\n"
        b"Connection: Upgrade\r\n"
        b"Upgrade: tcp\r\n"
        b"Content-Length: 30\r\n"
        b"\r\n" + body)
    assert json.loads(exec_start_request("1.41", "x", False).split(b"\r\n\r\n", 1)[1]) == {
        "Detach": False, "Tty": False}


def test_connecting_sends_the_request_and_nothing_starts_before_the_answer():
    protocol, transport, events, _ = make()
    assert transport.value() == exec_start_request("1.45", "exec1", True)
    protocol.dataReceived(UPGRADED[:20])
    assert events == []


def test_101_then_the_stream():
    protocol, transport, events, _ = make()
    assert verifyObject(IExecProcess, protocol)
    protocol.dataReceived(UPGRADED)
    assert events == [("connected", protocol), ("fired", protocol)]
    assert protocol.upgraded is None
    protocol.dataReceived(b"$ ")
    protocol.dataReceived(b"\x00\x01 raw")
    assert events[2:] == [("data", 1, b"$ "), ("data", 1, b"\x00\x01 raw")]


def test_a_header_split_anywhere():
    protocol, transport, events, _ = make()
    for byte in UPGRADED:
        protocol.dataReceived(bytes([byte]))
    assert [e[0] for e in events] == ["connected", "fired"]


def test_bytes_in_the_packet_of_the_headers_come_after_the_deferred_fires():
    protocol, transport, events, _ = make()
    protocol.dataReceived(UPGRADED + b"first prompt $ ")
    assert events == [("connected", protocol), ("fired", protocol),
                      ("data", 1, b"first prompt $ ")]


def test_a_200_answer_is_a_stream_too():
    # What older engines answer.
    protocol, transport, events, _ = make()
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.docker.raw-stream"
                          b"\r\n\r\nhi")
    assert [e[0] for e in events] == ["connected", "fired", "data"]


def test_a_refusal_with_a_json_body_is_a_docker_error_with_its_message():
    protocol, transport, events, _ = make()
    body = b'{"message":"container 4f2a is not running"}\n'
    protocol.dataReceived(b"HTTP/1.1 409 Conflict\r\nApi-Version: 1.45\r\n"
                          b"Content-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
    assert events == [] and not transport.disconnecting
    protocol.dataReceived(body[10:])
    assert transport.disconnecting
    protocol.connectionLost(Failure(ConnectionDone()))
    [(kind, failure)] = events
    assert kind == "fired" and failure.check(DockerError)
    assert failure.value.message == (
        "Docker refused to start the shell (HTTP 409): container 4f2a is not running")


def test_a_chunked_refusal():
    protocol, transport, events, _ = make()
    body = b'{"message":"No such exec instance: exec1"}'
    protocol.dataReceived(b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"%x\r\n" % len(body) + body + b"\r\n")
    assert not transport.disconnecting
    protocol.dataReceived(b"0\r\n\r\n")
    assert transport.disconnecting
    protocol.connectionLost(Failure(ConnectionDone()))
    assert events[0][1].value.message == (
        "Docker refused to start the shell (HTTP 404): No such exec instance: exec1")


def test_an_endless_refusal_body_is_not_buffered():
    protocol, transport, events, _ = make()
    protocol.dataReceived(b"HTTP/1.1 500 Internal Server Error\r\n"
                          b"Content-Length: 100000000\r\n\r\n")
    protocol.dataReceived(b"x" * 70000)
    assert transport.disconnecting
    protocol.connectionLost(Failure(ConnectionDone()))
    assert events[0][1].check(DockerError)
    assert "HTTP 500" in events[0][1].value.message


def test_an_oversized_header_is_refused():
    protocol, transport, events, _ = make()
    protocol.dataReceived(b"HTTP/1.1 101 UPGRADED\r\n")
    protocol.dataReceived(b"X-Padding: " + b"a" * (64 * 1024) + b"\r\n")
    assert transport.disconnected
    [(kind, failure)] = events
    assert kind == "fired"
    assert failure.value.message == "Docker sent an oversized exec-start response"
    protocol.connectionLost(Failure(ConnectionLost()))
    assert len(events) == 1


def test_a_close_before_the_answer_fails_the_upgrade():
    protocol, transport, events, _ = make()
    protocol.connectionLost(Failure(ConnectionLost("gone")))
    [(kind, failure)] = events
    assert kind == "fired" and failure.check(DockerError)
    assert failure.value.message.startswith("Docker closed the exec stream before it started")


def test_cancelling_the_upgrade_hangs_up_and_nothing_starts_later():
    protocol, transport, events, _ = make()
    protocol.upgraded.cancel()
    assert transport.disconnected
    protocol.dataReceived(UPGRADED + b"late")
    protocol.connectionLost(Failure(ConnectionLost()))
    assert [e[0] for e in events] == ["fired"]


def test_the_end_of_the_stream_goes_to_its_owner():
    protocol, transport, events, _ = make()
    protocol.dataReceived(UPGRADED)
    reason = Failure(ConnectionDone())
    protocol.connectionLost(reason)
    assert events[-1] == ("closed", reason)
    protocol.write(b"after the end")
    assert transport.value() == exec_start_request("1.45", "exec1", True)


def test_writes_pause_and_close_reach_the_connection():
    protocol, transport, events, _ = make()
    protocol.dataReceived(UPGRADED)
    transport.clear()
    protocol.write(b"ls\r")
    protocol.writeToChild(0, b"pwd\r")
    assert transport.value() == b"ls\rpwd\r"
    protocol.pauseProducing()
    assert transport.producerState == "paused"
    protocol.resumeProducing()
    assert transport.producerState == "producing"
    protocol.loseConnection()
    assert transport.disconnecting


def frame(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxI", stream, len(payload)) + payload


def test_demultiplexing_without_a_tty():
    protocol, transport, events, _ = make(tty=False)
    data = frame(1, b"out") + frame(2, b"err") + frame(1, b"") + frame(1, b"more")
    protocol.dataReceived(UPGRADED + data[:5])
    for at in range(5, len(data), 3):
        protocol.dataReceived(data[at : at + 3])
    assert events[2:] == [("data", 1, b"out"), ("data", 2, b"err"), ("data", 1, b""),
                          ("data", 1, b"more")]


def test_dockers_own_errors_are_logged_not_output(logged):
    protocol, transport, events, _ = make(tty=False)
    protocol.dataReceived(UPGRADED + frame(3, b"exec failed: no such file\n") + frame(1, b"ok"))
    assert events[2:] == [("data", 1, b"ok")]
    assert any(e.get("message") == "exec failed: no such file" for e in logged)


@pytest.mark.parametrize("header", [
    struct.pack(">BxxxI", 7, 1),
    b"\x01\x00\x01\x00" + struct.pack(">I", 1),
    struct.pack(">BxxxI", 1, MAX_FRAME + 1),
], ids=["unknown stream", "padding", "too long"])
def test_a_bad_frame_header_closes_the_stream(header, logged):
    protocol, transport, events, _ = make(tty=False)
    protocol.dataReceived(UPGRADED + frame(1, b"good") + header + b"x")
    assert events[2:] == [("data", 1, b"good")]
    assert transport.disconnected
    protocol.dataReceived(frame(1, b"after"))
    assert events[2:] == [("data", 1, b"good")]
    assert [e["log_format"] for e in logged if e.get("log_level").name == "error"] == [
        "the stream of exec {exec_id} is broken ({error}): closing it"]
    reason = Failure(ConnectionLost())
    protocol.connectionLost(reason)
    assert events[-1] == ("closed", reason)


def test_the_demultiplexer_keeps_nothing_after_a_bad_header():
    demux = Demultiplexer()
    assert list(demux.feed(frame(2, b"ab")[:9])) == []
    assert list(demux.feed(b"b")) == [(2, b"ab")]
    with pytest.raises(DemultiplexError):
        list(demux.feed(b"\x09" + b"\x00" * 7 + b"y" * 100))
    assert demux._buffer == bytearray()


def test_resizes_are_coalesced_and_the_last_size_wins():
    protocol, transport, events, resizes = make()
    protocol.dataReceived(UPGRADED)
    protocol.resize(80, 24)
    protocol.resize(90, 30)
    protocol.resize(100, 40)
    assert resizes.calls == [("exec1", 80, 24)]
    resizes.answer()
    assert resizes.calls == [("exec1", 80, 24), ("exec1", 100, 40)]
    resizes.answer()
    assert resizes.pending == []
    protocol.resize(120, 50)
    assert resizes.calls[-1] == ("exec1", 120, 50)


def test_a_failed_resize_does_not_stop_the_next(logged):
    protocol, transport, events, resizes = make()
    protocol.dataReceived(UPGRADED)
    protocol.resize(80, 24)
    protocol.resize(100, 40)
    resizes.answer(DockerError("exec not running"))
    assert resizes.calls[-1] == ("exec1", 100, 40)
    assert [e["log_format"] for e in logged if "resize" in e.get("log_format", "")] == [
        "resize of exec {exec_id} to {cols}x{rows} failed: {error}"]


def test_no_resize_after_the_end():
    protocol, transport, events, resizes = make()
    protocol.dataReceived(UPGRADED)
    protocol.resize(80, 24)
    protocol.resize(100, 40)
    protocol.connectionLost(Failure(ConnectionDone()))
    resizes.answer()
    assert resizes.calls == [("exec1", 80, 24)]
