"""
Faults survived: a killed container, a client that vanishes without a
close, a Docker engine that goes away and comes back.
"""

import json
import os

import pytest
import pytest_twisted
from twisted.internet import protocol, reactor
from twisted.internet.endpoints import UNIXClientEndpoint, UNIXServerEndpoint
from twisted.internet.threads import deferToThread

from .harness import WSClient, docker_client, eventually, instance_containers, session_container


@pytest_twisted.ensureDeferred
async def test_killed_container_ends_the_session_with_a_reason(server):
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    await client.run("true")
    await deferToThread(lambda: docker_client().api.kill(session_container(session_id)))
    ended = await client.next("exit")
    assert ended["exit_code"] is None
    # Processes are lost, files are not: the session is kept (docs/keeping.md).
    assert ended["message"].startswith(
        "the session's container stopped (exit code 137): the session is kept; its files are"
        " kept until ")
    assert (await client.closed)[0] == 1000
    status, _, body = await deferToThread(server.get, f"/api/sessions/{session_id}")
    assert status == 200 and json.loads(body)["state"] == "kept"
    [container] = [c for c in instance_containers(server.instance)
                   if c["Labels"].get("io.capsule.session") == session_id]
    assert container["State"] == "exited"


@pytest_twisted.ensureDeferred
async def test_killed_container_without_retention_is_removed(make_server):
    server = make_server("--retention", "0")
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    await client.run("true")
    await deferToThread(lambda: docker_client().api.kill(session_container(session_id)))
    ended = await client.next("exit")
    assert ended == {"type": "exit", "exit_code": None,
                     "message": "the session's container stopped (exit code 137)"}
    assert (await client.closed)[0] == 1000
    await eventually(lambda: not [c for c in instance_containers(server.instance)
                                  if c["Labels"].get("io.capsule.session") == session_id])


@pytest_twisted.ensureDeferred
async def test_export_of_a_session_whose_container_is_gone(server):
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    await deferToThread(lambda: docker_client().api.remove_container(
        session_container(session_id), force=True))
    await client.next("exit")
    status, headers, body = await deferToThread(server.get, f"/api/export/{session_id}")
    assert status == 404 and headers["Content-Type"] == "application/json"
    assert json.loads(body)["code"] == "session_not_found"


@pytest_twisted.ensureDeferred
async def test_half_open_client_is_noticed_and_the_session_stays_reconnectable(make_server):
    server = make_server(tuning={"ping-interval": 1, "ping-timeout": 1})
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    await client.run("export HALF=open")
    # Stop reading: pings go unanswered, as with a laptop that slept.
    client._protocol.transport.pauseProducing()
    await eventually(lambda: f"client left session {session_id[:8]}" in server.log(), timeout=15)
    again = await WSClient.connect(server.ws_url, session_id)
    assert (await again.next("connected"))["resumed"] is True
    assert "open" in await again.run("echo $HALF")
    await again.close()
    client._protocol.transport.abortConnection()


class _Pipe(protocol.Protocol):
    peer = None
    buffered = b""

    def dataReceived(self, data):
        if self.peer is None:
            self.buffered += data
        else:
            self.peer.transport.write(data)

    def connectionLost(self, reason):
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()


class DockerProxy(protocol.Factory):
    """
    A UNIX socket in front of the real engine that a test can cut: an outage
    as capsule sees it, without touching the engine others use.
    """

    def __init__(self, path):
        self.path = path
        self.port = None
        self.pipes = []

    def buildProtocol(self, addr):
        front = _Pipe()
        self.pipes.append(front)

        def connected(back):
            front.peer, back.peer = back, front
            if front.buffered:
                back.transport.write(front.buffered)

        def failed(f):
            front.transport.loseConnection()

        back = _Pipe()
        self.pipes.append(back)
        endpoint = UNIXClientEndpoint(reactor, "/var/run/docker.sock")
        protocol.Factory.forProtocol(lambda: back)
        d = endpoint.connect(protocol.Factory.forProtocol(lambda: back))
        d.addCallbacks(connected, failed)
        return front

    async def up(self):
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.port = await UNIXServerEndpoint(reactor, self.path).listen(self)

    async def down(self):
        port, self.port = self.port, None
        await port.stopListening()
        for pipe in self.pipes:
            if pipe.transport is not None:
                pipe.transport.abortConnection()
        self.pipes = []


@pytest.mark.parametrize("direct", [False, True], ids=["relay", "direct"])
@pytest_twisted.ensureDeferred
async def test_docker_outage_and_recovery(make_server, tmp_path, direct):
    """
    Over the relay exec, the session's stream goes through the engine: it
    waits for it and says so. Over the direct path to the keeper, the stream
    never touches the engine: the session goes on through the outage.
    """
    proxy = DockerProxy(str(tmp_path / "docker.sock"))
    await proxy.up()
    server = make_server("--pool-size", "0", tuning={"orphan-sweep": 1, "cleanup-interval": 0.5,
                                                     "keeper-direct": direct},
                         env={"DOCKER_HOST": f"unix://{proxy.path}"}, start=False)
    # Started on a thread: capsule reaches Docker through this reactor's proxy
    # before it listens.
    await deferToThread(server.start)
    try:
        client = await WSClient.connect(server.ws_url)
        session_id = await client.start()
        await client.run("export OUTAGE=survived")

        # The engine goes away: the session waits for it, and says so.
        await proxy.down()
        if direct:
            assert await client.run("echo $OUTAGE during") == "survived during\r\n"
        else:
            away = await client.next("notice", timeout=30)
            assert away["code"] == "engine_away", away
        status, _, body = await deferToThread(server.get, "/health")
        assert status == 503 and json.loads(body)["docker"] is False
        other = await WSClient.connect(server.ws_url)
        other.send({"type": "resize", "cols": 80, "rows": 24})
        error = await other.next("error")
        assert error["code"] == "docker_unavailable"

        # It comes back: the same shell goes on, and new sessions start.
        await proxy.up()
        if not direct:
            back = await client.next("notice", timeout=30)
            assert back["code"] == "engine_back", back
        assert await client.run("echo $OUTAGE") == "survived\r\n"
        status, _, _ = await deferToThread(server.get, "/health")
        assert status == 200
        fresh = await WSClient.connect(server.ws_url)
        await fresh.start()
        assert "developer" in await fresh.run("whoami")
        (container,) = [c for c in instance_containers(server.instance)
                        if c["Labels"].get("io.capsule.session") == session_id]
        assert container["State"] == "running"
        await fresh.close()
        await client.close()
        assert server.process.poll() is None
    finally:
        if proxy.port is not None:
            await proxy.down()


@pytest_twisted.ensureDeferred
async def test_a_silent_attached_session_is_never_expired(make_server):
    # Grace 1 s, sweeps every 0.2 s: a silent agent with the tab open stays.
    server = make_server("--grace", "1", "--pool-size", "0", tuning={"cleanup-interval": 0.2})
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    client.type("sleep 4; echo still$((1+1))\r")
    # Four silent seconds: four times the grace period, twenty sweeps.
    await client.until("still2")
    assert "expired" not in server.log()
    (container,) = [c for c in instance_containers(server.instance)
                    if c["Labels"].get("io.capsule.session") == session_id]
    assert container["State"] == "running"
    await client.close()
