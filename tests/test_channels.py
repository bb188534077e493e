"""
Keeper channels in memory: their frames (capsule.core.channels), the
multiplexing and flow control of capsule's side (capsule.engine.channels),
and a session without a network whose stream carries them (the manager, the
shell's stream, the door's factory, the endpoint), against the in-memory
engine.
"""

from __future__ import annotations

import struct

from twisted.internet.error import (ConnectError, ConnectionDone, ConnectionLost,
                                    ConnectionRefusedError)
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from zope.interface import implementer

from capsule.core.channels import (CAPSULE_BIT, CHANNEL_ENV, CHANNEL_FRAMES, CHUNK, MAX_REASON,
                                   WINDOW, ChannelAddress, encode_data, encode_end,
                                   encode_fail, encode_grant, encode_open, reason_of)
from capsule.core.keeper import FrameReader, Preamble, PreambleReader
from capsule.core.spec import ContainerSpec
from capsule.engine.channels import (PAUSE_AT, ChannelMux, ChannelOptions,
                                     KeeperChannelEndpoint, TooManyChannels)
from capsule.sessions.manager import SessionManager
from capsule.sessions.session import SessionConfig
from tests.support.fakes import FakeDockerAPI, RecordingClient

SID = "0123456789abcdef0123456789abcdef"


def frames(data: bytes) -> list[tuple[bytes, int, bytes]]:
    reader = FrameReader()
    return [(kind, struct.unpack_from(">I", payload)[0], payload[4:])
            for kind, payload in reader.feed(data) if kind in CHANNEL_FRAMES]


# -- the frames ----------------------------------------------------------------


def test_frames_encode_and_data_is_cut_into_chunks():
    assert encode_open(CAPSULE_BIT | 1, 8080) == b"C\0\0\0\x06\x80\0\0\x01\x1f\x90"
    assert encode_grant(5, 1000) == b"G\0\0\0\x08\0\0\0\x05\0\0\x03\xe8"
    assert encode_end(5) == b"E\0\0\0\x04\0\0\0\x05"
    parts = frames(encode_data(9, b"x" * (2 * CHUNK + 3)))
    assert [(k, c, len(r)) for k, c, r in parts] == [(b"D", 9, CHUNK), (b"D", 9, CHUNK),
                                                    (b"D", 9, 3)]
    [(kind, channel, reason)] = frames(encode_fail(3, "é" * 500))
    assert kind == b"F" and len(reason) == MAX_REASON


def test_a_reason_from_the_keeper_is_fit_for_a_log_line():
    assert reason_of(b"\0\0\0\x01bad\x1b[31m\nline") == "bad?[31m?line"


def test_a_channels_address_names_its_session_and_has_no_host():
    from twisted.internet.address import IPv4Address
    from capsule.core.channels import channel_session
    address = ChannelAddress(SID, 7, 3180)
    assert channel_session(address) == SID
    assert channel_session(IPv4Address("TCP", "172.18.0.5", 40000)) is None
    assert not hasattr(address, "host")  # never taken for an IP address


def test_the_preamble_says_how_many_channels():
    reader = PreambleReader()
    preamble, rest = reader.feed(b"\x1b_capsule-keeper;offset=5;dropped=0;channels=32\x1b\\$ ")
    assert preamble == Preamble(5, 0, 32) and rest == b"$ "
    preamble, _ = PreambleReader().feed(b"\x1b_capsule-keeper;offset=5;dropped=0\x1b\\")
    assert preamble == Preamble(5, 0) and preamble.channels is None
    bad = PreambleReader()
    bad.feed(b"\x1b_capsule-keeper;offset=5;dropped=0;channels=123456\x1b\\")
    assert bad.missing


# -- the multiplexing, in memory ------------------------------------------------


class Wire:
    "What capsule sends the keeper."

    def __init__(self) -> None:
        self.data = bytearray()
        self._at = 0

    def __call__(self, data: bytes) -> None:
        self.data += data

    def new(self) -> list[tuple[bytes, int, bytes]]:
        sent = frames(bytes(self.data[self._at:]))
        self._at = len(self.data)
        return sent


