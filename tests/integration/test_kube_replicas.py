"""
capsule replicas on the Kubernetes engine, end to end: two real C{twistd
capsule --engine kubernetes --replica NAME} servers of one instance
(L{tests.support.kube_live}) on the stand-in API server, spoken to over
real WebSocket; and the stand-in's Leases, merge PATCH and ResourceQuotas
the replicas rely on, through the engine (L{capsule.engine.kube_replicas}).

The stand-in answers on this process's reactor: every blocking call is
made on a thread.
"""

import re

import kubernetes.client
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from capsule.core.errors import ContainerGone, DockerError
from capsule.core.spec import ContainerSpec
from capsule.engine.kube_replicas import REPLICA_ANNOTATION, ClusterFull
from capsule.engine.kubernetes import KubernetesAPI

from .harness import IMAGE, WSClient, eventually, sleep
from .test_api import ALICE, BOB, call

LEASE_TUNING = {"replica_lease": 3.0, "replica_renew": 1.0, "orphan_sweep": 1.0,
                "cleanup_interval": 0.5}


def engine_of(cluster, replica=None) -> KubernetesAPI:
    configuration = kubernetes.client.Configuration()
    configuration.host = cluster.url
    api = KubernetesAPI(reactor, configuration, namespace=cluster.namespace, timeout=30)
    api.replica = replica
    api.start()
    return api


async def quota(cluster, name: str, **hard: str) -> None:
    await cluster.standin.create("ResourceQuota", "v1", "resourcequotas", cluster.namespace,
                                 {"metadata": {"name": name},
                                  "spec": {"hard": {k.replace("_", "."): v
                                                    for k, v in hard.items()}}})


def holder(cluster, session_id: str) -> str | None:
    pod = cluster.session_pod(session_id)
    return None if pod is None else (pod["metadata"].get("annotations") or {}).get(
        REPLICA_ANNOTATION)


def no_problems(server) -> list[str]:
    return [line for line in server.problems() if "Traceback" in line or "Unhandled" in line]


async def typed_then_dropped(server, cluster):
    """
    A session made through C{server}, typed into (5000 numbered lines), its
    client gone partway; the session's id, the output so far and its
    offset.
    """
    client = await WSClient.connect(server.ws_url, binary=True)
    session_id = await client.start()
    await client.run("true")
    await eventually(lambda: holder(cluster, session_id) == server.replica,
                     what="the pod to say which replica holds it")
    client.type("for i in $(seq 1 5000); do echo line$i; done; echo DO$((1))NE\r")
    await client.until(r"line300\r\n")
    client.drop()
    await client.closed
    return session_id, client.output, client.received


async def replayed_exactly(server, session_id, before: bytes, offset: int) -> WSClient:
    again = await WSClient.connect(server.ws_url, session_id, binary=True, offset=offset)
    connected = await again.next("connected")
    assert connected["resumed"] and connected["offset"] == offset
    await again.until(r"line5000\r\nDO1NE")
    numbers = [int(n) for n in re.findall(rb"line(\d+)\r\n", before + again.output)]
    assert numbers == list(range(1, 5001)), "duplicates or gaps"
    return again


@pytest_twisted.ensureDeferred
async def test_a_session_reconnected_through_another_replica_replays_exactly(cluster):
    a = await cluster.start(cluster.server("--pool-size", "0", replica="ra"))
    b = await cluster.start(cluster.server("--pool-size", "0", replica="rb"))
    session_id, before, offset = await typed_then_dropped(a, cluster)
    again = await replayed_exactly(b, session_id, before, offset)
    assert holder(cluster, session_id) == "rb"
    assert "line-two" in await again.run("echo line-$((1))two | tr -d 1")
    # A, which lost its shell to B, left the pod alone.
    await eventually(lambda: f"session {session_id[:8]} is served by replica rb now:"
                             " forgotten here" in a.log(), what="A to leave the session to B")
    assert "line-three" in await again.run("echo line-$((1))three | tr -d 1")
    assert f"session {session_id[:8]} taken over from replica ra" in b.log()
    await again.close()
    assert no_problems(a) == [] and no_problems(b) == []


