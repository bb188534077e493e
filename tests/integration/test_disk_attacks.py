"""
Stepping around --disk, against the real engine: what a session holds on the
host's disk beyond its container's writable layer (Docker's C{SizeRw}) is
counted too: files it deleted but holds open, its --read-only-root volumes,
and its user's agent volume (which outlives the session, and has a limit of
its own).

The agent volume's test needs the agent image (CAPSULE_TEST_AGENT_IMAGE, e.g.
capsule-agent:latest from `make image`), whose ~/.claude the session's user
may write.
"""

from __future__ import annotations

import os
import re

import pytest
import pytest_twisted

from tests.support.live import LABEL_SESSION

from .harness import WSClient, docker_client, eventually, session_container, sleep

AGENT_IMAGE = os.environ.get("CAPSULE_TEST_AGENT_IMAGE")


def _quota_enforced(session_id: str) -> bool:
    """
    Whether the storage driver limits this session's writable layer (overlay2
    on xfs with pquota): writes past the size then fail by themselves.
    """
    container = docker_client().containers.get(session_container(session_id))
    return bool(container.attrs["HostConfig"].get("StorageOpt"))


def _gone(session_id: str):
    def gone():
        return not docker_client().api.containers(
            all=True, filters={"label": f"{LABEL_SESSION}={session_id}"})
    return gone


@pytest_twisted.ensureDeferred
async def test_a_deleted_file_held_open_counts(make_server):
    # A file the shell holds open on fd 3 is deleted, then 300 MB are
    # written to it: the writable layer's size (SizeRw) says ~0 all along,
    # the host's disk holds 300 MB.
    server = make_server("--disk", "200m", tuning={"disk-check-interval": 0.5})
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    if _quota_enforced(session_id):
        out = await client.run("exec 3>big; head -c 300M /dev/zero >&3; echo status=$?",
                               timeout=60)
        assert "No space left on device" in out
        await client.close()
        return
    client.type("exec 3>big && rm big && head -c 300M /dev/zero >&3; sleep 600\r")
    notice = await client.next("notice", timeout=60)
    assert notice["code"] == "disk_limit"
    exit_message = await client.next("exit", timeout=60)
    message = exit_message["message"]
    # "the session wrote T MiB (H MiB of it in deleted files still open), ..."
    found = re.match(r"the session wrote ([0-9.]+) MiB \(([0-9.]+) MiB of it in deleted files"
                     r" still open\), more than its disk limit of 200.0 MiB\Z", message)
    assert found, message
    total, held = float(found.group(1)), float(found.group(2))
    # Nearly all of it is what no walk of the layer (SizeRw) sees.
    assert total > 200 and held > 0.9 * total
    assert f"ending session {session_id[:8]}: the session wrote" in server.log()
    await eventually(_gone(session_id), timeout=30)
    await client.close()


@pytest_twisted.ensureDeferred
async def test_a_read_only_root_sessions_volumes_count(make_server):
    # /workspace is an anonymous volume of a --read-only-root session: not
    # in SizeRw either.
    server = make_server("--disk", "200m", "--read-only-root",
                         tuning={"disk-check-interval": 0.5})
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    client.type("head -c 300M /dev/zero > /workspace/big; sleep 600\r")
    exit_message = await client.next("exit", timeout=60)
    assert exit_message["message"].startswith("the session wrote ")
    assert "in its volumes" in exit_message["message"]
    assert exit_message["message"].endswith(", more than its disk limit of 200.0 MiB")
    await eventually(_gone(session_id), timeout=30)
    await client.close()


@pytest.mark.skipif(not AGENT_IMAGE and not os.environ.get("CAPSULE_REQUIRE_DOCKER"),
                    reason="set CAPSULE_TEST_AGENT_IMAGE to the agent image (make image)")
@pytest_twisted.ensureDeferred
async def test_an_agent_volume_past_its_limit(make_server, tmp_path):
    # A user's agent volume outlives their sessions: 300 MB written into it
    # is counted against the profile's agent_volume_limit, the session is
    # warned and then ended (unless it is back under within the grace), the admin listing shows the size, and the
    # user's next session may bring it back under the limit (it is warned,
    # and lives on once it did).
    from tests.integration.test_profiles import _admin, write_profiles

    token = "ann-token-" + "1" * 30
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ann:{token}\n")
    server = make_server("--pool-size", "0", "--tokens", str(tokens), "--agent-image",
                         AGENT_IMAGE, "--profiles", write_profiles(tmp_path, """
[profiles.claude]
agent_volume = "/home/developer/.claude"
agent_volume_limit = "200m"
command = ["bash", "-l"]
"""), tuning={"disk-check-interval": 0.5, "agent-volume-grace": 10})
    auth = {"Authorization": f"Bearer {token}"}

    def volumes() -> list[str]:
        return [v.name for v in docker_client().volumes.list(
            filters={"label": f"io.capsule.instance={server.instance}"})]
    try:
        client = await WSClient.connect(server.ws_url, profile="claude", headers=auth)
        session_id = await client.start()
        client.type("head -c 300M /dev/zero > ~/.claude/blob; sleep 600\r")
        notice = await client.next("notice", timeout=60)
        assert notice["code"] == "disk_limit"
        assert "agent volume" in notice["message"]
        exit_message = await client.next("exit", timeout=60)
        assert "agent volume (/home/developer/.claude" in exit_message["message"]
        assert "more than its limit of 200.0 MiB" in exit_message["message"]
        await eventually(_gone(session_id), timeout=30)
        await client.close()

        code, out = _admin("volumes", "--instance", server.instance)
        assert code == 0, out
        assert out[0].split() == ["USER", "PROFILE", "SIZE", "VOLUME"]
        (row,) = [line.split() for line in out[1:-1]]
        assert row[:3] == ["ann", "claude", "300.0MiB"] and row[3] in volumes()

        # The next session is told, and may clean up.
        client = await WSClient.connect(server.ws_url, profile="claude", headers=auth)
        await client.start()
        notice = await client.next("notice", timeout=60)
        assert "agent volume" in notice["message"]
        assert "status=0" in await client.run("rm ~/.claude/blob; echo status=$?")
        await sleep(3)  # several checks
        assert "alive" in await client.run("echo alive")
        await client.close()
    finally:
        server.stop()
        server.remove_containers()
        for name in volumes():
            docker_client().volumes.get(name).remove(force=True)