class Recorder(Protocol):
    def __init__(self) -> None:
        self.received = bytearray()
        self.lost = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.lost = reason


@implementer(IHalfCloseableProtocol)
class HalfCloser(Recorder):
    read_ended = False

    def readConnectionLost(self) -> None:
        self.read_ended = True

    def writeConnectionLost(self) -> None:
        pass


@implementer(IPushProducer)
class Producer:
    def __init__(self) -> None:
        self.state = "producing"

    def pauseProducing(self) -> None:
        self.state = "paused"

    def resumeProducing(self) -> None:
        self.state = "producing"

    def stopProducing(self) -> None:
        self.state = "stopped"


def factory_of(kind=Recorder):
    f = Factory.forProtocol(kind)
    return f


def opened(mux, wire, port=8080, kind=Recorder):
    results = []
    mux.open(port, factory_of(kind)).addBoth(results.append)
    [(k, channel, rest)] = wire.new()
    assert k == b"C" and channel & CAPSULE_BIT and struct.unpack(">H", rest) == (port,)
    mux.received(b"A", struct.pack(">I", channel))
    [protocol] = results
    return protocol, channel


def test_an_open_channel_is_a_connected_protocol_naming_its_session():
    wire = Wire()
    mux = ChannelMux(SID, wire, 32)
    protocol, channel = opened(mux, wire)
    assert protocol.transport.getPeer() == ChannelAddress(SID, channel, 8080)
    mux.received(b"D", struct.pack(">I", channel) + b"hello")
    assert protocol.received == b"hello"
    assert wire.new() == [(b"G", channel, struct.pack(">I", 5))]
    protocol.transport.write(b"there")
    assert wire.new() == [(b"D", channel, b"there")]


def test_a_refused_port_fails_the_connect_with_the_keepers_reason():
    wire = Wire()
    mux = ChannelMux(SID, wire, 32)
    results = []
    mux.open(9, factory_of()).addErrback(results.append)
    [(_, channel, _)] = wire.new()
    mux.received(b"F", struct.pack(">I", channel) + b"connecting to 127.0.0.1:9: refused")
    [failure] = results
    assert failure.check(ConnectionRefusedError)
    assert "refused" in failure.getErrorMessage() and len(mux) == 0


def test_capsule_sends_no_more_than_the_window_and_pauses_its_producer():
    wire = Wire()
    mux = ChannelMux(SID, wire, 32)
    protocol, channel = opened(mux, wire)
    producer = Producer()
    protocol.transport.registerProducer(producer, True)
    protocol.transport.write(b"y" * (WINDOW + PAUSE_AT))
    sent = sum(len(r) for _, _, r in wire.new())
    assert sent == WINDOW and producer.state == "paused"
    mux.received(b"G", struct.pack(">II", channel, WINDOW))
    assert sum(len(r) for _, _, r in wire.new()) == PAUSE_AT
    assert producer.state == "producing"


