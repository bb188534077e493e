"""
The WebSocket endpoint in memory: Autobahn's own client talks to the real
CapsuleServerProtocol over Twisted's in-memory transports (twisted.test.iosim),
and the real SessionManager drives the fake engine's execs.  Time is a Clock,
for capsule and for Autobahn's timers alike (txaio's loop); the origin check
is exercised with a raw upgrade request.  The client: L{tests.in_memory}.
"""

from __future__ import annotations

import base64
import json
import uuid
from unittest.mock import ANY

import pytest
from twisted.test import iosim

from capsule.core.protocol import BINARY_SUBPROTOCOL
from capsule.web.websocket_factory import CapsuleServerFactory
from capsule.web.wire import BinaryWire, JsonWire
from tests.support.httpclient import request_bytes, upgrade_headers

from capsule.sessions.manager import SessionManager
from capsule.sessions.session import SessionConfig
from .in_memory import (  # noqa: F401 (fixtures)
    CLIENT_ADDRESS, HOST, SERVER_ADDRESS, SPEC, Link, clock, docker, manager)

MAX_MESSAGE = 1024
WINDOW = 2048
# The most output bytes a JSON frame carries within MAX_MESSAGE: base64 of
# them plus {"type":"output","data":""}.
JSON_CHUNK = (MAX_MESSAGE - 27) // 4 * 3


@pytest.fixture
def factory(manager, clock):
    return CapsuleServerFactory(manager, clock, max_message_size=MAX_MESSAGE,
                                flow_window=WINDOW)


@pytest.fixture
def connect(clock, factory):
    def connect(query: str = "", binary: bool = False, origin: str | None = None) -> Link:
        return Link(clock, factory, query, binary, origin)
    return connect


def start(link: Link, cols: int = 80, rows: int = 24) -> str:
    """
    Start a new session through C{link}; return its id.
    """
    link.send({"type": "resize", "cols": cols, "rows": rows})
    connected = link.new()
    assert len(connected) == 1 and connected[0]["type"] == "connected"
    return connected[0]["session_id"]


def outputs(messages: list) -> bytes:
    return b"".join(base64.b64decode(m["data"]) for m in messages if m["type"] == "output")


# -- a new session ---------------------------------------------------------------------

def test_a_new_json_session_starts_at_the_first_resize(connect, manager, docker):
    link = connect()
    assert link.is_open and link.messages == [] and manager.sessions == {}
    assert isinstance(link.server._wire, JsonWire)

    link.send({"type": "resize", "cols": 100, "rows": 30})
    [session] = manager.sessions.values()
    assert link.new() == [{"type": "connected", "grace": 60, "kept": False, "profile": "shell", "profile": "shell",
                           "session_id": session.id, "resumed": False,
                           "replay": 0}]
    assert session.status() == "running" and session.client is link.server
    [process] = docker.processes
    assert process.resizes == [(100, 30)]

    link.send({"type": "input", "data": "ls -la\r"})
    link.send({"type": "terminal_input", "data": "\u00e9\r"})
    link.send({"type": "resize", "cols": 120, "rows": 40})
    assert process.written == [b"ls -la\r", "\u00e9\r".encode()]
    assert process.resizes == [(100, 30), (120, 40)]
    assert link.new() == []


@pytest.mark.parametrize("binary", [False, True])
def test_connected_says_the_grace_period_and_that_nothing_keeps_the_session(
        docker, clock, binary):
    """
    A page says before its tab is closed what becomes of the session: the
    grace period is the server's (--grace), and nothing keeps the session
    past it.
    """
    manager = SessionManager(docker, clock, SessionConfig(spec=SPEC, instance="t", grace=7.5))
    factory = CapsuleServerFactory(manager, clock, max_message_size=MAX_MESSAGE,
                                   flow_window=WINDOW)
    link = Link(clock, factory, "", binary)
    link.send({"type": "resize", "cols": 80, "rows": 24})
    [connected] = link.new()
    assert connected["type"] == "connected"
    assert (connected["grace"], connected["kept"]) == (7.5, False)


