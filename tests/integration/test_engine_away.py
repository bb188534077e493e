"""
Sessions survive the Docker engine going away while their containers run on:
a UNIX socket in front of the real engine is cut and restored, as a dockerd
restart with live-restore looks to capsule.
"""

import re

import pytest_twisted
from twisted.internet.threads import deferToThread

from .harness import WSClient, docker_client, eventually, session_container, sleep, wait_for
from .test_faults import DockerProxy

LOOP = "i=0; while true; do i=$((i+1)); echo T$i; sleep 0.05; done\r"


async def _server_behind(make_server, tmp_path, *args):
    proxy = DockerProxy(str(tmp_path / "docker.sock"))
    await proxy.up()
    # In a thread: the proxy runs on this reactor, and capsule opens its port
    # only once it has asked the engine (through the proxy) for its sessions.
    # Through relay execs: a session read over TCP (the direct path) does
    # not go through the engine, and an outage leaves its stream alone.
    server = await deferToThread(make_server, "--pool-size", "0", "--grace", "30", *args,
                                 env={"DOCKER_HOST": f"unix://{proxy.path}"},
                                 tuning={"keeper-direct": False})
    return proxy, server


def _numbers(output: bytes) -> list[int]:
    return [int(n) for n in re.findall(rb"\bT(\d+)\r\n", output)]


async def _cut_and_restore(proxy, client, outage: float = 2.0):
    await proxy.down()
    away = await client.next("notice", timeout=30)
    assert away["code"] == "engine_away", away
    await sleep(outage)
    await proxy.up()
    back = await client.next("notice", timeout=30)
    assert back["code"] == "engine_back", back


@pytest_twisted.ensureDeferred
async def test_a_binary_session_resumes_byte_exact_through_an_outage(make_server, tmp_path):
    proxy, server = await _server_behind(make_server, tmp_path)
    try:
        client = await WSClient.connect(server.ws_url, binary=True)
        await client.start()
        await client.run("stty -echo")
        client.type(LOOP)
        await client.until(rb"T20\r\n")
        await _cut_and_restore(proxy, client)
        seen = max(_numbers(client.output))
        await client.until(f"T{seen + 20}\r\n")
        numbers = _numbers(client.output)
        assert numbers == list(range(1, len(numbers) + 1)), "a gap or a duplicate"
        # The loop ran on while the engine was away: its output was replayed.
        assert len(numbers) > 20 + 2 / 0.05 * 0.5
        assert client.received == len(client.output)
        # Input works again.
        client.send_input(b"\x03")
        assert "again" in await client.run("echo ag''ain")
        assert not client.errors
        await client.close()
    finally:
        if proxy.port is not None:
            await proxy.down()


@pytest_twisted.ensureDeferred
async def test_a_json_session_resumes_through_an_outage(make_server, tmp_path):
    proxy, server = await _server_behind(make_server, tmp_path)
    try:
        client = await WSClient.connect(server.ws_url)
        session_id = await client.start()
        await client.run("export KEPT=through")
        await _cut_and_restore(proxy, client)
        assert "through" in await client.run("echo $KEPT")
        assert [m["type"] for m in client.all_messages].count("connected") == 1
        assert f"session {session_id[:8]} ended" not in server.log()
        await client.close()
    finally:
        if proxy.port is not None:
            await proxy.down()


@pytest_twisted.ensureDeferred
async def test_a_container_removed_during_the_outage_ends_with_that_reason(make_server,
                                                                             tmp_path):
    proxy, server = await _server_behind(make_server, tmp_path)
    try:
        client = await WSClient.connect(server.ws_url, binary=True)
        session_id = await client.start()
        await proxy.down()
        assert (await client.next("notice", timeout=30))["code"] == "engine_away"
        # Removed behind capsule's back, through the engine itself.
        await deferToThread(lambda: docker_client().api.remove_container(
            session_container(session_id), force=True))
        await proxy.up()
        ended = await client.next("exit", timeout=30)
        assert "removed while the Docker engine was away" in ended["message"], ended
        await eventually(lambda: f"session {session_id[:8]} ended" in server.log())
        # Its removal (of a container already gone) is done before the proxy
        # goes; in a thread, since /health asks the engine through the proxy.
        await deferToThread(wait_for, server.settled, 20, "capsule to settle")
    finally:
        if proxy.port is not None:
            await proxy.down()


@pytest_twisted.ensureDeferred
async def test_new_sessions_while_the_engine_is_away_are_refused_at_once(make_server, tmp_path):
    proxy, server = await _server_behind(make_server, tmp_path)
    try:
        client = await WSClient.connect(server.ws_url)
        await client.start()
        await proxy.down()
        assert (await client.next("notice", timeout=30))["code"] == "engine_away"
        other = await WSClient.connect(server.ws_url)
        other.send({"type": "resize", "cols": 80, "rows": 24})
        assert (await other.next("error"))["code"] == "docker_unavailable"
        status, body = await deferToThread(server.health)
        assert status == 503 and body["status"] == "unavailable"
        # The orphan sweep and the expiry leave the waiting session alone.
        assert len(server.containers()) == 1
        await proxy.up()
        assert (await client.next("notice", timeout=30))["code"] == "engine_back"
        assert "yes" in await client.run("echo y''es")
        await client.close()
    finally:
        if proxy.port is not None:
            await proxy.down()