@pytest_twisted.ensureDeferred
async def test_a_tab_whose_session_another_replica_took_hears_a_takeover_and_takes_it_back(
        cluster):
    a = await cluster.start(cluster.server("--pool-size", "0", replica="ra"))
    b = await cluster.start(cluster.server("--pool-size", "0", replica="rb"))
    first = await WSClient.connect(a.ws_url, binary=True)
    session_id = await first.start()
    await first.run("true")
    await eventually(lambda: holder(cluster, session_id) == "ra",
                     what="the pod to say which replica holds it")
    pod = cluster.session_pod(session_id)["metadata"]["name"]
    first.type("for i in $(seq 1 3000); do echo line$i; done; echo MID$((1))DLE\r")
    await first.until(r"line300\r\n")
    # A second tab attaches through the other replica, while the first is attached.
    second = await WSClient.connect(b.ws_url, session_id, binary=True)
    await second.next("connected")
    await first.closed
    # The first hears what a tab another tab displaced hears: not an end.
    assert first.close_code == 4409, (first.close_code, first.errors)
    assert [e["code"] for e in first.errors] == ["taken_over"]
    assert not [m for m in first.all_messages if isinstance(m, dict) and m.get("type") == "exit"]
    assert holder(cluster, session_id) == "rb"
    await eventually(lambda: f"session {session_id[:8]} is served by replica rb now:"
                             " forgotten here" in a.log(), what="A to forget the session")
    # The session goes on through B.
    await second.until(r"MID1DLE\r\n.*\$ ")
    second.type("for i in $(seq 3001 6000); do echo line$i; done; echo DO$((1))NE\r")
    await second.until(r"line6000\r\nDO1NE")
    # The first tab takes it back through its replica, from its offset: what
    # it had, and what it is sent now, are every line once.
    again = await WSClient.connect(a.ws_url, session_id, binary=True, offset=first.received)
    connected = await again.next("connected")
    assert connected["resumed"] and connected["offset"] == first.received
    await again.until(r"line6000\r\nDO1NE")
    numbers = [int(n) for n in re.findall(rb"line(\d+)\r\n", first.output + again.output)]
    assert numbers == list(range(1, 6001)), "duplicates or gaps"
    assert holder(cluster, session_id) == "ra"
    await second.closed
    assert second.close_code == 4409 and [e["code"] for e in second.errors] == ["taken_over"]
    assert cluster.session_pod(session_id)["metadata"]["name"] == pod
    assert "back-here" in await again.run("echo back-$((1))here | tr -d 1")
    await again.close()
    for server in (a, b):
        said = [line for line in server.log().splitlines() if session_id[:8] in line]
        assert not [line for line in said if " ended: " in line], said
        assert no_problems(server) == []


@pytest_twisted.ensureDeferred
async def test_another_users_session_is_not_found_through_another_replica(cluster):
    tokens = cluster.workdir / "tokens"
    tokens.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    a = await cluster.start(cluster.server("--pool-size", "0", "--tokens", str(tokens),
                                           replica="ra"))
    b = await cluster.start(cluster.server("--pool-size", "0", "--tokens", str(tokens),
                                           replica="rb"))
    alice = await WSClient.connect(a.ws_url, headers={"Authorization": f"Bearer {ALICE}"})
    session_id = await alice.start()
    await alice.run("true")
    await eventually(lambda: '"alice"' in (cluster.session_pod(session_id)["metadata"].get(
        "annotations") or {}).get("capsule.io/owner", ""), what="the pod to say its owner")
    alice.drop()
    await alice.closed
    bob = await WSClient.connect(b.ws_url, session_id,
                                 headers={"Authorization": f"Bearer {BOB}"})
    await bob.closed
    assert bob.close_code == 4404, (bob.close_code, bob.errors)
    assert [e["code"] for e in bob.errors] == ["session_not_found"]
    assert holder(cluster, session_id) == "ra"
    # Its owner, through the other replica, gets it.
    again = await WSClient.connect(b.ws_url, session_id,
                                   headers={"Authorization": f"Bearer {ALICE}"})
    await again.next("connected")
    assert "mine" in await again.run("echo mi$((1))ne | tr -d 1")
    assert holder(cluster, session_id) == "rb"
    await again.close()