def test_a_new_binary_session_says_offset_and_window(connect, manager, docker):
    link = connect(binary=True)
    assert isinstance(link.server._wire, BinaryWire)
    assert link.client.websocket_protocol_in_use == BINARY_SUBPROTOCOL

    link.send({"type": "resize", "cols": 80, "rows": 24})
    [session] = manager.sessions.values()
    assert link.new() == [{"type": "connected", "grace": 60, "kept": False, "profile": "shell", "profile": "shell",
                           "session_id": session.id, "resumed": False,
                           "offset": 0, "window": WINDOW, "replay": 0}]
    [process] = docker.processes
    link.send_raw(b"\x03\xff\x00raw", binary=True)
    link.send({"type": "input", "data": "echo\r"})
    assert process.written == [b"\x03\xff\x00raw", b"echo\r"]
    assert link.new() == []


def test_a_failed_start_is_an_error_and_close_4503(connect, manager, docker):
    docker.reachable = False
    link = connect()
    link.send({"type": "resize", "cols": 80, "rows": 24})
    [error] = link.messages
    assert error["type"] == "error" and error["code"] == "docker_unavailable"
    assert link.client.closed[1] == 4503
    assert manager.sessions == {}


# -- output --------------------------------------------------------------------------

def test_json_output_is_base64_in_frames_that_fit_the_message_size(connect, docker):
    link = connect()
    start(link)
    data = bytes(range(256)) * 8
    docker.processes[0].emit(data)
    link.flush()
    frames = link.client.raw[1:]
    assert [binary for _, binary in frames] == [False, False, False]
    assert all(len(payload) <= MAX_MESSAGE for payload, _ in frames)
    messages = link.new()
    assert [m["type"] for m in messages] == ["output"] * 3
    assert [len(base64.b64decode(m["data"])) for m in messages] == [
        JSON_CHUNK, JSON_CHUNK, len(data) - 2 * JSON_CHUNK]
    assert outputs(messages) == data


def test_binary_output_is_raw_frames_that_fit_the_message_size(connect, docker):
    link = connect(binary=True)
    start(link)
    data = bytes(range(256)) * 10
    docker.processes[0].emit(data)
    link.flush()
    assert link.new() == [data[:1024], data[1024:2048], data[2048:]]
    assert all(binary for _, binary in link.client.raw[1:])


def test_a_shell_that_exits_is_an_exit_frame_and_close_1000(connect, manager, docker):
    link = connect()
    session_id = start(link)
    docker.processes[0].exit(3)
    link.flush()
    assert link.new() == [{"type": "exit", "exit_code": 3,
                           "message": "the shell exited with code 3"}]
    assert link.client.closed == (True, 1000, "the shell exited with code 3")
    assert session_id not in manager.sessions


# -- reconnecting ------------------------------------------------------------------------

def test_a_closing_connection_detaches_without_stopping_the_shell(connect, manager, docker,
                                                                  factory):
    link = connect(binary=True)
    session_id = start(link)
    session = manager.sessions[session_id]
    process = docker.processes[0]
    # Paused by a full window when the client goes: the work must go on.
    process.emit(b"x" * WINDOW)
    link.flush()
    assert process.paused
    link.close()
    assert link.client.closed == (True, 1000, None)
    assert session.status() == "detached" and session.client is None
    assert process.connected and not process.paused
    assert manager.sessions[session_id] is session and docker.removed == []
    assert factory.connections == set()


def test_a_closing_transport_stopping_its_producer_does_not_stop_the_shell(connect, docker):
    # A TCP transport that loses its connection calls stopProducing on the
    # producer registered with it.
    link = connect()
    start(link)
    process = docker.processes[0]
    gate = link.server.transport.producer
    gate.pauseProducing()
    assert process.paused
    gate.stopProducing()
    assert process.connected and not process.paused


