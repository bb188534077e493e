"""
The direct path to a session's keeper (capsule.engine.keeper_direct), against
real containers: capsule reads a session that has a network over TCP, with
no relay exec; the keeper takes no one but capsule (a wrong secret, another
session, garbage from the session itself), its secret cannot be read from
inside the session, and a session without a network takes the relay exec.
"""

from __future__ import annotations

import os
import socket
import struct

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from capsule.core.keeper import DIRECT_PORT, SECRET_LABEL, encode_hello, encode_secret

from .harness import WSClient, docker_client, session_container


def inspect(session_id: str) -> dict:
    return docker_client().api.inspect_container(session_container(session_id))


def address(session_id: str) -> str:
    networks = inspect(session_id)["NetworkSettings"]["Networks"]
    return next(n["IPAddress"] for n in networks.values() if n["IPAddress"])


def keeper_processes(session_id: str) -> list[str]:
    """
    The command lines of the container's capsule-keeper processes.
    """
    top = docker_client().api.top(session_container(session_id), ps_args="-eo pid,args")
    return [row[-1] for row in top["Processes"] if "capsule-keeper" in row[-1]]


def closed_without_a_byte(host: str, first: bytes) -> bool:
    with socket.create_connection((host, DIRECT_PORT), timeout=10) as s:
        s.sendall(first)
        try:
            return s.recv(4096) == b""
        except ConnectionResetError:
            return True


@pytest_twisted.ensureDeferred
async def test_a_session_is_read_over_tcp_without_a_relay(server):
    client = await WSClient.connect(server.ws_url, binary=True)
    session_id = await client.start()
    assert "direct1" in await client.run("echo direct$((0+1))")
    keepers = await deferToThread(keeper_processes, session_id)
    assert keepers and all(" -r " not in k for k in keepers), keepers
    assert any(k.startswith(f"capsule-keeper -d -t {DIRECT_PORT} ") for k in keepers), keepers
    # The secret is in the container's label, nowhere in its keeper's arguments.
    secret = inspect(session_id)["Config"]["Labels"][SECRET_LABEL]
    assert len(secret) == 64 and all(secret not in k for k in keepers)
    await client.close()


@pytest_twisted.ensureDeferred
async def test_the_keeper_refuses_a_wrong_secret_and_garbage(server):
    client = await WSClient.connect(server.ws_url, binary=True)
    session_id = await client.start()
    host = await deferToThread(address, session_id)
    for first in (encode_secret(os.urandom(32)) + encode_hello(0),
                  encode_hello(0),
                  b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                  b"s" + struct.pack(">I", 2**32 - 1) + os.urandom(4096)):
        assert await deferToThread(closed_without_a_byte, host, first), first[:20]
    # capsule's attachment never noticed.
    assert "still2" in await client.run("echo still$((1+1))")
    await client.close()


@pytest_twisted.ensureDeferred
async def test_another_session_cannot_reach_a_keeper(server):
    """
    capsule's network has no traffic between containers: a session cannot
    even connect to another's keeper (it can to its own, from inside).
    """
    a = await WSClient.connect(server.ws_url, binary=True)
    a_id = await a.start()
    b = await WSClient.connect(server.ws_url, binary=True)
    await b.start()
    a_host = await deferToThread(address, a_id)
    out = await b.run(f"timeout 3 bash -c 'exec 3<>/dev/tcp/{a_host}/{DIRECT_PORT}'"
                      " 2>/dev/null; echo other=$?;"
                      f" timeout 3 bash -c 'exec 3<>/dev/tcp/127.0.0.1/{DIRECT_PORT}'; echo own=$?",
                      timeout=30)
    assert "own=0" in out
    assert "other=0" not in out and "other=" in out
    await a.close()
    await b.close()


@pytest_twisted.ensureDeferred
async def test_garbage_from_inside_the_session_leaves_it_alone(server):
    client = await WSClient.connect(server.ws_url, binary=True)
    await client.start()
    out = await client.run(
        f"printf 'GET / HTTP/1.1\\r\\n\\r\\n' >/dev/tcp/127.0.0.1/{DIRECT_PORT};"
        f" head -c 200000 /dev/urandom >/dev/tcp/127.0.0.1/{DIRECT_PORT} 2>/dev/null;"
        f" for i in 1 2 3 4 5 6; do exec {{fd}}<>/dev/tcp/127.0.0.1/{DIRECT_PORT}; done;"
        " echo sent", timeout=30)
    assert "sent" in out
    assert "alive3" in await client.run("echo alive$((1+2))")
    await client.close()


@pytest_twisted.ensureDeferred
async def test_the_secret_cannot_be_read_from_inside(server):
    """
    The session's processes run as the keeper's user: the keeper makes
    itself non-dumpable, so that its memory and environment are not theirs
    to read.
    """
    client = await WSClient.connect(server.ws_url, binary=True)
    await client.start()
    out = await client.run(
        "p=$(pgrep -f '^capsule-keeper -d' | head -1); echo pid=$p;"
        " cat /proc/$p/environ >/dev/null 2>&1; echo environ=$?;"
        " head -c 1 /proc/$p/mem 2>&1 | grep -c 'Permission denied'")
    assert "pid=" in out and "pid=\r" not in out
    assert "environ=1" in out
    assert out.strip().splitlines()[-1].strip() == "1"
    await client.close()


@pytest_twisted.ensureDeferred
async def test_a_session_without_a_network_takes_the_relay(make_server):
    server = make_server("--network", "none", "--pool-size", "0")
    client = await WSClient.connect(server.ws_url, binary=True)
    session_id = await client.start()
    assert "relay1" in await client.run("echo relay$((0+1))")
    keepers = await deferToThread(keeper_processes, session_id)
    assert any(k.startswith("capsule-keeper -r ") for k in keepers), keepers
    assert SECRET_LABEL not in inspect(session_id)["Config"]["Labels"]
    await client.close()
