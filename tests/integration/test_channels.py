"""
Keeper channels (capsule.engine.channels) against real containers, for
sessions without a network: from inside, 127.0.0.1:3180 is capsule's session
door; from capsule, a port in the container is an endpoint.  The live server
for the door's wiring; the rest in this process (the engine and the session
manager, with the session door's factory), where the endpoint can be used.
"""

from __future__ import annotations

import io
import resource
import uuid

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.web.server import Site
from zope.interface import implementer

from capsule.core.channels import WINDOW
from capsule.core.spec import ContainerSpec
from capsule.engine.channels import PAUSE_AT, KeeperChannelEndpoint, TooManyChannels
from capsule.engine.docker import DockerAPI
from capsule.gateway.door import DoorRoot
from capsule.sessions.manager import SessionManager
from capsule.sessions.session import SessionConfig
from tests.support.fakes import RecordingClient

from .harness import (IMAGE, WSClient, docker_client, poll, remove_instance_containers, sleep,
                      with_timeout)

# A keeper as those before channels were: the session image's own source,
# built again without them, in an image of the test's own.
OLD_KEEPER = ("FROM {image}\nUSER root\nRUN gcc -O2 -DCAPSULE_KEEPER_NO_CHANNELS"
              " -o /usr/local/bin/capsule-keeper /usr/local/src/capsule-keeper.c -lutil\n"
              "USER developer\n")
ECHO_PORT = 7000
# A forking echo server on 127.0.0.1:PORT (the session image has perl).
ECHO = ("perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(LocalAddr=>\"127.0.0.1:{port}\","
        "Listen=>64,ReuseAddr=>1) or die \"listen: $!\"; $SIG{{CHLD}}=\"IGNORE\";"
        " while($c=$s->accept){{ if(!fork){{ while(($n=sysread($c,$b,65536))){{ $o=0;"
        " while($o<$n){{ $w=syswrite($c,$b,$n-$o,$o); exit 1 if !defined $w; $o+=$w }} }}"
        " exit 0 }} close $c }}' >/dev/null 2>&1 &")


@pytest_twisted.ensureDeferred
async def test_from_inside_the_door_answers_on_loopback(make_server):
    server = make_server("--network", "none", "--pool-size", "0")
    client = await WSClient.connect(server.ws_url, binary=True)
    await client.start()
    out = await client.run("curl -s http://127.0.0.1:3180/anything; echo;"
                           " echo var=${CAPSULE_KEEPER_CHANNELS-unset}.", timeout=30)
    assert '"code": "not_found"' in out or '"code":"not_found"' in out, out
    assert "the session door serves" in out
    assert "var=unset." in out  # the keeper's, not the shell's
    await client.close()


class Door:
    "The session door as the manager knows it: its port and its factory."

    port = 3180

    def __init__(self) -> None:
        self.factory = Site(DoorRoot())


@pytest.fixture
def engine():
    api = DockerAPI(reactor, threads=4, export_threads=1, timeout=60)
    api.start()
    yield api
    api.stop()


@pytest.fixture
def sessions(engine):
    """
    C{make(image)}: a session without a network, of a manager of its own,
    and its client; all removed afterwards.
    """
    made = []

    async def make(image=IMAGE):
        instance = f"chan-{uuid.uuid4().hex[:10]}"
        spec = ContainerSpec(image=image, memory="256m", cpus=1, pids=128, network="none")
        manager = SessionManager(engine, reactor, SessionConfig(spec=spec, instance=instance,
                                                                grace=60), door=Door())
        made.append((manager, instance))
        client = RecordingClient()
        session = manager.create(client, 120, 40)
        await poll(lambda: session.status() == "running" and client.offset is not None,
                   60, "the session to run")
        return manager, session, client

    yield make
    for manager, instance in made:
        for session in list(manager.sessions.values()):
            session.events.end(None, "the test is over")
        remove_instance_containers(instance)


async def run(manager, session, client, command: str, marker: str, timeout: float = 30):
    """
    Type C{command} in the session's terminal; wait for C{marker} after it.
    """
    since = len(client.output)
    manager.write(session, command.encode() + b"\r")
    await poll(lambda: marker.encode() in client.output[since:], timeout,
               f"{marker!r} after {command!r}")
    return client.output[since:].decode("utf-8", "replace")


class Collect(Protocol):
    def __init__(self) -> None:
        self.received = bytearray()
        self.ended: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.ended.callback(None)


async def echo_server(manager, session, client, port=ECHO_PORT):
    await run(manager, session, client, ECHO.format(port=port) + " echo st$((1+1))", "st2")
    endpoint = KeeperChannelEndpoint(reactor, session, port)

    async def up():
        try:
            protocol = await endpoint.connect(Factory.forProtocol(Collect))
        except ConnectionRefusedError:
            return False
        protocol.transport.loseConnection()
        return True
    for _ in range(100):
        if await up():
            return endpoint
        await sleep(0.1)
    raise AssertionError("the echo server did not listen")


@pytest_twisted.ensureDeferred
async def test_the_door_from_inside_in_process(sessions):
    manager, session, client = await sessions()
    assert session.shell.channels is not None and session.shell.channels.limit == 32
    out = await run(manager, session, client,
                    "curl -s http://127.0.0.1:3180/; echo; echo done$((1+1))", "done2")
    assert '"not_found"' in out


