"""
Clients of capsule in memory, shared by the unit tests: an HTTP response
parsed from the bytes a Site wrote (as L{tests.support.httpclient} parses
it, with its body as JSON), and Autobahn's own WebSocket client linked to
the real server protocol over Twisted's in-memory transports
(twisted.test.iosim), with the fake engine and a Clock that is also txaio's
loop, where Autobahn schedules its timers (handshake, close, keepalive).

The fixtures (C{clock}, C{docker}, C{manager}) are imported by the modules
that use them.
"""

from __future__ import annotations

import json

import pytest
import txaio
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.test import iosim

from capsule.core.spec import ContainerSpec
from capsule.core.protocol import BINARY_SUBPROTOCOL
from capsule.sessions.manager import SessionManager
from capsule.sessions.session import SessionConfig
from tests.support.fakes import FakeDockerAPI
from tests.support.httpclient import Headers, parse

HOST = "localhost:3001"
SERVER_ADDRESS = IPv4Address("TCP", "127.0.0.1", 3001)
CLIENT_ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)
SPEC = ContainerSpec(image="capsule-runtime:latest", memory="1g", cpus=1, pids=64)


def parse_response(raw: bytes) -> tuple[int, Headers, object]:
    """
    The status, headers and JSON body (None for an empty one) of the HTTP
    response C{raw}.
    """
    response = parse(raw)
    return response.status, response.headers, response.json()


@pytest.fixture
def clock():
    # Autobahn schedules its timers (handshake, close, keepalive) on txaio's
    # loop: make that the same Clock.
    clock = Clock()
    previous, txaio.config.loop = txaio.config.loop, clock
    yield clock
    txaio.config.loop = previous


@pytest.fixture
def docker():
    return FakeDockerAPI()


def make_manager(docker, clock, **config) -> SessionManager:
    """
    A session manager of C{SPEC} on C{docker}, with a 64 KiB replay buffer
    unless C{config} says otherwise.
    """
    config = {"replay_bytes": 64 * 1024, **config}
    return SessionManager(docker, clock, SessionConfig(spec=SPEC, instance="t", grace=60,
                                                       **config))


@pytest.fixture
def manager(docker, clock):
    return make_manager(docker, clock)


class RecordingClientProtocol(WebSocketClientProtocol):
    """
    Autobahn's client, recording every message (text as JSON, binary as
    bytes) and how the connection closed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.raw: list[tuple[bytes, bool]] = []
        self.closed: tuple[bool, int | None, str | None] | None = None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.raw.append((bytes(payload), isBinary))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed = (wasClean, code, reason)


class Link:
    """
    One client connected to the server through an in-memory pump.
    """

    def __init__(self, clock: Clock, factory, query: str = "", binary: bool = False,
                 origin: str | None = None, headers: dict[str, str] | None = None) -> None:
        url = f"ws://{HOST}/ws" + (f"?{query}" if query else "")
        client_factory = WebSocketClientFactory(
            url, origin=origin, protocols=[BINARY_SUBPROTOCOL] if binary else None,
            headers=headers)
        client_factory.protocol = RecordingClientProtocol
        self.client: RecordingClientProtocol = client_factory.buildProtocol(SERVER_ADDRESS)
        self.server = factory.buildProtocol(CLIENT_ADDRESS)
        self.pump = iosim.connect(
            self.server, iosim.FakeTransport(self.server, True, SERVER_ADDRESS, CLIENT_ADDRESS),
            self.client, iosim.FakeTransport(self.client, False, CLIENT_ADDRESS, SERVER_ADDRESS),
            clock=clock)
        self._seen = 0

    def flush(self) -> None:
        self.pump.flush()

    def send(self, message: dict) -> None:
        self.send_raw(json.dumps(message).encode())

    def send_raw(self, payload: bytes, binary: bool = False) -> None:
        self.client.sendMessage(payload, isBinary=binary)
        self.flush()

    def close(self) -> None:
        self.client.sendClose(1000)
        self.flush()

    @property
    def messages(self) -> list:
        """
        Every message so far: text frames as JSON, binary frames as bytes.
        """
        return [payload if binary else json.loads(payload) for payload, binary in self.client.raw]

    def new(self) -> list:
        """
        The messages that came since the last call.
        """
        messages = self.messages
        fresh, self._seen = messages[self._seen:], len(messages)
        return fresh

    @property
    def is_open(self) -> bool:
        return (self.client.state == WebSocketProtocol.STATE_OPEN
                and self.server.state == WebSocketProtocol.STATE_OPEN)

    def still_open(self) -> None:
        """
        Assert that the connection is open and answers.
        """
        assert self.is_open and self.client.closed is None
        self.send({"type": "ping"})
        assert self.new() == [{"type": "pong"}]
