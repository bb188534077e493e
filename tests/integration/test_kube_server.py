"""
capsule end to end on the Kubernetes engine: a real C{twistd capsule
--engine kubernetes} (L{tests.support.kube_live}) whose sessions are pods
on the stand-in API server (L{tests.support.kube_standin}: each pod a real
container on the local Docker engine), spoken to over real WebSocket and
HTTP.

The stand-in answers on this process's reactor: every blocking call (HTTP
to capsule, waits on its log) is made on a thread.
"""

import gzip
import io
import re
import tarfile

import pytest_twisted
from twisted.internet.threads import deferToThread


from .harness import IMAGE, WSClient, eventually, free_port, poll, sleep
from .test_api import call, tar_of


async def api(server, path, method="GET", body=None, **kwargs):
    """
    L{call} on a thread: (status, JSON or bytes).
    """
    return await deferToThread(call, server, path, method, body, **kwargs)


async def health(server) -> dict:
    status, body = await api(server, "/health")
    assert status == 200, body
    return body


def no_problems(server) -> list[str]:
    return [line for line in server.problems() if "Traceback" in line or "Unhandled" in line]


@pytest_twisted.ensureDeferred
async def test_a_session_is_a_pod_with_capsules_labels(cluster):
    server = await cluster.start(cluster.server("--pool-size", "0"))
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    assert "hello-pod" in await client.run("echo hello-$((1))pod | tr -d 1")
    assert "developer" in await client.run("whoami")
    pod = cluster.session_pod(session_id)
    assert pod is not None, cluster.pods()
    labels = pod["metadata"]["labels"]
    assert labels["io.capsule.instance"] == cluster.instance
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    await client.exit()
    await eventually(lambda: cluster.session_pod(session_id) is None,
                     what="the session's pod to be deleted")
    assert "as pods in the namespace " + cluster.namespace in server.log()
    assert no_problems(server) == []


@pytest_twisted.ensureDeferred
async def test_a_profiles_secret_is_in_the_session_and_in_no_pod(cluster, tmp_path):
    """
    A profile's secret reaches the session's shell from the session's own
    Secret; the pod (and its claim's copy of it) names it, never holds it;
    the Secret goes with the session.
    """
    import base64
    import json
    import uuid

    value = f"podsecret-{uuid.uuid4().hex}"
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(f'[profiles.agent]\nimage = "{IMAGE}"\nsecrets = ["POD_TOKEN"]\n')
    server = await cluster.start(cluster.server(
        "--pool-size", "0", "--profiles", str(profiles), env={"POD_TOKEN": value}))
    client = await WSClient.connect(server.ws_url + "?profile=agent")
    session_id = await client.start()
    assert f"[{value}]" in await client.run('echo "[$POD_TOKEN]"')
    pod = cluster.session_pod(session_id)
    name = pod["metadata"]["name"]
    store = cluster.standin.store
    claim = store.get("PersistentVolumeClaim", cluster.namespace, name)
    assert value not in json.dumps(pod) and value not in json.dumps(claim)
    secret = store.get("Secret", cluster.namespace, f"{name}-env")
    assert secret["metadata"]["labels"]["io.capsule.session"] == session_id
    assert value.encode() in [base64.b64decode(v) for v in secret["data"].values()]
    await client.exit()
    await eventually(lambda: store.get("Secret", cluster.namespace, f"{name}-env") is None,
                     what="the session's Secret to be deleted")
    assert value not in server.log()
    assert no_problems(server) == []


@pytest_twisted.ensureDeferred
async def test_a_reconnect_replays_exactly(cluster):
    server = await cluster.start(cluster.server("--pool-size", "0"))
    client = await WSClient.connect(server.ws_url, binary=True)
    session_id = await client.start()
    await client.run("true")
    client.type("for i in $(seq 1 5000); do echo line$i; done; echo DO$((1))NE\r")
    await client.until(r"line300\r\n")
    client.drop()
    await client.closed
    before, offset = client.output, client.received
    await eventually(lambda: f"client left session {session_id[:8]}" in server.log(),
                     what="capsule to log that the client left")
    again = await WSClient.connect(server.ws_url, session_id, binary=True, offset=offset)
    connected = await again.next("connected")
    assert connected["resumed"] and connected["offset"] == offset
    await again.until(r"line5000\r\nDO1NE")
    numbers = [int(n) for n in re.findall(rb"line(\d+)\r\n", before + again.output)]
    assert numbers == list(range(1, 5001)), "duplicates or gaps"
    await again.close()


