"""
Kept sessions end to end on the Kubernetes engine: a real C{twistd capsule
--engine kubernetes} (L{tests.support.kube_live}) on the stand-in API server
(L{tests.support.kube_standin}), spoken to over real HTTP and WebSocket.  A
session put away is its volume claim, its pod deleted; everything another
replica needs to list and resume it (whose it is, why and when it was kept,
its pod) is on the claim, so that a replica with no state of its own finds
it and resumes it, under the same pod name, with its workspace and its
screen; the rest of the pod's files are not kept.

The stand-in answers on this process's reactor: every blocking call (HTTP
to capsule, waits on its log) is made on a thread.
"""

import gzip
import io
import json
import tarfile

import pytest_twisted
from twisted.internet.threads import deferToThread


from .harness import WSClient, eventually
from .test_api import ALICE, BOB, call, create, sh

ALICE_AUTH = {"Authorization": f"Bearer {ALICE}"}


async def api(server, path, method="GET", body=None, **kwargs):
    return await deferToThread(call, server, path, method, body, **kwargs)


def claim_of(cluster, session_id: str) -> dict | None:
    found = [c for c in cluster.standin.store.items("PersistentVolumeClaim", cluster.namespace)
             if (c["metadata"].get("labels") or {}).get("io.capsule.session") == session_id]
    return found[0] if found else None


@pytest_twisted.ensureDeferred
async def test_a_kept_session_is_its_claim_and_another_replica_resumes_it(cluster, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    options = ("--pool-size", "0", "--tokens", str(tokens))
    first = await cluster.start(cluster.server(*options, replica="r0"))
    session_id = (await deferToThread(create, first, ALICE))["id"]
    client = await WSClient.connect(first.ws_url, session_id, binary=True, headers=ALICE_AUTH)
    client.send({"type": "resize", "cols": 100, "rows": 30})
    await client.next("connected", timeout=60)
    out = await client.run("mkdir -p /workspace/p; echo kept-$((6*7)) > /workspace/p/notes;"
                           " echo lost > /home/developer/lost; echo typed-$((1+1))")
    assert "typed-2" in out
    pod = cluster.session_pod(session_id)["metadata"]["name"]
    status, body = await api(first, f"/api/sessions/{session_id}/put-away", "POST",
                             token=ALICE)
    assert status == 200, body
    kept_at = body["kept_at"]
    await client.close()
    # Its pod deleted, its claim kept, carrying whose and why.
    await eventually(lambda: cluster.session_pod(session_id) is None,
                     what="the kept session's pod to be deleted")
    claim = claim_of(cluster, session_id)
    assert claim is not None and claim["metadata"]["name"] == pod
    annotations = claim["metadata"]["annotations"]
    assert json.loads(annotations["io.capsule.kept-record"]) == {
        "user": "alice", "reason": "put_away", "kept_at": kept_at}
    assert json.loads(annotations["io.capsule.pod"])["metadata"]["name"] == pod
    # A kept session's workspace exports from its claim.
    status, exported = await api(first, f"/api/export/{session_id}", raw=True, token=ALICE)
    assert status == 200, exported[:300]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(exported))) as tar:
        assert tar.extractfile("workspace/p/notes").read() == b"kept-42\n"
    assert cluster.session_pod(session_id) is None
    await cluster.stop(first)

    # Another replica, with no state of its own: the cluster says it all.
    second = await cluster.start(cluster.server(*options, replica="r1"))
    await eventually(lambda: "found 1 kept session(s)" in second.log())
    status, mine = await api(second, "/api/sessions", token=ALICE)
    assert [(s["id"], s["state"], s["reason"], s["kept_at"]) for s in mine["sessions"]] == [
        (session_id, "kept", "put_away", kept_at)]
    status, theirs = await api(second, "/api/sessions", token=BOB)
    assert theirs["sessions"] == []
    status, body = await api(second, f"/api/sessions/{session_id}/resume", "POST", token=BOB)
    assert (status, body["code"]) == (404, "session_not_found")
    again = await WSClient.connect(second.ws_url, f"{session_id}&resume=1", binary=True,
                                   headers=ALICE_AUTH)
    again.send({"type": "resize", "cols": 100, "rows": 30})
    connected = await again.next("connected", timeout=60)
    assert (connected["session_id"], connected["resumed_from"]) == (session_id, kept_at)
    # The same pod's name, the screen and the workspace kept; the rest not.
    assert cluster.session_pod(session_id)["metadata"]["name"] == pod
    await again.until(b"typed-2", timeout=30)
    out = await again.run("cat /workspace/p/notes; cat /home/developer/lost 2>&1;"
                          " echo new-$((2+3))")
    assert "kept-42" in out and "No such file" in out and "new-5" in out
    claim = claim_of(cluster, session_id)
    assert "io.capsule.kept-record" not in claim["metadata"]["annotations"]
    await again.close()
    out = await deferToThread(sh, second, session_id, "cat /workspace/p/notes", token=ALICE)
    assert out["stdout"] == "kept-42\n"
    # The resumed pod says it is the resuming replica's and alice's, so a
    # third replica serves it to her (and to no one else) and the first,
    # back, does not take it for a leftover of its own.
    annotations = cluster.session_pod(session_id)["metadata"]["annotations"]
    assert annotations["capsule.io/replica"] == "r1"
    await eventually(lambda: "capsule.io/owner" in (
        cluster.session_pod(session_id)["metadata"]["annotations"]),
        what="the resumed pod to say whose it is")
    assert json.loads(cluster.session_pod(session_id)["metadata"]["annotations"][
        "capsule.io/owner"]) == {"user": "alice"}
    assert cluster.session_pod(session_id)["metadata"]["labels"]["io.capsule.user"] == "alice"
    third = await cluster.start(cluster.server(*options, replica="r0"))
    status, body = await api(third, f"/api/sessions/{session_id}", token=BOB)
    assert (status, body["code"]) == (404, "session_not_found")
    out = await deferToThread(sh, third, session_id, "cat /workspace/p/notes", token=ALICE)
    assert out["stdout"] == "kept-42\n"
    assert cluster.session_pod(session_id)["metadata"]["annotations"][
        "capsule.io/replica"] == "r0"
    await cluster.stop(third)
    # Deleted by its owner through a replica that no longer serves it (the
    # third took it over): the claim goes with it all the same.
    status, body = await api(second, f"/api/sessions/{session_id}", "DELETE", token=ALICE)
    assert status == 200, body
    await eventually(lambda: claim_of(cluster, session_id) is None,
                     what="the session's claim to be deleted")