@pytest_twisted.ensureDeferred
async def test_an_endpoint_echoes_both_ways(sessions):
    manager, session, client = await sessions()
    endpoint = await echo_server(manager, session, client)
    protocol = await with_timeout(endpoint.connect(Factory.forProtocol(Collect)), 10)
    address = protocol.transport.getPeer()
    assert address.session_id == session.id and address.port == ECHO_PORT
    protocol.transport.write(b"hello, container")
    await poll(lambda: protocol.received == b"hello, container", 10, "the echo")
    protocol.transport.loseConnection()
    await with_timeout(protocol.ended, 10)


@pytest_twisted.ensureDeferred
async def test_a_channel_to_a_closed_port_fails_cleanly(sessions):
    manager, session, client = await sessions()
    with pytest.raises(ConnectionRefusedError) as refused:
        await with_timeout(KeeperChannelEndpoint(reactor, session, 7999).connect(
            Factory.forProtocol(Collect)), 10)
    assert "Connection refused" in str(refused.value)
    assert len(session.shell.channels) == 0
    await run(manager, session, client, "echo ok$((2+2))", "ok4")


@pytest_twisted.ensureDeferred
async def test_the_channel_cap(sessions):
    manager, session, client = await sessions()
    endpoint = await echo_server(manager, session, client)
    mux = session.shell.channels
    held = [await with_timeout(endpoint.connect(Factory.forProtocol(Collect)), 10)
            for _ in range(mux.limit)]
    with pytest.raises(TooManyChannels) as refused:
        await endpoint.connect(Factory.forProtocol(Collect))
    assert f"(at most {mux.limit})" in str(refused.value)
    # from inside too: the door's connection is closed, capsule told
    out = await run(manager, session, client,
                    "curl -s -m 5 http://127.0.0.1:3180/; echo r''c=$?.", "rc=")
    assert "not_found" not in out and "rc=0." not in out, out
    held[0].transport.loseConnection()
    await with_timeout(held[0].ended, 10)
    again = await with_timeout(endpoint.connect(Factory.forProtocol(Collect)), 10)
    again.transport.write(b"x")
    await poll(lambda: again.received == b"x", 10, "the echo")


@implementer(IPushProducer)
class Pusher:
    """
    Writes C{total} bytes on a transport as fast as it takes them.
    """

    def __init__(self, transport, total: int) -> None:
        self.transport = transport
        self.total = total
        self.sent = 0
        self.paused = False
        self.most_held = 0
        transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        block = b"c" * 65536
        while not self.paused and self.sent < self.total:
            self.transport.write(block)
            self.sent += len(block)
            self.most_held = max(self.most_held, len(self.transport._out))

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True


class Counter(Protocol):
    def __init__(self) -> None:
        self.count = 0
        self.most_held = 0
        self.ended: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        self.most_held = max(self.most_held, sum(map(len, self.transport._held)))

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.ended.callback(None)


@pytest_twisted.ensureDeferred
async def test_fifty_megabytes_with_memory_bounded_and_the_terminal_heard(sessions):
    manager, session, client = await sessions()
    endpoint = await echo_server(manager, session, client)
    total = 50 * 1024 * 1024
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    protocol = await with_timeout(endpoint.connect(Factory.forProtocol(Counter)), 10)
    pusher = Pusher(protocol.transport, total)
    await poll(lambda: protocol.count >= total // 10, 120, "a tenth of the echo")
    since = len(client.output)
    manager.write(session, b"echo tick$((40+2))\r")
    await poll(lambda: b"tick42" in client.output[since:], 60, "the keystroke's echo")
    heard_at = protocol.count
    await poll(lambda: protocol.count >= total, 300, "the whole echo")
    assert protocol.count == total and pusher.sent == total
    # the terminal was heard during the transfer, not after it
    assert heard_at < total, heard_at
    # what capsule held of the channel stayed within its windows
    assert pusher.most_held <= PAUSE_AT + 65536
    assert protocol.most_held <= WINDOW
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 48 * 1024, f"{grown} KiB"  # nothing like 50 MB held
    protocol.transport.loseConnection()
    await with_timeout(protocol.ended, 10)


@pytest.fixture
def old_image():
    api = docker_client().api
    tag = f"capsule-test-old-keeper:{uuid.uuid4().hex[:8]}"
    for _ in api.build(fileobj=io.BytesIO(OLD_KEEPER.format(image=IMAGE).encode()), tag=tag,
                       rm=True, forcerm=True, labels={"io.capsule.test": "old-keeper"},
                       decode=True):
        pass
    try:
        yield tag
    finally:
        api.remove_image(tag, force=True)


@pytest_twisted.ensureDeferred
async def test_an_older_keeper_has_no_channels_and_works(sessions, old_image):
    manager, session, client = await sessions(old_image)
    assert session.shell.channels is None
    out = await run(manager, session, client,
                    "curl -s -m 5 http://127.0.0.1:3180/; echo r''c=$?.", "rc=")
    assert "rc=7." in out  # nothing listens there
    with pytest.raises(Exception) as refused:
        await KeeperChannelEndpoint(reactor, session, ECHO_PORT).connect(
            Factory.forProtocol(Collect))
    assert "carries no channels" in str(refused.value)