@pytest_twisted.ensureDeferred
async def test_upload_exec_and_export_through_the_api(cluster):
    server = await cluster.start(cluster.server("--pool-size", "0"))
    status, session = await api(server, "/api/sessions", "POST", {"cols": 100, "rows": 30})
    assert status == 201, session
    session_id = session["id"]
    data = tar_of([("proj", "dir", None, 0o755),
                   ("proj/run.sh", "file", b"#!/bin/sh\necho ran-in-a-pod\n", 0o755)])
    status, body = await api(server, f"/api/sessions/{session_id}/workspace", "POST", data,
                             content_type="application/gzip")
    assert status == 200, body
    assert (body["files"], body["directories"]) == (1, 1)
    status, body = await api(server, f"/api/sessions/{session_id}/exec", "POST",
                             {"argv": ["sh", "-c", "./proj/run.sh; echo err >&2; exit 3"],
                              "stdin": ""})
    assert status == 200, body
    assert (body["stdout"], body["stderr"], body["exit_code"]) == ("ran-in-a-pod\n", "err\n",
                                                                   3)
    status, exported = await api(server, f"/api/export/{session_id}", raw=True)
    assert status == 200, exported[:300]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(exported))) as tar:
        assert tar.extractfile("workspace/proj/run.sh").read() == (
            b"#!/bin/sh\necho ran-in-a-pod\n")
    status, body = await api(server, f"/api/sessions/{session_id}", "DELETE")
    assert (status, body) == (200, {"id": session_id, "ended": True})
    await eventually(lambda: cluster.session_pod(session_id) is None,
                     what="the session's pod to be deleted")


@pytest_twisted.ensureDeferred
async def test_the_warm_pool_makes_pods_ahead_and_a_session_takes_one(cluster):
    server = await cluster.start(cluster.server("--pool-size", "1"))

    async def ready() -> int:
        return (await health(server))["pool"]["ready"]
    await eventually(lambda: len(cluster.pods()) == 1, what="one warm pod")
    while await ready() != 1:
        await sleep(0.2)
    (warm,) = cluster.pods()
    warm_name = warm["metadata"]["name"]
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    # The session is the warm pod: labelled with its session once taken.
    pod = cluster.session_pod(session_id)
    assert pod is not None and pod["metadata"]["name"] == warm_name
    assert "in-warm" in await client.run("echo in-$((1))warm | tr -d 1")
    # And the pool makes another.
    await eventually(lambda: len(cluster.pods()) == 2, what="a new warm pod")
    while await ready() != 1:
        await sleep(0.2)
    status, _, metrics = await deferToThread(server.get, "/metrics")
    assert status == 200
    # The session found a warm one: no miss counted, one ready again.
    assert re.search(rb"^capsule_pool_misses_total 0\.0$", metrics, re.M), metrics[-2000:]
    assert re.search(rb"^capsule_pool_ready 1\.0$", metrics, re.M), metrics[-2000:]
    await client.exit()


async def _ended_by(cluster, server, take_away):
    """
    A session whose pod C{take_away} takes away, with C{--retention 0}:
    ended, its pod gone; (the exit frame, capsule's log line of its end).
    """
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    await client.run("true")
    pod = cluster.session_pod(session_id)["metadata"]["name"]
    await take_away(pod)
    ended = await client.next("exit", timeout=60)
    await eventually(lambda: f"session {session_id[:8]} ended" in server.log(),
                     what="capsule to log the session's end")
    await eventually(lambda: cluster.session_pod(session_id) is None,
                     what="the session's pod to be gone")
    line = [l for l in server.log().splitlines() if f"session {session_id[:8]} ended" in l]
    return ended, line


