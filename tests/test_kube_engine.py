"""
The Kubernetes engine's pure parts (capsule/engine/kube_pods.py,
kube_execs.py, kube_exec.py): the pod made of a ContainerSpec, what a pod's
status says as Docker's State, an exec's command, the exec stream's Status.  The engine against an API server is
tests/integration/test_kube_contract.py.
"""

import json
from dataclasses import replace

import pytest

from capsule.core.spec import ContainerSpec
from capsule.engine.kube_exec import exit_code
from capsule.engine.kube_pods import (LABELS_ANNOTATION, Unsupported, capsule_labels,
                                      docker_bytes, pod_manifest, pod_state,
                                      volume_claim_name)
from capsule.engine.kube_execs import exec_argv


def test_pod_manifest_and_helpers():
    spec = ContainerSpec(image="i", memory="1g", cpus=1.5, cpu_shares=512, disk="2g",
                         runtime="gvisor", labels={"io.capsule.user": "x y"})
    pod = pod_manifest("capsule-x", spec)
    assert pod["spec"]["runtimeClassName"] == "gvisor"
    resources = pod["spec"]["containers"][0]["resources"]
    assert resources["limits"] == {"memory": str(2**30), "cpu": "1500m",
                                   "ephemeral-storage": str(2 * 2**30)}
    assert resources["requests"]["cpu"] == "500m"
    assert pod["metadata"]["labels"] == {}
    with pytest.raises(Unsupported):
        pod_manifest("capsule-x", replace(spec, allow_sudo=True))
    assert docker_bytes("512m") == 512 * 2**20 and docker_bytes("100") == 100
    assert exec_argv(["a"], "", {}) == ["a"]
    assert exec_argv(["a"], "/w", {"K": "v"})[-3:] == ["env", "K=v", "a"]
    assert exit_code({"status": "Success"}) == 0
    assert exit_code({"status": "Failure", "reason": "NonZeroExitCode", "details": {
        "causes": [{"reason": "ExitCode", "message": "7"}]}}) == 7
    assert exit_code({"status": "Failure", "reason": "InternalError"}) is None

def test_labels_no_label_can_hold_are_kept_in_the_annotation():
    spec = ContainerSpec(image="i", labels={"io.capsule.user": "ann@example.org",
                                            "io.capsule.session": "a" * 36})
    pod = pod_manifest("capsule-x", spec)
    assert pod["metadata"]["labels"] == {"io.capsule.session": "a" * 36}
    assert LABELS_ANNOTATION in pod["metadata"]["annotations"]
    assert capsule_labels(pod) == spec.labels
    pod["metadata"]["annotations"][LABELS_ANNOTATION] = "not json"
    assert capsule_labels(pod) == {"io.capsule.session": "a" * 36}


def test_read_only_root_and_volumes():
    pod = pod_manifest("capsule-x", ContainerSpec(
        image="i", read_only_root=True, volumes=(("Agent_Home.1", "/home/developer/.claude"),)))
    spec = pod["spec"]
    mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts["/home/developer/.claude"]]["persistentVolumeClaim"] == {
        "claimName": "agent-home-1"}
    assert volumes[mounts["/workspace"]] == {"name": mounts["/workspace"], "emptyDir": {}}
    assert volumes[mounts["/tmp"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "512Mi"}
    assert spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert volume_claim_name("--") == "volume"


@pytest.mark.parametrize("status, state", [
    ({"phase": "Pending", "containerStatuses": [{"name": "session", "state": {
        "waiting": {"reason": "ContainerCreating"}}}]},
     {"Status": "created", "Running": False, "Reason": "ContainerCreating"}),
    ({"phase": "Running", "containerStatuses": [{"name": "session", "state": {
        "running": {"startedAt": "2026-12-07T08:00:00Z"}}}]},
     {"Status": "running", "Running": True, "StartedAt": "2026-12-07T08:00:00Z"}),
    ({"phase": "Failed", "containerStatuses": [{"name": "session", "state": {
        "terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]},
     {"Status": "exited", "Running": False, "OOMKilled": True, "ExitCode": 137}),
    # Evicted: the pod's reason, no container state left.
    ({"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource:"
      " memory."}, {"Status": "exited", "Running": False, "Reason": "Evicted",
                    "Error": "The node was low on resource: memory."}),
], ids=["pending", "running", "oom-killed", "evicted"])
def test_pod_state(status, state):
    found = pod_state({"metadata": {}, "status": status})
    assert {k: found[k] for k in state} == state


def test_a_session_claim_holds_the_workspace_and_the_screen():
    from capsule.core.kept import SCREEN_DIRECTORY
    from capsule.engine.kube_keep import (CLAIM_LABEL, FILES_LABEL, POD_ANNOTATION,
                                          claim_manifest, files_manifest, rfc3339_seconds,
                                          with_session_claim)

    spec = ContainerSpec(image="i", read_only_root=True, hostname="h",
                         labels={"io.capsule.instance": "t", "io.capsule.user": "a@b"})
    pod = with_session_claim(pod_manifest("capsule-x", spec), "capsule-x")
    container = pod["spec"]["containers"][0]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    # The read-only root's emptyDir at /workspace is the claim's now.
    for path, sub in (("/workspace", "workspace"), (SCREEN_DIRECTORY, "screen")):
        assert mounts[path]["subPath"] == sub
        assert volumes[mounts[path]["name"]]["persistentVolumeClaim"] == {
            "claimName": "capsule-x"}
    assert len([v for v in volumes.values() if "persistentVolumeClaim" in v]) == 1
    assert "emptyDir" in volumes[mounts["/home/developer"]["name"]]
    # A named volume at /workspace stays the spec's.
    own = with_session_claim(pod_manifest("capsule-y", replace(
        spec, read_only_root=False, volumes=(("shared", "/workspace"),))), "capsule-y")
    mounts = {m["mountPath"]: m for m in own["spec"]["containers"][0]["volumeMounts"]}
    assert "subPath" not in mounts["/workspace"] and mounts[SCREEN_DIRECTORY]["subPath"]
    claim = claim_manifest("capsule-x", pod, "1Gi", "fast")
    assert claim["metadata"]["labels"] == {"io.capsule.instance": "t", CLAIM_LABEL: "session"}
    assert json.loads(claim["metadata"]["annotations"][LABELS_ANNOTATION]) == spec.labels
    assert json.loads(claim["metadata"]["annotations"][POD_ANNOTATION]) == pod
    assert claim["spec"]["storageClassName"] == "fast"
    files = files_manifest("capsule-x-files-1", pod)
    assert files["metadata"] == {"name": "capsule-x-files-1",
                                 "labels": {FILES_LABEL: "capsule-x"}}
    assert files["spec"]["containers"][0]["command"][0] == "sleep"
    assert files["spec"]["containers"][0]["env"] == []
    assert files["spec"]["volumes"] == pod["spec"]["volumes"]
    assert rfc3339_seconds("1970-01-01T00:01:00Z") == 60.0
    assert rfc3339_seconds(None) == rfc3339_seconds("garbage") == 0.0