def test_reconnect_with_session_id_replays_what_was_missed(connect, manager, docker, clock):
    first = connect()
    session_id = start(first)
    process = docker.processes[0]
    process.emit(b"one ")
    first.flush()
    assert outputs(first.new()) == b"one "
    first.close()
    left = clock.seconds()
    clock.advance(12.5)
    process.emit(b"two ")

    second = connect(f"session_id={session_id}")
    messages = second.new()
    # What it printed while no client was attached (not recorded here: no --record).
    assert messages[0].pop("away") == {"since": left, "seconds": 12.5, "printed": 4,
                                       "recorded": False}
    assert messages[0] == {"type": "connected", "grace": 60, "kept": False, "profile": "shell", "profile": "shell",
                           "session_id": session_id, "resumed": True,
                           "replay": 4}
    assert outputs(messages[1:]) == b"two " and len(messages) == 2
    session = manager.sessions[session_id]
    assert session.status() == "running" and session.client is second.server
    second.send({"type": "input", "data": "x"})
    assert process.written == [b"x"]
    process.emit(b"three")
    second.flush()
    assert outputs(second.new()) == b"three"
    assert docker.processes == [process]


def test_reconnect_with_an_offset_resumes_exactly_there(connect, manager, docker):
    first = connect(binary=True)
    session_id = start(first)
    process = docker.processes[0]
    process.emit(b"hello world")
    first.flush()
    assert first.new() == [b"hello world"]
    first.close()
    process.emit(b"!")

    # The client had drawn only "hello " when it went.
    second = connect(f"session_id={session_id}&offset=6", binary=True)
    assert second.new() == [
        {"type": "connected", "grace": 60, "kept": False, "profile": "shell", "profile": "shell",
         "session_id": session_id, "resumed": True, "offset": 6,
         "window": WINDOW, "replay": 6,
         "away": {"since": ANY, "seconds": 0.0, "printed": 1, "recorded": False}},
        b"world!"]
    process.emit(b"?")
    second.flush()
    assert second.new() == [b"?"]
    # It has been sent up to offset 13, exactly: no more.
    second.send({"type": "ack", "offset": 13})
    assert second.new() == []
    second.send({"type": "ack", "offset": 14})
    assert [m["code"] for m in second.new()] == ["bad_ack"]


def test_reconnect_without_an_offset_resumes_after_what_was_sent(connect, docker):
    first = connect(binary=True)
    session_id = start(first)
    process = docker.processes[0]
    process.emit(b"hello world")
    first.flush()
    first.close()
    process.emit(b"!")
    second = connect(f"session_id={session_id}", binary=True)
    assert second.new() == [
        {"type": "connected", "grace": 60, "kept": False, "profile": "shell", "profile": "shell",
         "session_id": session_id, "resumed": True, "offset": 11,
         "window": WINDOW, "replay": 1,
         "away": {"since": ANY, "seconds": 0.0, "printed": 1, "recorded": False}},
        b"!"]


def test_output_still_gathered_when_the_client_left_is_replayed(connect, docker):
    first = connect(binary=True)
    session_id = start(first)
    process = docker.processes[0]
    # A flood: past 16 KiB within the coalescing window, output is gathered.
    for _ in range(16):
        process.emit(b"a" * 1000)
    process.emit(b"a" * 384)
    process.emit(b"b" * 100)
    first.flush()
    assert b"".join(first.new()) == b"a" * 16 * 1024
    first.close()
    second = connect(f"session_id={session_id}", binary=True)
    assert second.new() == [
        {"type": "connected", "grace": 60, "kept": False, "profile": "shell", "profile": "shell",
         "session_id": session_id, "resumed": True, "offset": 16 * 1024,
         "window": WINDOW, "replay": 100,
         "away": {"since": ANY, "seconds": 0.0, "printed": 100, "recorded": False}},
        b"b" * 100]


def test_a_new_connection_takes_the_session_over(connect, manager, docker):
    first = connect()
    session_id = start(first)
    process = docker.processes[0]
    second = connect(f"session_id={session_id}")
    first.flush()

    assert first.new() == [{"type": "error", "code": "taken_over",
                            "message": "this session was opened in another window"}]
    assert first.client.closed == (True, 4409, "this session was opened in another window")
    assert second.new() == [{"type": "connected", "grace": 60, "kept": False, "profile": "shell", "profile": "shell",
                             "session_id": session_id, "resumed": True,
                             "replay": 0}]
    session = manager.sessions[session_id]
    # The old connection's close did not detach the new one.
    assert session.status() == "running" and session.client is second.server
    second.send({"type": "input", "data": "y"})
    process.emit(b"z")
    second.flush()
    assert process.written == [b"y"] and outputs(second.new()) == b"z"
    second.still_open()