async def _kept_after(cluster, server, take_away):
    """
    A session whose pod C{take_away} takes away, where sessions are kept:
    its client hears why and that it is kept; it is listed kept, and
    resumes with its workspace under the same pod name.  Return the exit
    frame.
    """
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    await client.run("echo kept-$((6*7)) > /workspace/notes")
    pod = cluster.session_pod(session_id)["metadata"]["name"]
    await take_away(pod)
    told = await client.next("exit", timeout=60)
    assert "is kept" in told["message"], told
    await eventually(lambda: cluster.session_pod(session_id) is None,
                     what="the kept session's pod to be deleted")
    status, listed = await api(server, "/api/sessions")
    assert status == 200, listed
    assert [(s["id"], s["state"]) for s in listed["sessions"]] == [(session_id, "kept")]
    again = await WSClient.connect(server.ws_url, f"{session_id}&resume=1")
    again.send({"type": "resize", "cols": 80, "rows": 24})
    connected = await again.next("connected", timeout=60)
    assert connected["session_id"] == session_id
    assert cluster.session_pod(session_id)["metadata"]["name"] == pod
    assert "kept-42" in await again.run("cat /workspace/notes")
    await again.exit()
    return told


@pytest_twisted.ensureDeferred
async def test_a_pod_deleted_from_under_a_session_keeps_it_with_that_reason(cluster):
    server = await cluster.start(cluster.server("--pool-size", "0"))
    told = await _kept_after(cluster, server, lambda pod: cluster.delete_pod(pod, grace=1))
    assert told["message"].startswith("the session's pod was deleted"), told
    assert no_problems(server) == []


@pytest_twisted.ensureDeferred
async def test_a_pod_deleted_at_once_keeps_its_session(cluster):
    server = await cluster.start(cluster.server("--pool-size", "0"))
    told = await _kept_after(cluster, server, lambda pod: cluster.delete_pod(pod, grace=0))
    assert told["message"].startswith("the session's pod was deleted"), told
    assert no_problems(server) == []


@pytest_twisted.ensureDeferred
async def test_an_evicted_pod_keeps_its_session_with_the_eviction(cluster):
    server = await cluster.start(cluster.server("--pool-size", "0"))
    told = await _kept_after(
        cluster, server, lambda pod: cluster.evict(pod, "The node was low on resource:"
                                                        " memory."))
    assert told["message"].startswith("the session's pod was evicted: The node was low on"
                                      " resource: memory."), told
    assert any("was evicted: The node was low on resource: memory." in line
               and "it is kept" in line for line in server.log().splitlines())
    assert no_problems(server) == []


@pytest_twisted.ensureDeferred
async def test_without_retention_a_pod_deleted_ends_its_session_with_that_reason(cluster):
    server = await cluster.start(cluster.server("--pool-size", "0", "--retention", "0"))
    ended, lines = await _ended_by(cluster, server,
                                   lambda pod: cluster.delete_pod(pod, grace=1))
    assert "the session's pod was deleted" in ended["message"], ended
    assert any("the session's pod was deleted" in line for line in lines), lines
    assert no_problems(server) == []


@pytest_twisted.ensureDeferred
async def test_without_retention_an_evicted_pod_ends_its_session_with_the_eviction(cluster):
    server = await cluster.start(cluster.server("--pool-size", "0", "--retention", "0"))
    ended, lines = await _ended_by(
        cluster, server, lambda pod: cluster.evict(pod, "The node was low on resource:"
                                                        " memory."))
    assert ended["message"] == ("the session's pod was evicted: The node was low on"
                                " resource: memory."), ended
    assert any("was evicted: The node was low on resource: memory." in line
               for line in lines), lines
    await eventually(lambda: not [c for c in cluster.standin.store.items(
        "PersistentVolumeClaim", cluster.namespace)
        if (c["metadata"].get("labels") or {}).get("io.capsule.session")],
        what="the session's claim to be deleted")
    assert no_problems(server) == []


# -- when the cluster cannot be used ----------------------------------------------------


async def _refused_then(server, words: str):
    """
    C{server} listens, says C{words} once in its log, refuses a session
    with engine_unavailable, and does not crash.
    """
    await eventually(lambda: words in server.log(), what=words)
    client = await WSClient.connect(server.ws_url)
    client.send({"type": "resize", "cols": 80, "rows": 24})
    error = await client.next("error", timeout=60)
    assert error["code"] in ("engine_unavailable", "docker_unavailable"), error
    await client.closed
    assert server.process.poll() is None
    assert no_problems(server) == []
    return error


