"""
capsule end to end on the Kubernetes engine: a real C{twistd capsule
--engine kubernetes} (L{tests.support.kube_live}) whose sessions are pods
on the stand-in API server (L{tests.support.kube_standin}: each pod a real
container on the local Docker engine), spoken to over real WebSocket and
HTTP.
"""

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from tests.support.kube_live import KubeCluster

from .harness import IMAGE, WSClient, eventually


def _factory(workdir, *args, image, instance, tuning, env, label):
    # The integration tests' server: small limits, admission off.
    from .harness import CapsuleServer
    return CapsuleServer(workdir, *args, instance=instance, tuning=tuning, env=env)


@pytest.fixture
def cluster(tmp_path):
    cluster = KubeCluster(tmp_path, image=IMAGE, server_factory=_factory)
    yield cluster
    pytest_twisted.blockon(Deferred.fromCoroutine(cluster.close()))


@pytest_twisted.ensureDeferred
async def test_a_session_is_a_pod(cluster):
    server = await cluster.start(cluster.server("--pool-size", "0"))
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    assert "hello-pod" in await client.run("echo hello-$((1))pod | tr -d 1")
    pod = cluster.session_pod(session_id)
    assert pod is not None
    await client.exit()
