"""
A session's user controls every byte its relay sends capsule (issue 9, item
6): a forged frame header written into the relay's stdout ends that session
with one log line, capsule's memory stays flat, and other sessions go on.
"""

import subprocess

import pytest_twisted
from twisted.internet.threads import deferToThread

from .harness import WSClient, session_container, sleep, with_timeout

MALFORMED = "the session's relay sent malformed data"


def _docker_exec(container: str, script: str, user: str = "root") -> str:
    done = subprocess.run(["docker", "exec", "-u", user, container, "sh", "-c", script],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"{script!r} in {container}: {done.stderr}"
    return done.stdout


def _relay_pid(container: str) -> int:
    """
    The pid of the session's relay: the C{capsule-keeper -r} that is not the
    keeper (the keeper is the parent of the shell; the relay has no child).
    """
    table = [line.split(None, 2) for line in
             _docker_exec(container, "ps -eo pid=,ppid=,args=").splitlines()]
    parents = {ppid for _, ppid, _ in table}
    relays = [int(pid) for pid, _, args in table
              if args.startswith("capsule-keeper -r") and pid not in parents]
    assert len(relays) == 1, table
    return relays[0]


def _forge(container: str, pid: int) -> None:
    # o, then a length of 2**32-1: a header no relay sends.  Written as the
    # session's user (root in the container may not open another user's fds).
    _docker_exec(container, f"printf 'o\\377\\377\\377\\377' > /proc/{pid}/fd/1",
                 user="developer")


async def _rss_mib(server) -> float:
    return (await deferToThread(server.rss_kib)) / 1024


@pytest_twisted.ensureDeferred
async def test_a_forged_frame_header_ends_that_session_only(make_server):
    # The relay exec's stream (a session with a network is read over TCP,
    # where no process of the session writes into capsule's connection;
    # bytes from the keeper's port are judged alike: tests/test_direct_path.py).
    server = make_server("--pool-size", "0", tuning={"keeper-direct": False})
    other = await WSClient.connect(server.ws_url)
    await other.start()
    victim = await WSClient.connect(server.ws_url, record=False)
    session_id = await victim.start()
    # The shell writes on, as fast as the client takes it, while the header
    # is forged: before the fix, every chunk after it was held and raised.
    victim.type("yes capsule\r")
    await sleep(1)
    before = await _rss_mib(server)
    container = await deferToThread(session_container, session_id)
    await deferToThread(_forge, container, await deferToThread(_relay_pid, container))
    exited = await with_timeout(victim.exited, 20, "the exit message")
    assert exited == {"type": "exit", "exit_code": None, "message": MALFORMED}
    await with_timeout(victim.closed, 10, "the close after exit")
    await sleep(2)
    grown = await _rss_mib(server) - before
    assert grown < 30, f"capsule grew by {grown:.0f} MiB after a forged frame header"
    log = server.log()
    # One line says why (the session's ending is logged as every one is).
    assert log.count("its relay sent malformed data") == 1, log[-3000:]
    assert "Traceback" not in log and "handling output of session" not in log
    # The other session on the same server goes on.
    assert "ok" in await other.run("echo o''k")
    await other.exit()
