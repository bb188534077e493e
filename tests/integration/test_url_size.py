"""
The terminal's size in the WebSocket's URL, against a real capsule and the
real engine: a warm session's prompt comes after the 101 with no message
sent, at that size, once; a size that is not one is refused with nothing
made.
"""

import pytest_twisted

from .harness import WSClient, eventually, instance_containers
from .test_pool import pool_ready, screen


@pytest_twisted.ensureDeferred
async def test_a_warm_prompt_comes_at_the_urls_size_before_any_message(make_server):
    server = make_server("--pool-size", "1")
    await eventually(lambda: pool_ready(server) == 1)
    client = await WSClient.connect(server.ws_url + "?cols=120&rows=40", binary=True)
    connected = await client.connected
    assert connected["resumed"] is False
    # Nothing was sent: the prompt came of the URL alone.
    await client.until(rb"\$ $")
    # The page sends its resize all the same, at the same size: no second prompt.
    client.resize(120, 40)
    client.type("stty size\r")
    await client.until(rb"stty size\r\n.*40 120\r\n.*\$ $")
    shown = [line for line in screen(client.output, 120, 40) if line]
    assert shown[2:] == ["developer@capsule:/workspace$ stty size", "40 120",
                         "developer@capsule:/workspace$"], shown
    await client.close()


@pytest_twisted.ensureDeferred
async def test_a_size_that_is_not_one_is_refused_and_nothing_is_made(make_server):
    server = make_server("--pool-size", "0")
    client = await WSClient.connect(server.ws_url + "?cols=80&rows=0", binary=True)
    code, _ = await client.closed
    assert code == 4400
    [error] = client.errors
    assert error["code"] == "bad_resize"
    assert error["message"] == ("the URL's rows must be an integer from 1 to 1000 (with cols),"
                                " got '0'")
    assert instance_containers(server.instance) == []
    assert "the URL's rows must be an integer" in server.log()
