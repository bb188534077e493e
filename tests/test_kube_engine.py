"""
The Kubernetes engine's pure parts (capsule/engine/kube_pods.py,
kube_execs.py, kube_exec.py): the pod made of a ContainerSpec, what a pod's
status says as Docker's State, an exec's command, the exec stream's Status.  The engine against an API server is
tests/integration/test_kube_contract.py.
"""

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


def test_the_kubernetes_engine_is_not_an_option_yet():
    """
    Groundwork for issue 25: nothing but the engine's own modules and their
    tests reach it, and no option chooses it (kept sessions, snapshots and
    forks are not there yet: they are refused with Unsupported).
    """
    import pathlib

    from twisted.python import usage

    from capsule.tap import Options

    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--engine", "kubernetes"])
    assert "kube" not in Options().getUsage(width=200).lower()
    root = pathlib.Path(__file__).resolve().parent.parent / "capsule"
    engine = {"kubernetes.py", "kube_pods.py", "kube_execs.py", "kube_exec.py", "kube_keep.py"}
    users = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                   if p.name not in engine and ("kubernetes" in p.read_text()
                                                or "kube_" in p.read_text()))
    assert users == []
