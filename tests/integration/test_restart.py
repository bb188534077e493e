"""
Sessions survive a restart of capsule (clean or not): same container, same
shell and its jobs, and the output produced meanwhile replayed exactly.
"""

import re
import signal

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.threads import deferToThread

from .harness import (WSClient, docker_client, eventually, instance_containers,
                      session_container, sleep)


def inspect_session(session_id):
    return docker_client().api.inspect_container(session_container(session_id))


# The keeper reached over TCP (the default where a session has a network), or
# through a relay exec: the replay is exact either way.
PATHS = pytest.mark.parametrize("path", [{}, {"keeper-direct": False}], ids=["direct", "relay"])


@PATHS
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
@pytest_twisted.ensureDeferred
async def test_session_survives_a_restart(make_server, how, path):
    first = make_server("--grace", "60", "--pool-size", "0", tuning=path)
    client = await WSClient.connect(first.ws_url, binary=True)
    session_id = await client.start()
    container_id = inspect_session(session_id)["Id"]
    await client.run("export KEPT=yes; cd /tmp; sleep 600 & true")
    # Output that is produced while capsule is down.
    client.type("sleep 2; for i in $(seq 1 3000); do echo down$i; done; echo DOWN$((1+1))\r")
    await sleep(0.5)
    await deferToThread(first.stop, sig=how)
    code, _ = await client.closed
    assert code == (4001 if how == signal.SIGTERM else 1006)
    before, offset = client.output, client.received

    second = make_server("--grace", "60", "--pool-size", "0", instance=first.instance,
                         tuning=path)
    await eventually(lambda: "found 1 session(s) of an earlier run" in second.log())
    await sleep(3)
    again = await WSClient.connect(second.ws_url, session_id, binary=True, offset=offset)
    connected = await again.next("connected")
    assert connected["resumed"] is True and connected["offset"] == offset
    await again.until(r"DOWN2")
    whole = before + again.output
    numbers = [int(n) for n in re.findall(rb"down(\d+)\r\n", whole)]
    assert numbers == list(range(1, 3001)), "duplicates or gaps across the restart"
    again.send({"type": "resize", "cols": 100, "rows": 30})
    out = await again.run("echo $KEPT $PWD; jobs; stty size")
    assert "yes /tmp" in out and "sleep 600" in out and "30 100" in out
    assert inspect_session(session_id)["Id"] == container_id
    await again.close()


@pytest_twisted.ensureDeferred
async def test_json_client_resumes_after_a_restart(make_server):
    first = make_server("--pool-size", "0")
    client = await WSClient.connect(first.ws_url)
    session_id = await client.start()
    await client.run("export KEPT=json")
    await deferToThread(first.stop)
    second = make_server("--pool-size", "0", instance=first.instance)
    await eventually(lambda: "found 1 session(s)" in second.log())
    again = await WSClient.connect(second.ws_url, session_id)
    assert (await again.next("connected"))["resumed"] is True
    assert "json" in await again.run("echo $KEPT")
    await again.close()


@pytest_twisted.ensureDeferred
async def test_recovered_sessions_expire_and_stopped_leftovers_go(make_server):
    first = make_server("--pool-size", "0")
    client = await WSClient.connect(first.ws_url)
    session_id = await client.start()
    await deferToThread(first.stop, sig=signal.SIGKILL)
    # A stopped container of this instance: nothing can resume it.
    stopped = await deferToThread(lambda: docker_client().api.create_container(
        "capsule-runtime:latest", command=["true"],
        labels={"io.capsule.managed": "true", "io.capsule.instance": first.instance}))
    # (Where sessions are kept, they are put away instead: tests/integration/test_keep.py.)
    second = make_server("--pool-size", "0", "--grace", "2", "--retention", "0",
                         tuning={"cleanup-interval": 0.2}, instance=first.instance)
    await eventually(lambda: "leftover" in second.log())
    assert stopped["Id"] not in {c["Id"] for c in instance_containers(first.instance)}
    await eventually(lambda: instance_containers(first.instance) == [], timeout=20)
    assert "expired" in second.log()
    gone = await WSClient.connect(second.ws_url, session_id)
    assert (await gone.next("error"))["code"] == "session_not_found"