@pytest.mark.parametrize("held_by", ["window", "transport"])
def test_a_takeover_resumes_an_exec_the_old_connection_paused(connect, docker, held_by):
    first = connect(binary=True)
    session_id = start(first)
    process = docker.processes[0]
    if held_by == "window":
        process.emit(b"x" * WINDOW)
        first.flush()
    else:
        # The old connection is a dead socket whose buffer filled up.
        first.server.transport.producer.pauseProducing()
    assert process.paused

    second = connect(f"session_id={session_id}", binary=True)
    first.flush()
    assert first.client.closed[1] == 4409
    # The new client has been sent nothing it has not acknowledged.
    assert second.new() == [{"type": "connected", "grace": 60, "kept": False, "profile": "shell", "profile": "shell",
                             "session_id": session_id, "resumed": True,
                             "offset": WINDOW if held_by == "window" else 0,
                             "window": WINDOW, "replay": 0}]
    assert not process.paused


def test_an_unknown_session_is_refused_with_4404(connect, manager):
    unknown = str(uuid.uuid4())
    link = connect(f"session_id={unknown}")
    [error] = link.messages
    assert error["type"] == "error" and error["code"] == "session_not_found"
    assert unknown in error["message"]
    assert link.client.closed[:2] == (True, 4404)
    assert manager.sessions == {}


@pytest.mark.parametrize("query, code", [
    ("session_id=not-a-uuid", "invalid_session_id"),
    ("session_id=../../etc", "invalid_session_id"),
    (f"session_id={uuid.UUID(int=1)}&offset=-1", "invalid_offset"),
    (f"session_id={uuid.UUID(int=1)}&offset=x", "invalid_offset"),
])
def test_an_invalid_session_id_or_offset_is_refused_with_4400(connect, manager, query, code):
    link = connect(query, binary=True)
    [error] = link.messages
    assert error["type"] == "error" and error["code"] == code
    assert link.client.closed[:2] == (True, 4400)
    assert manager.sessions == {}


def test_a_server_restart_tells_the_client_to_come_back_with_4001(connect, manager, docker):
    link = connect()
    session_id = start(link)
    manager.shutdown()
    link.flush()
    [error] = link.new()
    assert error["type"] == "error" and error["code"] == "restarting"
    assert link.client.closed[:2] == (True, 4001)
    # The shell lives on in its container for the next run.
    assert docker.removed == [] and session_id not in manager.sessions


# -- flow control ----------------------------------------------------------------------

def test_an_ack_beyond_what_was_sent_is_an_error(connect, docker):
    link = connect(binary=True)
    start(link)
    docker.processes[0].emit(b"12345")
    link.flush()
    assert link.new() == [b"12345"]
    link.send({"type": "ack", "offset": 6})
    assert link.new() == [{"type": "error", "code": "bad_ack",
                           "message": "ack of offset 6, beyond the 5 bytes sent"}]
    link.send({"type": "ack", "offset": "5"})
    assert [m["code"] for m in link.new()] == ["bad_ack"]
    link.send({"type": "ack", "offset": 5})
    assert link.new() == []
    link.still_open()


def test_the_window_pauses_the_exec_until_acks_come(connect, docker):
    link = connect(binary=True)
    start(link)
    process = docker.processes[0]
    process.emit(b"a" * (WINDOW - 1))
    link.flush()
    assert not process.paused
    process.emit(b"b")
    link.flush()
    assert process.paused
    link.send({"type": "ack", "offset": 1})
    assert not process.paused
    process.emit(b"c")
    link.flush()
    assert process.paused
    # An old ack changes nothing.
    link.send({"type": "ack", "offset": 0})
    assert process.paused
    link.send({"type": "ack", "offset": WINDOW + 1})
    assert not process.paused
    assert b"".join(link.new()) == b"a" * (WINDOW - 1) + b"bc"