@pytest_twisted.ensureDeferred
async def test_a_killed_replicas_session_goes_on_through_the_survivor(cluster):
    a = await cluster.start(cluster.server("--pool-size", "0", "--grace", "30",
                                           replica="ra", tuning=LEASE_TUNING))
    b = await cluster.start(cluster.server("--pool-size", "0", "--grace", "30",
                                           replica="rb", tuning=LEASE_TUNING))
    session_id, before, offset = await typed_then_dropped(a, cluster)
    # A second session of A's, left without a client: an orphan once A is gone.
    other = await WSClient.connect(a.ws_url)
    orphan_id = await other.start()
    await other.run("true")
    await eventually(lambda: holder(cluster, orphan_id) == "ra", what="the orphan's holder")
    other.drop()
    await other.closed
    cluster.kill(a)
    again = await replayed_exactly(b, session_id, before, offset)
    pod = cluster.session_pod(session_id)["metadata"]["name"]
    # A's Lease lapses, B's orphan sweeps run: the session B serves stays,
    # and A's other session is adopted, not removed (its grace is 30 s).
    await eventually(lambda: holder(cluster, orphan_id) == "rb", timeout=30,
                     what="B to adopt A's orphaned session")
    await sleep(3)
    assert cluster.session_pod(session_id)["metadata"]["name"] == pod
    assert cluster.session_pod(orphan_id) is not None
    assert "still-here" in await again.run("echo still-$((1))here | tr -d 1")
    orphan = await WSClient.connect(b.ws_url, orphan_id)
    assert "orphan-ok" in await orphan.run("echo orphan-$((1))ok | tr -d 1")
    await orphan.close()
    await again.close()
    assert no_problems(b) == []


@pytest_twisted.ensureDeferred
async def test_a_full_quota_refuses_the_next_session_clearly(cluster):
    server = await cluster.start(cluster.server("--pool-size", "0", replica="ra"))
    first = await WSClient.connect(server.ws_url)
    await first.start()
    await first.run("true")
    await quota(cluster, "sessions", pods="1")
    refused = await WSClient.connect(server.ws_url)
    refused.send({"type": "resize", "cols": 80, "rows": 24})
    await refused.closed
    assert [e.get("code") for e in refused.errors] == ["cluster_full"], refused.errors
    message = refused.errors[0]["message"]
    assert "exceeded quota: sessions, requested: pods=1, used: pods=1, limited: pods=1" in (
        message)
    assert refused.close_code == 4503
    assert "exceeded quota: sessions" in server.log()
    assert "some-output" in await first.run("echo some-$((1))output | tr -d 1")
    await first.close()


async def api(server, path, method="GET", body=None, **kwargs):
    return await deferToThread(call, server, path, method, body, **kwargs)


@pytest_twisted.ensureDeferred
async def test_the_api_reaches_a_session_through_another_replica(cluster):
    a = await cluster.start(cluster.server("--pool-size", "0", replica="ra"))
    b = await cluster.start(cluster.server("--pool-size", "0", replica="rb"))
    status, session = await api(a, "/api/sessions", "POST", {})
    assert status == 201, session
    session_id = session["id"]
    await eventually(lambda: "capsule.io/owner" in (cluster.session_pod(session_id)[
        "metadata"].get("annotations") or {}), what="the pod to say its owner")
    status, body = await api(b, f"/api/sessions/{session_id}/exec", "POST",
                             {"argv": ["sh", "-c", "echo via-$((1))b | tr -d 1"], "stdin": ""})
    assert status == 200, body
    assert body["stdout"] == "via-b\n"
    assert holder(cluster, session_id) == "rb"
    status, body = await api(b, f"/api/sessions/{session_id}")
    assert status == 200 and body["id"] == session_id
    missing = "7f9619ff-8b86-4011-b42d-00c04fc964ff"
    status, body = await api(b, f"/api/sessions/{missing}/exec", "POST",
                             {"argv": ["true"], "stdin": ""})
    assert (status, body["code"]) == (404, "session_not_found")
    # A full quota: the next session is refused, as admission refuses.
    await quota(cluster, "sessions", pods="1")
    status, body = await api(a, "/api/sessions", "POST", {})
    assert (status, body["code"]) == (503, "cluster_full"), body
    assert "exceeded quota: sessions" in body["error"]


# -- the engine's replica calls on the stand-in ---------------------------------