def test_a_paused_protocol_is_not_fed_nor_are_its_bytes_granted():
    wire = Wire()
    mux = ChannelMux(SID, wire, 32)
    protocol, channel = opened(mux, wire)
    protocol.transport.pauseProducing()
    head = struct.pack(">I", channel)
    for _ in range(WINDOW // CHUNK):
        mux.received(b"D", head + b"z" * CHUNK)
    assert protocol.received == b"" and wire.new() == []
    protocol.transport.resumeProducing()
    assert len(protocol.received) == WINDOW
    assert sum(struct.unpack(">I", r)[0] for k, _, r in wire.new() if k == b"G") == WINDOW


def test_a_keeper_past_the_window_loses_that_channel_with_one_line(logged):
    wire = Wire()
    mux = ChannelMux(SID, wire, 32)
    protocol, channel = opened(mux, wire)
    other, _ = opened(mux, wire, 8081)
    protocol.transport.pauseProducing()
    head = struct.pack(">I", channel)
    for _ in range(WINDOW // CHUNK + 1):
        mux.received(b"D", head + b"z" * CHUNK)
    assert protocol.lost.check(ConnectionLost)
    assert (b"F", channel, f"more than the window of {WINDOW} bytes".encode()) in wire.new()
    assert other.lost is None and len(mux) == 1
    said = [e for e in logged if e.get("problem")]
    assert len(said) == 1 and "broke channel" in said[0]["log_format"]


def test_past_the_cap_a_channel_is_refused_with_a_sentence(logged):
    wire = Wire()
    mux = ChannelMux(SID, wire, 2)
    opened(mux, wire)
    opened(mux, wire)
    results = []
    mux.open(80, factory_of()).addErrback(results.append)
    assert wire.new() == []
    [failure] = results
    assert failure.check(TooManyChannels)
    assert "2 channels open (at most 2)" in failure.getErrorMessage()
    assert any("channels open" in e.get("log_format", "") for e in logged)


def test_the_keepers_connection_goes_to_the_door_with_its_session():
    wire = Wire()
    made = []

    def accept(address):
        made.append(Recorder())
        made[-1].address = address
        return made[-1]
    mux = ChannelMux(SID, wire, 32, ChannelOptions(3180, accept))
    mux.received(b"C", struct.pack(">IH", 7, 3180))
    [protocol] = made
    assert protocol.address == ChannelAddress(SID, 7, 3180)
    assert protocol.transport.getPeer().session_id == SID
    mux.received(b"D", struct.pack(">I", 7) + b"GET / HTTP/1.1\r\n")
    assert protocol.received == b"GET / HTTP/1.1\r\n"
    # not the door's port, an id of capsule's: refused, nothing made
    mux.received(b"C", struct.pack(">IH", 8, 22))
    mux.received(b"C", struct.pack(">IH", CAPSULE_BIT | 9, 3180))
    refused = [(k, c) for k, c, _ in wire.new() if k == b"F"]
    assert refused == [(b"F", 8), (b"F", CAPSULE_BIT | 9)] and len(made) == 1


def test_the_keepers_connection_past_the_cap_is_refused():
    wire = Wire()
    mux = ChannelMux(SID, wire, 1, ChannelOptions(3180, lambda a: Recorder()))
    mux.received(b"C", struct.pack(">IH", 1, 3180))
    mux.received(b"C", struct.pack(">IH", 2, 3180))
    assert [(k, c, r) for k, c, r in wire.new() if k == b"F"] == [
        (b"F", 2, b"1 channels are open (at most 1)")]


def test_a_close_is_an_end_then_a_close_once_all_was_written():
    wire = Wire()
    mux = ChannelMux(SID, wire, 32)
    protocol, channel = opened(mux, wire)
    protocol.transport.write(b"last")
    protocol.transport.loseConnection()
    assert [k for k, _, _ in wire.new()] == [b"D", b"E"]
    assert protocol.lost is None
    mux.received(b"G", struct.pack(">II", channel, 4))
    assert wire.new() == [(b"F", channel, b"closed by capsule")]
    assert protocol.lost.check(ConnectionDone) and len(mux) == 0


def test_the_containers_end_half_closes_or_closes():
    wire = Wire()
    mux = ChannelMux(SID, wire, 32)
    half, channel = opened(mux, wire, kind=HalfCloser)
    mux.received(b"E", struct.pack(">I", channel))
    assert half.read_ended and half.lost is None
    half.transport.write(b"answer")
    half.transport.loseWriteConnection()
    assert [k for k, _, _ in wire.new()] == [b"D", b"E"]
    assert half.lost.check(ConnectionDone)
    plain, channel = opened(mux, wire)
    mux.received(b"E", struct.pack(">I", channel))
    assert wire.new() == [(b"E", channel, b"")] and plain.lost.check(ConnectionDone)


def test_a_failing_protocol_loses_its_channel_not_the_stream(logged):
    class Broken(Recorder):
        def dataReceived(self, data):
            raise RuntimeError("oops")
    wire = Wire()
    mux = ChannelMux(SID, wire, 32)
    broken, channel = opened(mux, wire, kind=Broken)
    fine, other = opened(mux, wire, 8081)
    mux.received(b"D", struct.pack(">I", channel) + b"x")
    mux.received(b"D", struct.pack(">I", other) + b"y")
    assert broken.lost is not None and fine.received == b"y"


def test_a_door_that_fails_to_make_a_protocol_closes_the_keepers_channel(logged):
    wire = Wire()

    def accept(address):
        raise RuntimeError("no")
    mux = ChannelMux(SID, wire, 32, ChannelOptions(3180, accept))
    mux.received(b"C", struct.pack(">IH", 4, 3180))
    assert wire.new() == [(b"F", 4, b"capsule's side failed")] and len(mux) == 0


def test_the_streams_end_ends_every_channel():
    wire = Wire()
    mux = ChannelMux(SID, wire, 32)
    protocol, _ = opened(mux, wire)
    results = []
    mux.open(81, factory_of()).addErrback(results.append)
    mux.close_all("it ended")
    assert protocol.lost.check(ConnectionLost) and results[0].check(ConnectError)
    later = []
    mux.open(82, factory_of()).addErrback(later.append)
    assert "stream is gone" in later[0].getErrorMessage()


# -- a session without a network --------------------------------------------------


class Door:
    "The session door as the manager knows it: a port and a factory."

    def __init__(self) -> None:
        self.port = 3180
        self.made = []

        class Built(Recorder):
            pass
        door = self

        class DoorFactory(Factory):
            def buildProtocol(self, address):
                door.made.append(Built())
                door.made[-1].address = address
                return door.made[-1]
        self.factory = DoorFactory()


def session_of(network, docker, door=None):
    spec = ContainerSpec(image="capsule-runtime:latest", network=network)
    manager = SessionManager(docker, Clock(), SessionConfig(spec=spec, instance="t", grace=60),
                             door=door)
    session = manager.create(RecordingClient(), 80, 24)
    return session, docker.processes[-1]


def test_a_session_without_a_network_asks_its_keeper_for_channels_and_the_door():
    docker, door = FakeDockerAPI(), Door()
    session, process = session_of("none", docker, door)
    assert process.env[CHANNEL_ENV] == "3180"
    mux = session.shell.channels
    assert mux is not None and mux.limit == 32
    process.process_protocol.childDataReceived(1, b"C\0\0\0\x06\0\0\0\x01\x0c\x6c")
    [protocol] = door.made
    assert protocol.address == ChannelAddress(session.id, 1, 3180)


def test_a_session_with_a_network_has_no_channels():
    docker = FakeDockerAPI()
    session, process = session_of("capsule", docker, Door())
    assert CHANNEL_ENV not in process.env and session.shell.channels is None
    process.process_protocol.childDataReceived(1, b"C\0\0\0\x06\0\0\0\x01\x0c\x6c")
    assert session.status() in ("ending", "ended")  # not a frame its relay sends


def test_the_endpoint_reaches_a_port_in_the_container():
    docker = FakeDockerAPI()
    session, process = session_of("none", docker)
    assert process.env[CHANNEL_ENV] == "0"
    results = []
    KeeperChannelEndpoint(Clock(), session, 5173).connect(factory_of()).addBoth(results.append)
    sent = frames(b"".join(w for w in process.raw_written))
    [(kind, channel, rest)] = [f for f in sent if f[0] == b"C"]
    assert struct.unpack(">H", rest) == (5173,)
    process.process_protocol.childDataReceived(1, b"A\0\0\0\x04" + struct.pack(">I", channel))
    [protocol] = results
    assert protocol.transport.getPeer() == ChannelAddress(session.id, channel, 5173)
    process.end(0)
    assert protocol.lost is not None


def test_an_older_keeper_says_once_it_has_no_channels(logged):
    docker = FakeDockerAPI()
    docker.keeper_channels = None
    from capsule.engine.keeper_stream import ShellProtocol
    ShellProtocol._no_channels_said = False
    session, _ = session_of("none", docker)
    session_of("none", docker)
    assert session.shell.channels is None and session.status() == "running"
    said = [e for e in logged if "carries no channels" in e.get("log_format", "")]
    assert len(said) == 1
    results = []
    KeeperChannelEndpoint(Clock(), session, 80).connect(factory_of()).addErrback(results.append)
    assert "carries no channels" in results[0].getErrorMessage()