@pytest_twisted.ensureDeferred
async def test_an_unreachable_api_server_is_an_engine_away(cluster, tmp_path):
    from tests.support.kube_live import write_kubeconfig
    path = write_kubeconfig(tmp_path / "away", f"http://127.0.0.1:{free_port()}",
                            cluster.namespace)
    server = await cluster.start(cluster.server("--pool-size", "0", "--kubeconfig", str(path)))
    await _refused_then(server, "cannot reach the Kubernetes API server at http://127.0.0.1")


@pytest_twisted.ensureDeferred
async def test_a_kubeconfig_that_cannot_be_read_is_said_and_read_again(cluster, tmp_path):
    path = tmp_path / "broken"
    path.write_text("this: [is not a kubeconfig")
    server = await cluster.start(cluster.server("--pool-size", "0", "--kubeconfig", str(path)))
    await _refused_then(server, "cannot read the Kubernetes configuration")
    # Mended, it is read again: the next look for the earlier run's
    # sessions succeeds, and sessions open.
    path.write_text(cluster.kubeconfig.read_text())
    await eventually(lambda: "found the sessions of the earlier run: 0" in server.log(),
                     timeout=30, what="capsule to reach the cluster once mended")
    client = await WSClient.connect(server.ws_url)
    await client.start()
    assert "mended" in await client.run("echo me$((1))nded | tr -d 1")
    await client.exit()


@pytest_twisted.ensureDeferred
async def test_a_forbidden_namespace_is_said_and_asked_again(cluster):
    cluster.standin.forbidden.add(cluster.namespace)
    server = await cluster.start(cluster.server("--pool-size", "1"))
    await _refused_then(server, "refuses capsule (403")
    log = server.log()
    assert ('cannot list resource "pods" in API group "" in the namespace'
            f' "{cluster.namespace}"') in log
    assert "docs/kubernetes.md" in log
    cluster.standin.forbidden.discard(cluster.namespace)
    await eventually(lambda: len(cluster.pods()) == 1, timeout=30,
                     what="the warm pool to fill once capsule may")


@pytest_twisted.ensureDeferred
async def test_the_door_and_previews_go_over_the_keepers_channels(cluster):
    """
    A pod has no Docker network: as with --network none, the session door
    answers on the pod's loopback, and a preview reaches the pod's port,
    both over the keeper's channels.
    """
    from .test_preview import SERVER_SCRIPT
    server = await cluster.start(cluster.server("--pool-size", "0"))
    client = await WSClient.connect(server.ws_url, binary=True)
    session_id = await client.start()
    out = await client.run("curl -s http://127.0.0.1:3180/anything; echo", timeout=30)
    assert "the session door serves" in out, out
    status, body = await api(server, f"/api/sessions/{session_id}/exec", "POST", {
        "argv": ["sh", "-c", "cat > /tmp/p.pl && (setsid perl /tmp/p.pl 3000 >/dev/null 2>&1"
                             " </dev/null &)"], "stdin": SERVER_SCRIPT})
    assert status == 200 and body["exit_code"] == 0, body

    async def answered():
        status, body = await api(server, f"/preview/{session_id}/3000/hello", raw=True)
        return status == 200 and body
    assert await poll(answered, 20, "the preview to answer") == b"hello from the session\n"
    await client.close()


@pytest_twisted.ensureDeferred
async def test_two_replicas_share_the_namespace_and_one_may_be_killed(cluster):
    """
    The fixture's replicas: one instance and namespace, each its own
    --replica; one ended with SIGKILL leaves the other serving.
    """
    first = await cluster.start(cluster.server("--pool-size", "0", replica="alpha"))
    second = await cluster.start(cluster.server("--pool-size", "0", replica="beta"))
    assert "(replica alpha)" in first.log() and "(replica beta)" in second.log()
    assert first.instance == second.instance == cluster.instance
    client = await WSClient.connect(first.ws_url)
    session_id = await client.start()
    assert cluster.session_pod(session_id) is not None
    cluster.kill(first)
    assert first.process.returncode == -9
    await client.closed
    other = await WSClient.connect(second.ws_url)
    await other.start()
    assert "survivor" in await other.run("echo sur$((1))vivor | tr -d 1")
    await other.exit()
