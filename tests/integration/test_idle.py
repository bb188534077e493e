"""
Idle means idle, against the real engine: a session that prints now and
then, or that computes without printing, is not idle; one where nothing
happens is, at its limit: put away where retention is on, else ended.
"""

import time

import pytest_twisted

from .harness import WSClient, docker_client, eventually, sleep

LIMIT = 8
# A check every half second; the CPU of a quiet session is read every
# quarter of its limit (2 s).
TUNING = {"cleanup-interval": 0.5}
TICKER = "sleep 600 & while :; do sleep 3; echo tick; done"
# Computing, printing nothing (the loop runs in the background, its shell waits).
SPINNER = "(while :; do :; done) & clear"


def _running(server, session_id: str) -> bool:
    for c in server.containers():
        if c["Labels"].get("io.capsule.session") == session_id:
            return c["State"] == "running"
    return False


async def _session(server, command: str | None = None):
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    if command is not None:
        await client.run("true")
        client.type(command + "\r")
    return client, session_id


@pytest_twisted.ensureDeferred
async def test_printing_or_computing_is_not_idle_and_silence_ends_at_the_limit(make_server):
    server = make_server("--pool-size", "0", "--idle-timeout", str(LIMIT), "--retention", "0",
                         tuning=TUNING)
    ticker, ticker_id = await _session(server, TICKER)
    spinner, spinner_id = await _session(server, SPINNER)
    idle, idle_id = await _session(server, "true")
    await ticker.until("tick")
    started = time.monotonic()
    ended = await idle.exited
    took = time.monotonic() - started
    assert ended["message"] == (
        f"the session was idle (no input, no output and no CPU use) for {LIMIT} s"
        " (--idle-timeout): it ended"), ended
    assert took >= LIMIT - 3, took
    await eventually(lambda: not _running(server, idle_id), timeout=20)
    # Three limits on, the other two still run.
    await sleep(3 * LIMIT - took)
    for client, session_id in ((ticker, ticker_id), (spinner, spinner_id)):
        assert not client.is_closed and client.exited.called is False
        assert _running(server, session_id)
    assert ticker.output.count(b"tick") >= 5
    # The loop stops: that session is idle one limit later.
    spinner.type("kill %1\r")
    ended = await spinner.exited
    assert "idle (no input, no output and no CPU use)" in ended["message"], ended
    assert _running(server, ticker_id)
    await ticker.close()
    # The engine's CPU readings worked throughout.
    assert "reading the CPU use" not in server.log()


@pytest_twisted.ensureDeferred
async def test_an_idle_session_is_put_away_where_retention_is_on(make_server):
    server = make_server("--pool-size", "0", "--idle-timeout", str(LIMIT), tuning=TUNING)
    client, session_id = await _session(server, "echo some work > /workspace/notes")
    notice = await client.next("notice", timeout=LIMIT + 20)
    while notice.get("code") != "idle":
        notice = await client.next("notice", timeout=LIMIT + 20)
    assert notice["message"].startswith(
        f"the session was idle (no input, no output and no CPU use) for {LIMIT} s"
        " (--idle-timeout): it was put away, and is kept until "), notice
    # Its container is stopped, not removed: the files stay.
    await eventually(lambda: [c["State"] for c in server.containers()
                              if c["Labels"].get("io.capsule.session") == session_id]
                     == ["exited"], timeout=30)
    api = docker_client().api
    found = [c for c in server.containers()
             if c["Labels"].get("io.capsule.session") == session_id]
    assert api.inspect_container(found[0]["Id"])["State"]["Running"] is False
    ended = await client.exited
    assert "put away" in ended["message"], ended
    assert "putting session" in server.log() and "reading the CPU use" not in server.log()
