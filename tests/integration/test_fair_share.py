"""
Fair sharing against the real engine: a session's CPU weight, and what it may
write to the host's disk (--disk).
"""

import pytest_twisted

from .harness import WSClient, docker_client, eventually, session_container


def _storage_quota_possible() -> bool:
    """
    Whether this engine's storage driver can limit a container's size
    (overlay2 on xfs, which also needs the pquota mount option).
    """
    info = docker_client().info()
    status = dict(info.get("DriverStatus") or [])
    return info["Driver"] == "overlay2" and status.get("Backing Filesystem") == "xfs"


@pytest_twisted.ensureDeferred
async def test_session_containers_have_the_cpu_weight(make_server):
    server = make_server("--cpu-shares", "128")
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    host = docker_client().containers.get(session_container(session_id)).attrs["HostConfig"]
    assert host["CpuShares"] == 128
    # Without --disk, no size is asked of the storage driver.
    assert host.get("StorageOpt") is None
    await client.close()


@pytest_twisted.ensureDeferred
async def test_the_default_cpu_weight_is_a_quarter_of_the_servers(make_server):
    server = make_server()
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    host = docker_client().containers.get(session_container(session_id)).attrs["HostConfig"]
    assert host["CpuShares"] == 256
    await client.close()


@pytest_twisted.ensureDeferred
async def test_a_session_writing_past_its_disk_limit(make_server):
    server = make_server("--disk", "50m", tuning={"disk-check-interval": 0.5})
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    assert "developer" in await client.run("whoami")
    container = docker_client().containers.get(session_container(session_id))
    if _storage_quota_possible() and container.attrs["HostConfig"].get("StorageOpt"):
        # The storage driver enforces it: the write itself fails.
        assert container.attrs["HostConfig"].get("StorageOpt") == {"size": "50m"}
        out = await client.run("head -c 100M /dev/zero > big; echo status=$?", timeout=60)
        assert "No space left on device" in out and "status=1" in out
        await client.close()
        return
    # The engine refused storage_opt (overlay2 on ext4 here): the watcher
    # warns, then ends the session; its container goes.
    assert container.attrs["HostConfig"].get("StorageOpt") is None
    client.type("head -c 100M /dev/zero > big; sleep 600\r")
    notice = await client.next("notice", timeout=30)
    assert notice["code"] == "disk_limit"
    exit_message = await client.next("exit", timeout=30)
    assert exit_message["message"].startswith("the session wrote ")
    assert exit_message["message"].endswith(", more than its disk limit of 50.0 MiB")
    assert "the storage driver cannot limit container sizes" in server.log()
    assert f"ending session {session_id[:8]}: the session wrote" in server.log()

    def gone():
        return not any(c["Id"] == container.id
                       for c in docker_client().api.containers(all=True))
    await eventually(gone, timeout=30)
    await client.close()


@pytest_twisted.ensureDeferred
async def test_a_session_within_its_disk_limit_lives_on(make_server):
    server = make_server("--disk", "50m", tuning={"disk-check-interval": 0.5})
    client = await WSClient.connect(server.ws_url)
    await client.start()
    assert "status=0" in await client.run("head -c 10M /dev/zero > small; echo status=$?")
    # Four sweeps later (the absence of an ending needs time to show), the session still answers, and nobody was warned.
    assert "alive" in await client.run("sleep 2; echo alive")
    assert [m for m in client.all_messages
            if isinstance(m, dict) and m.get("type") in ("notice", "exit")] == []
    assert server.log().count("ending session") == 0
    await client.close()