@pytest_twisted.ensureDeferred
async def test_without_keeper_a_clean_stop_removes_sessions(make_server):
    server = make_server("--no-keeper", "--pool-size", "0")
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    assert "developer" in await client.run("whoami")
    await deferToThread(server.stop)
    assert instance_containers(server.instance) == []


@pytest_twisted.ensureDeferred
async def test_reconnecting_at_once_after_a_restart_finds_every_session(make_server):
    """
    The page retries as soon as the port accepts connections: no reconnect
    may be told its session does not exist while capsule is still finding
    the sessions of its earlier run.
    """
    first = make_server("--grace", "60", "--pool-size", "0")
    clients = [await WSClient.connect(first.ws_url, binary=True) for _ in range(8)]
    ids = [await c.start() for c in clients]
    for client in clients:
        await client.run("export SURVIVED=yes")
    offsets = [c.received for c in clients]
    await deferToThread(first.stop, sig=signal.SIGKILL)
    # start() returns as soon as the port accepts a connection.
    second = make_server("--grace", "60", "--pool-size", "0", instance=first.instance)
    again = await defer.gatherResults([
        defer.ensureDeferred(WSClient.connect(second.ws_url, session_id, binary=True,
                                              offset=offset))
        for session_id, offset in zip(ids, offsets)])
    for client, session_id in zip(again, ids):
        connected = await client.next()
        assert connected["type"] == "connected", connected
        assert connected["session_id"] == session_id and connected["resumed"] is True
    for client in again:
        assert "yes" in await client.run("echo $SURVIVED")
        await client.close()


@PATHS
@pytest_twisted.ensureDeferred
async def test_input_typed_while_a_session_resumes_reaches_the_shell_once(make_server, path):
    first = make_server("--pool-size", "0", tuning=path)
    client = await WSClient.connect(first.ws_url, binary=True)
    session_id = await client.start()
    await client.run("stty -echo")
    offset = client.received
    await deferToThread(first.stop)
    second = make_server("--pool-size", "0", instance=first.instance, tuning=path)
    again = await WSClient.connect(second.ws_url, session_id, binary=True, offset=offset)
    # Typed before capsule has attached to the shell again.
    again.type("echo typed-$((20+1))\r")
    again.type("echo typed-$((20+2))\r")
    assert (await again.next("connected"))["resumed"] is True
    await again.until("typed-22")
    assert re.findall(rb"typed-\d+", again.output) == [b"typed-21", b"typed-22"]
    await again.close()


@pytest_twisted.ensureDeferred
async def test_a_restarted_shell_is_a_notice_and_offsets_stay_exact(make_server):
    """
    The container restarted while capsule was down, so its shell started
    again from nothing: the client hears a notice (not output) and its
    offsets start again, exactly, from what the new shell printed.
    """
    first = make_server("--pool-size", "0", "--grace", "60")
    client = await WSClient.connect(first.ws_url, binary=True)
    session_id = await client.start()
    await client.run("echo before")
    offset = client.received
    await deferToThread(first.stop)
    await deferToThread(lambda: docker_client().api.restart(session_container(session_id),
                                                            timeout=1))
    second = make_server("--pool-size", "0", "--grace", "60", instance=first.instance)
    again = await WSClient.connect(second.ws_url, session_id, binary=True, offset=offset)
    connected = await again.next("connected")
    assert connected["offset"] == 0 and connected["resumed"] is True
    notice = await again.next("notice")
    assert notice["code"] == "shell_restarted"
    # Its keeper, which listened over TCP, went with the restart: capsule
    # fell back to a relay exec, which started a keeper again.
    assert "cannot be reached directly" in second.log()
    await again.run("echo after")
    # Nothing but the new shell's bytes was counted: a resume from the
    # offset the client reached gets exactly what came after it.
    assert b"[capsule:" not in again.output
    reached = again.received
    assert reached == len(again.output)
    again.type("stty -echo; sleep 1; echo LATER-$((1+1))\r")
    await sleep(0.3)
    again.drop()
    await again.closed
    last = await WSClient.connect(second.ws_url, session_id, binary=True, offset=reached)
    assert (await last.next("connected"))["offset"] == reached
    await last.until("LATER-2")
    whole = again.output[:reached] + last.output
    assert whole.count(b"echo LATER-$((1+1))") == 1, "a gap or a duplicate at the resume"
    assert len(whole) == last.received
    await last.close()
