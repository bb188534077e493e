"""
How a session picks its shell's stream (capsule.engine.keeper_direct): over
TCP to its keeper where its container has an address, through a relay exec
where it has none, and through the relay exec whenever the direct path
fails (the start exec, the connection, the keeper's answer), in memory.
"""

from __future__ import annotations

import struct

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from capsule.core.keeper import (FrameReader, SECRET_LABEL, encode_hello, encode_secret,
                                 keeper_start_argv, parse_secret)
from capsule.core.spec import ContainerSpec
from capsule.engine.keeper_direct import DirectKeeper
from capsule.sessions.manager import SessionManager
from capsule.sessions.session import SessionConfig
from tests.support.fakes import FakeDockerAPI, RecordingClient

SPEC = ContainerSpec(image="capsule-runtime:latest", memory="1g", cpus=1, pids=64)
PREAMBLE = b"\x1b_capsule-keeper;offset=0;dropped=0\x1b\\"


def frame(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack(">I", len(payload)) + payload


class Network:
    """
    What capsule's TCP connections meet: C{connect(address, stream)} as
    L{DirectKeeper} calls it, each stream on a L{StringTransport}.
    """

    def __init__(self) -> None:
        self.refuse = False
        self.streams: list = []
        self.addresses: list[str] = []

    def connect(self, address, stream):
        self.addresses.append(address)
        if self.refuse:
            return fail(ConnectionRefusedError())
        transport = StringTransport()
        stream.makeConnection(transport)
        self.streams.append((stream, transport))
        return succeed(stream)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def docker():
    docker = FakeDockerAPI()
    docker.default_address = "172.30.0.5"
    return docker


@pytest.fixture
def network():
    return Network()


def make_manager(docker, clock, network, network_mode=None, connect=None):
    spec = SPEC if network_mode is None else ContainerSpec(
        image=SPEC.image, memory="1g", cpus=1, pids=64, network=network_mode)
    direct = DirectKeeper(clock, docker, connect=connect or network.connect)
    return SessionManager(docker, clock, SessionConfig(spec=spec, instance="t", grace=60,
                                                       replay_bytes=1024), direct=direct)


def start_ok(docker):
    "The keeper's start exec succeeds, whatever it is asked."
    def started(stdin):
        return b"", b"", 0
    docker.commands[tuple(keeper_start_argv(("bash", "-l"), 1024))] = started


def test_a_session_with_an_address_attaches_over_tcp(docker, clock, network):
    start_ok(docker)
    manager = make_manager(docker, clock, network)
    client = RecordingClient()
    session = manager.create(client, 100, 30)
    container = docker.containers[session.container_id]
    secret = parse_secret(container["labels"][SECRET_LABEL])
    assert secret is not None and len(secret) == 32
    # The keeper was started with the secret on its stdin (not in its argv or env).
    [run] = docker.commands_run
    assert run["argv"] == tuple(keeper_start_argv(("bash", "-l"), 1024))
    assert run["stdin"] == encode_secret(secret)
    assert secret.hex() not in " ".join(run["argv"]) + repr(run["env"])
    # Then capsule connected: the secret, then the hello from offset 0.
    assert network.addresses == ["172.30.0.5"]
    stream, transport = network.streams[0]
    assert transport.value() == encode_secret(secret) + encode_hello(0)
    assert docker.processes == []  # no relay exec
    transport.clear()
    stream.dataReceived(frame(b"o", PREAMBLE) + frame(b"o", b"$ "))
    assert client.events[0] == ("started", session.id, False)
    assert client.output == b"$ "
    # Input and sizes go over the same connection, as the keeper's frames.
    assert FrameReader().feed(transport.value()) == [(b"w", struct.pack(">HH", 100, 30))]
    transport.clear()
    manager.write(session, b"ls\r")
    assert FrameReader().feed(transport.value()) == [(b"i", b"ls\r")]
    # The shell's status ends the session as through a relay.
    stream.dataReceived(frame(b"x", struct.pack(">I", 3)))
    stream.connectionLost(Failure(ConnectionDone()))
    assert client.events[-1] == ("ended", 3, "the shell exited with code 3")


def test_backpressure_pauses_the_connection(docker, clock, network):
    start_ok(docker)
    manager = make_manager(docker, clock, network)
    session = manager.create(RecordingClient(), 80, 24)
    stream, transport = network.streams[0]
    stream.dataReceived(frame(b"o", PREAMBLE))
    stream.pauseProducing()
    assert transport.producerState == "paused"
    stream.resumeProducing()
    assert transport.producerState == "producing"
    assert session.status() == "running"


@pytest.mark.parametrize("mode", ["none", "host", "container:other"])
def test_no_address_of_its_own_takes_the_relay_exec(docker, clock, network, mode):
    manager = make_manager(docker, clock, network, network_mode=mode)
    session = manager.create(RecordingClient(), 80, 24)
    assert SECRET_LABEL not in docker.containers[session.container_id]["labels"]
    assert network.addresses == [] and docker.commands_run == []
    assert docker.processes[0].argv[:2] == ("capsule-keeper", "-r")


def test_no_address_takes_the_relay_exec(docker, clock, network):
    start_ok(docker)
    docker.default_address = None
    manager = make_manager(docker, clock, network)
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    assert network.addresses == []
    relayed(docker, client, session)


def relayed(docker, client, session) -> None:
    "The session runs on a relay exec, as if there were no direct path."
    [process] = docker.processes
    assert process.argv[:2] == ("capsule-keeper", "-r")
    process.emit(b"$ ")  # after the fake relay's preamble
    assert client.events[0] == ("started", session.id, False)
    assert client.output == b"$ "


def test_a_start_exec_that_fails_falls_back_to_the_relay(docker, clock, network):
    # An older image: its keeper has no -d (the usage, status 2).
    docker.commands[tuple(keeper_start_argv(("bash", "-l"), 1024))] = (
        lambda stdin: (b"", b"usage: capsule-keeper ...", 2))
    manager = make_manager(docker, clock, network)
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    assert network.addresses == []
    relayed(docker, client, session)


def test_a_refused_connection_falls_back_to_the_relay(docker, clock, network):
    start_ok(docker)
    network.refuse = True
    manager = make_manager(docker, clock, network)
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    relayed(docker, client, session)


def test_a_keeper_that_closes_before_answering_falls_back(docker, clock, network):
    start_ok(docker)
    manager = make_manager(docker, clock, network)
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    stream, _ = network.streams[0]
    stream.connectionLost(Failure(ConnectionLost()))  # a wrong secret: closed
    relayed(docker, client, session)


def test_a_keeper_that_does_not_answer_falls_back(docker, clock, network):
    start_ok(docker)
    manager = make_manager(docker, clock, network)
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    _, transport = network.streams[0]
    assert docker.processes == []
    clock.advance(5)
    assert transport.disconnecting or transport.disconnected or docker.processes
    relayed(docker, client, session)


def test_garbage_from_the_keepers_port_ends_the_session(docker, clock, network):
    """
    Whatever answers on the port is inside the container: its bytes are
    judged as a relay's are (a frame of an unknown type ends the session).
    """
    start_ok(docker)
    manager = make_manager(docker, clock, network)
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    stream, transport = network.streams[0]
    stream.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
    assert session.status() == "ended"
    assert client.events[-1][0] in ("ended", "failed")
    assert "malformed" in str(client.events[-1])


def test_addresses_that_never_answer_pause_the_direct_path(docker, clock, network):
    """
    capsule in a container on another network cannot reach its sessions:
    after three connections that got no answer in a row, sessions take the
    relay exec at once, for ten minutes, and then the direct path is tried
    again.
    """
    from twisted.internet.error import TimeoutError as NoAnswer
    start_ok(docker)

    def unanswered(address, stream):
        network.addresses.append(address)
        return fail(NoAnswer())

    manager = make_manager(docker, clock, network, connect=unanswered)
    for _ in range(3):
        manager.create(RecordingClient(), 80, 24)
    assert len(network.addresses) == 3 and len(docker.processes) == 3
    manager.create(RecordingClient(), 80, 24)
    assert len(network.addresses) == 3 and len(docker.processes) == 4
    assert len(docker.commands_run) == 3  # no keeper started for TCP either
    clock.advance(601)
    manager.create(RecordingClient(), 80, 24)
    assert len(network.addresses) == 4


def test_a_refused_connection_does_not_pause_the_direct_path(docker, clock, network):
    "A container whose keeper does not listen (restarted) says nothing of the others."
    start_ok(docker)
    network.refuse = True
    manager = make_manager(docker, clock, network)
    for _ in range(4):
        manager.create(RecordingClient(), 80, 24)
    assert len(network.addresses) == 4


def test_the_ports_a_keeper_names_over_tcp_reach_the_session(docker, clock, network):
    # The direct path's stream is the relay's for what the keeper says: its
    # P frames name the session's listening ports (once, a merge passed the
    # ports callback where the channels' options go, and they were lost).
    start_ok(docker)
    manager = make_manager(docker, clock, network)
    session = manager.create(RecordingClient(), 100, 30)
    stream, _ = network.streams[0]
    stream.dataReceived(frame(b"o", PREAMBLE) + frame(b"P", struct.pack(">HHH", 0, 3000, 8080)))
    assert session.listening_ports == (3000, 8080) and session.ports_known
