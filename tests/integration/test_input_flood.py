"""
Input is backpressured end to end: a client flooding a shell that does not
read its input cannot grow capsule's memory.
"""

import pytest_twisted
from twisted.internet.threads import deferToThread

from .harness import WSClient, sleep

FRAME = 256 * 1024


async def _rss_mib(server) -> float:
    return (await deferToThread(server.rss_kib)) / 1024


@pytest_twisted.ensureDeferred
async def test_a_flood_to_a_shell_that_does_not_read_leaves_capsule_small(make_server):
    server = make_server("--pool-size", "0")
    client = await WSClient.connect(server.ws_url, binary=True)
    await client.start()
    await client.run("stty -icanon -echo")
    client.type("sleep 600\r")
    await sleep(0.5)
    before = await _rss_mib(server)
    # 160 frames of 256 KiB (40 MiB) in a few seconds, as fast as the socket takes them.
    payload = b"x" * FRAME
    for _ in range(20):
        for _ in range(8):
            client.send_input(payload)
        await sleep(0.2)
    await sleep(1)
    grown = await _rss_mib(server) - before
    assert grown < 20, f"capsule grew by {grown:.0f} MiB under an input flood"
    # The session is still there, and another client gets a working session.
    other = await WSClient.connect(server.ws_url, binary=True)
    await other.start()
    assert "ok" in await other.run("echo o''k")
    await other.close()
    client.drop()
