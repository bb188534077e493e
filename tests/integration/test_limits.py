"""
Sessions do not live forever: --max-lifetime ends them, and --idle-timeout
ends an idle one where there is no retention (tests/integration/test_idle.py),
client attached or not, and the client is told why.
"""

import pytest_twisted

from .harness import WSClient, eventually


@pytest_twisted.ensureDeferred
async def test_max_lifetime_ends_a_busy_session_with_a_reason(make_server):
    server = make_server("--pool-size", "0", "--max-lifetime", "4",
                         tuning={"cleanup-interval": 0.2})
    client = await WSClient.connect(server.ws_url)
    await client.start()
    client.type("while true; do echo busy; sleep 0.2; done\r")
    ended = await client.exited
    assert "maximum lifetime (4 s" in ended["message"], ended
    code, _ = await client.closed
    assert code == 1000
    await eventually(lambda: server.containers() == [], timeout=20)


@pytest_twisted.ensureDeferred
async def test_idle_timeout_ends_a_silent_attached_session(make_server):
    server = make_server("--pool-size", "0", "--idle-timeout", "2", "--retention", "0",
                         tuning={"cleanup-interval": 0.2})
    client = await WSClient.connect(server.ws_url)
    await client.start()
    await client.run("true")
    ended = await client.exited
    assert "idle (no input, no output and no CPU use) for 2 s" in ended["message"], ended