@pytest_twisted.ensureDeferred
async def test_leases_say_which_replicas_live(cluster):
    api = engine_of(cluster)
    try:
        assert await api.live_replicas() == set()
        await api.renew_replica("ra", 2)
        await api.renew_replica("rb", 60)
        await api.renew_replica("ra", 2)
        lease = cluster.standin.store.get("Lease", cluster.namespace, "capsule-replica-ra")
        assert lease["spec"]["holderIdentity"] == "ra"
        assert lease["spec"]["leaseDurationSeconds"] == 2
        assert await api.live_replicas() == {"ra", "rb"}
        await sleep(2.5)
        assert await api.live_replicas() == {"rb"}
        assert await api.drop_replica("rb") is True
        assert await api.drop_replica("rb") is False
        assert await api.live_replicas() == set()
        with pytest.raises(DockerError, match="cannot name a Lease"):
            await api.renew_replica("Not A Name", 5)
    finally:
        api.stop()


@pytest_twisted.ensureDeferred
async def test_a_claim_is_won_by_one_replica(cluster):
    ra, rb = engine_of(cluster, "ra"), engine_of(cluster, "rb")
    try:
        spec = ContainerSpec(image=IMAGE, command=("sleep", "300"),
                             labels={"io.capsule.instance": cluster.instance})
        pod = await ra.create_session_container("s", spec)
        assert await rb.container_holder(pod) == "ra"
        # Of two claims at once from the same holder, one wins.
        first = rb.claim_container(pod, "rb", "ra")
        second = ra.claim_container(pod, "rc", "ra")
        results = [await first, await second]
        assert sorted(results) == [False, True]
        winner = "rb" if results[0] else "rc"
        assert await ra.container_holder(pod) == winner
        [listed] = await ra.list_containers({"io.capsule.instance": cluster.instance})
        assert listed["replica"] == winner
        # A claim from a holder it no longer has fails.
        assert await ra.claim_container(pod, "ra", "ra") is False
        assert await ra.claim_container(pod, winner, winner,
                                        annotations={"capsule.io/owner": "{}"}) is True
        assert cluster.standin.store.get("Pod", cluster.namespace, pod)["metadata"][
            "annotations"]["capsule.io/owner"] == "{}"
        await ra.remove_container(pod)
        with pytest.raises(ContainerGone):
            await ra.claim_container(pod, "ra")
        with pytest.raises(ContainerGone):
            await ra.container_holder(pod)
    finally:
        ra.stop()
        rb.stop()


@pytest_twisted.ensureDeferred
async def test_a_quota_refuses_a_pod_as_the_api_server_does(cluster):
    api = engine_of(cluster, "ra")
    try:
        await quota(cluster, "mem", limits_memory="1Gi", requests_cpu="2")
        spec = ContainerSpec(image=IMAGE, command=("sleep", "300"), memory="768m", cpus=1.0,
                             labels={"io.capsule.instance": cluster.instance})
        await api.create_session_container("s", spec)
        with pytest.raises(ClusterFull) as caught:
            await api.create_session_container("t", spec)
        assert caught.value.code == "cluster_full"
        assert re.search(r'pods "capsule-[0-9a-f]+" is forbidden: exceeded quota: mem,'
                         r" requested: limits.memory=768Mi, used: limits.memory=768Mi,"
                         r" limited: limits.memory=1Gi", caught.value.message), (
            caught.value.message)
        stored = cluster.standin.store.get("ResourceQuota", cluster.namespace, "mem")
        status = cluster.standin._quota_status(stored)["status"]
        assert status["used"] == {"limits.memory": "768Mi", "requests.cpu": "250m"}
    finally:
        api.stop()


@pytest_twisted.ensureDeferred
async def test_a_replica_restarted_under_a_new_name_loses_nothing(cluster):
    """
    A Deployment's rolling restart: the only replica stops (SIGTERM: its
    sessions go on in their pods, its Lease is deleted) and a new one with
    another pod name starts; it finds the sessions at start, and a client
    reconnecting gets exact replay.
    """
    a = await cluster.start(cluster.server("--pool-size", "0", replica="ra",
                                           tuning=LEASE_TUNING))
    session_id, before, offset = await typed_then_dropped(a, cluster)
    pod = cluster.session_pod(session_id)["metadata"]["name"]
    await cluster.stop(a)
    assert cluster.session_pod(session_id)["metadata"]["name"] == pod
    b = await cluster.start(cluster.server("--pool-size", "0", replica="rb",
                                           tuning=LEASE_TUNING))
    assert "(1 session recovered)" in b.log() and "whose lease lapsed" in b.log(), b.log()
    again = await replayed_exactly(b, session_id, before, offset)
    assert holder(cluster, session_id) == "rb"
    assert cluster.session_pod(session_id)["metadata"]["name"] == pod
    await again.close()
    assert no_problems(b) == []