def test_the_window_and_a_full_transport_each_hold_the_exec(connect, docker):
    link = connect(binary=True)
    start(link)
    process = docker.processes[0]
    gate = link.server.transport.producer
    gate.pauseProducing()
    assert process.paused
    process.emit(b"x" * WINDOW)
    link.flush()
    gate.resumeProducing()
    assert process.paused, "the window still holds it"
    link.send({"type": "ack", "offset": WINDOW})
    assert not process.paused


def test_json_clients_have_no_window(connect, docker):
    link = connect()
    start(link)
    process = docker.processes[0]
    process.emit(b"x" * (3 * WINDOW))
    link.flush()
    assert not process.paused
    assert len(outputs(link.new())) == 3 * WINDOW
    link.send({"type": "ack", "offset": 1})
    assert [m["code"] for m in link.new()] == ["unknown_type"]


# -- bad frames --------------------------------------------------------------------------

def test_input_sent_on_while_the_shell_does_not_read_closes_with_4008(connect, manager, docker):
    link = connect(binary=True)
    start(link)
    link.new()
    docker.processes[0].input_producer.pauseProducing()
    chunk = MAX_MESSAGE
    for _ in range(manager.config.max_input_overrun // chunk):
        link.send_raw(b"x" * chunk, binary=True)
    link.still_open()
    link.send_raw(b"y", binary=True)
    errors = [m for m in link.new() if m.get("type") == "error"]
    assert [e["code"] for e in errors] == ["input_overrun"]
    assert link.client.closed[:2] == (True, 4008)
    # The session lives on for its next connection.
    assert len(manager.sessions) == 1


def test_input_before_the_first_resize_is_refused(connect, manager, docker):
    link = connect(binary=True)
    link.send({"type": "input", "data": "ls\r"})
    link.send_raw(b"ls\r", binary=True)
    assert [(m["type"], m["code"]) for m in link.new()] == [("error", "not_started")] * 2
    assert manager.sessions == {} and docker.processes == []
    link.still_open()
    start(link)
    link.send({"type": "input", "data": "ls\r"})
    assert docker.processes[0].written == [b"ls\r"]


@pytest.mark.parametrize("payload, binary, code", [
    (b"{not json", False, "malformed_json"),
    (b"[" * 100_000, False, "malformed_json"),
    (b"{" + b'"a":{' * 50_000, False, "malformed_json"),
    (b'{"type": "input", "data": "\\ud800"}', False, "bad_input"),
    (b'{"type": "input", "data": 5}', False, "bad_input"),
    (b"[1, 2]", False, "bad_message"),
    (b'{"data": "x"}', False, "bad_message"),
    (b'{"type": "launch"}', False, "unknown_type"),
    (b'{"type": "resize", "cols": 0, "rows": 24}', False, "bad_resize"),
    (b'{"type": "resize", "cols": true, "rows": 24}', False, "bad_resize"),
    (b"\x00\x01", True, "binary_frame"),
], ids=["malformed", "deep-list", "deep-object", "lone-surrogate", "input-not-text",
        "not-an-object", "no-type", "unknown-type", "zero-cols", "bool-cols", "binary-frame"])
def test_a_bad_frame_is_an_error_and_the_connection_stays(clock, manager, docker, payload,
                                                          binary, code):
    # The size limit of the default (256 KiB), so that deep nesting fits.
    link = Link(clock, CapsuleServerFactory(manager, clock))
    session_id = start(link, 90, 30)
    link.send_raw(payload, binary=binary)
    [error] = link.new()
    assert error["type"] == "error" and error["code"] == code
    link.still_open()
    process = docker.processes[0]
    assert process.written == [] and process.resizes == [(90, 30)]
    assert manager.sessions[session_id].status() == "running"


def test_a_message_over_the_size_limit_closes_with_1009(connect, docker):
    link = connect()
    start(link)
    link.send({"type": "input", "data": "x" * MAX_MESSAGE})
    assert link.client.closed[:2] == (True, 1009)
    assert docker.processes[0].written == []


# -- notices ---------------------------------------------------------------------------

def test_a_notice_is_a_text_frame_outside_the_offsets(connect, manager, docker, clock):
    link = connect(binary=True)
    session_id = start(link)
    session = manager.sessions[session_id]
    first = docker.processes[0]
    first.emit(b"abc")
    link.flush()
    assert link.new() == [b"abc"]

    # The engine goes away under the shell's stream, and comes back.
    docker.reachable = False
    first.end(None)
    link.flush()
    [away] = link.new()
    assert away["type"] == "notice" and away["code"] == "engine_away"
    assert session.status() == "interrupted"
    docker.reachable = True
    docker.keeper_output[session.container_id] = (0, 3)
    clock.advance(0.5)
    link.flush()
    [back] = link.new()
    assert back["type"] == "notice" and back["code"] == "engine_back"
    assert session.status() == "running"
    second = docker.processes[1]
    assert "-o" in second.argv and second.argv[second.argv.index("-o") + 1] == "3"
    second.emit(b"def")
    link.flush()
    assert link.new() == [b"def"]
    assert [binary for _, binary in link.client.raw] == [False, True, False, False, True]

    # Offsets counted only output: 6 bytes were sent, not a byte more.
    link.send({"type": "ack", "offset": 6})
    assert link.new() == []
    link.send({"type": "ack", "offset": 7})
    assert [m["code"] for m in link.new()] == ["bad_ack"]
    link.close()
    again = connect(f"session_id={session_id}&offset=3", binary=True)
    assert again.new() == [
        {"type": "connected", "grace": 60, "kept": False, "profile": "shell", "profile": "shell",
         "session_id": session_id, "resumed": True, "offset": 3,
         "window": WINDOW, "replay": 3},
        b"def"]


def test_a_notice_reaches_a_json_client_as_json(connect, manager, docker):
    link = connect()
    start(link)
    docker.reachable = False
    docker.processes[0].end(None)
    link.flush()
    [notice] = link.new()
    assert notice["type"] == "notice" and notice["code"] == "engine_away"
    assert notice["message"] == (
        "the connection to the shell was lost (cannot reach the Docker engine at"
        " fake://docker)")
    assert [binary for _, binary in link.client.raw] == [False, False]
    link.still_open()


# -- origins ---------------------------------------------------------------------------

def handshake(factory, origin: str | None) -> tuple[int, bytes, iosim.FakeTransport, object]:
    """
    Send a browser's upgrade request; return the answer's status code, the
    answer, the server's transport and the server.
    """
    server = factory.buildProtocol(CLIENT_ADDRESS)
    transport = iosim.FakeTransport(server, True, SERVER_ADDRESS, CLIENT_ADDRESS)
    server.makeConnection(transport)
    # RFC 6455's example key; its accept is s3pPLMBiTxaQ9kYGzzhZRbK+xOo=.
    server.dataReceived(request_bytes("GET", "/ws", upgrade_headers(origin), host=HOST,
                                      close=False))
    answer = transport.getOutBuffer()
    return int(answer.split(b" ", 2)[1]), answer, transport, server


@pytest.mark.parametrize("origin, allowed, status", [
    (None, (), 101),
    (f"http://{HOST}", (), 101),
    (f"https://{HOST.upper()}/", (), 101),
    ("https://evil.example", (), 403),
    ("http://localhost:3002", (), 403),
    ("https://proxy.example", ("https://proxy.example/",), 101),
    ("https://evil.example", ("https://proxy.example",), 403),
    ("https://evil.example", ("*",), 101),
    # A sandboxed or file:// page: Autobahn refuses it before capsule is asked.
    ("null", ("*",), 400),
])
def test_origins(manager, clock, origin, allowed, status):
    factory = CapsuleServerFactory(manager, clock, allowed_origins=allowed)
    code, answer, transport, server = handshake(factory, origin)
    assert code == status
    if status == 101:
        assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in answer
        assert factory.connections == {server} and not transport.disconnecting
    else:
        assert factory.connections == set() and transport.disconnecting
    if status == 403:
        assert answer.startswith(f"HTTP/1.1 403 origin {origin} is not allowed\r\n".encode())
    assert manager.sessions == {}
