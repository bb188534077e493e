"""
The warm pool against the real engine.
"""

import pytest_twisted
from twisted.internet.threads import deferToThread

from .harness import WSClient, docker_client, eventually, instance_containers


def pool_ready(server) -> int:
    import json
    status, _, body = server.get("/health")
    return json.loads(body)["pool"]["ready"]


@pytest_twisted.ensureDeferred
async def test_warm_sessions_have_the_same_limits_and_are_replaced(make_server):
    server = make_server("--pool-size", "2")
    await eventually(lambda: pool_ready(server) == 2)
    warm_ids = {c["Id"] for c in instance_containers(server.instance)}
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    assert "developer /workspace" in await client.run("echo $(whoami) $PWD")
    container = docker_client().containers.get(f"capsule-{session_id}")
    assert container.id in warm_ids
    host = container.attrs["HostConfig"]
    assert (host["Memory"], host["NanoCpus"], host["PidsLimit"]) == (
        512 * 1024 * 1024, 1_000_000_000, 256)
    assert "(warm," in server.log()
    # The pool refills in the background.
    await eventually(lambda: pool_ready(server) == 2)
    assert len(instance_containers(server.instance)) == 3
    await client.close()


@pytest_twisted.ensureDeferred
async def test_a_dead_warm_container_is_never_handed_out(make_server):
    server = make_server("--pool-size", "1")
    await eventually(lambda: pool_ready(server) == 1)
    (warm,) = instance_containers(server.instance)
    await deferToThread(lambda: docker_client().api.kill(warm["Id"]))
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    assert "developer" in await client.run("whoami")
    assert docker_client().containers.get(f"capsule-{session_id}").status == "running"
    assert "was broken" in server.log()
    await client.close()
