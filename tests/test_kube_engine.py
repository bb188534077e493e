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


def test_secrets_are_references_to_the_sessions_secret():
    """
    A spec's secrets are in no pod manifest nor in its claim's copy: the pod
    takes each from the session's Secret (named after the pod, labelled like
    it), which alone holds the values.
    """
    import base64

    from capsule.core.keeper import SECRET_LABEL
    from capsule.engine.kube_keep import POD_ANNOTATION, claim_manifest, with_session_claim
    from capsule.engine.kube_secrets import secret_manifest, secret_name

    value = "sk-the-value-1234"
    spec = ContainerSpec(image="i", environment={"PLAIN": "seen", "TOKEN": "overridden"},
                         secrets={"TOKEN": value, "OTHER_KEY": "two"},
                         labels={"io.capsule.instance": "t", "io.capsule.user": "a@b",
                                 SECRET_LABEL: "ab" * 32})
    pod = with_session_claim(pod_manifest("capsule-x", spec), "capsule-x")
    env = pod["spec"]["containers"][0]["env"]
    assert env == [
        {"name": "PLAIN", "value": "seen"},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "capsule-x-env",
                                                         "key": "TOKEN"}}},
        {"name": "OTHER_KEY", "valueFrom": {"secretKeyRef": {"name": "capsule-x-env",
                                                             "key": "OTHER_KEY"}}}]
    claim = claim_manifest("capsule-x", pod, "1Gi", None)
    for text in (json.dumps(pod), json.dumps(claim)):
        assert value not in text and "two" not in text
        # Nor the keeper's secret (never given on Kubernetes): dropped.
        assert "ab" * 32 not in text
    assert json.loads(claim["metadata"]["annotations"][POD_ANNOTATION]) == pod
    assert SECRET_LABEL not in capsule_labels(pod)
    secret = secret_manifest(pod, spec.secrets)
    assert secret["metadata"]["name"] == secret_name("capsule-x") == "capsule-x-env"
    assert secret["metadata"]["labels"] == pod["metadata"]["labels"]
    assert json.loads(secret["metadata"]["annotations"][LABELS_ANNOTATION]) == {
        "io.capsule.instance": "t", "io.capsule.user": "a@b"}
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == (
        spec.secrets)
    assert "ownerReferences" not in secret["metadata"]
    owned = secret_manifest(pod, spec.secrets, {"metadata": {"name": "capsule-x", "uid": "u"}})
    assert owned["metadata"]["ownerReferences"] == [{
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": "capsule-x", "uid": "u"}]
    # No secrets: no reference.
    assert pod_manifest("capsule-y", replace(spec, secrets={}))["spec"]["containers"][0][
        "env"] == [{"name": "PLAIN", "value": "seen"}, {"name": "TOKEN", "value": "overridden"}]


def test_a_secret_name_no_secret_key_can_be_is_refused():
    spec = ContainerSpec(image="i", secrets={"A B": "v"})
    with pytest.raises(Unsupported, match="cannot be a Kubernetes Secret's key: 'A B'"):
        pod_manifest("capsule-x", spec)


def test_standin_secrets_as_the_api_server_stores_and_the_kubelet_reads_them():
    import base64

    from tests.support.kube_standin_coord import Refusal
    from tests.support.kube_standin_secrets import resolved_env, stored_secret

    stored, causes = stored_secret("s", {"metadata": {"name": "s"},
                                         "data": {"A": base64.b64encode(b"1").decode()},
                                         "stringData": {"B": "two", "A": "one"}})
    assert causes == [] and stored["type"] == "Opaque" and "stringData" not in stored
    assert {k: base64.b64decode(v) for k, v in stored["data"].items()} == {
        "A": b"one", "B": b"two"}
    _, causes = stored_secret("s", {"stringData": {"not ok": "x"}})
    assert causes[0][0] == "data[not ok]" and "valid config key" in causes[0][2]
    _, causes = stored_secret("s", {"stringData": {"big": "x" * (2**20 + 1)}})
    assert causes[0][2] == "Too long: must have at most 1048576 bytes"
    for bad in ("abc", "a$==", 3):
        with pytest.raises(Refusal) as e:
            stored_secret("s", {"data": {"A": bad}})
        assert e.value.code == 400 and "cannot be handled as a Secret" in e.value.message
    secrets = {("ns", "s"): stored}
    get = lambda ns, name: secrets.get((ns, name))  # noqa: E731
    ref = lambda name, key, **more: {"name": "V", "valueFrom": {"secretKeyRef": {  # noqa: E731
        "name": name, "key": key, **more}}}
    assert resolved_env([{"name": "P", "value": "p"}, ref("s", "B")], "ns", get) == (
        {"P": "p", "V": "two"}, None)
    assert resolved_env([ref("none", "B")], "ns", get) == ({}, {
        "reason": "CreateContainerConfigError", "message": 'secret "none" not found'})
    assert resolved_env([ref("s", "C")], "ns", get) == ({}, {
        "reason": "CreateContainerConfigError",
        "message": "couldn't find key C in Secret ns/s"})
    assert resolved_env([ref("none", "B", optional=True), ref("s", "C", optional=True)],
                        "ns", get) == ({}, None)
    env, waiting = resolved_env([{"name": "X", "valueFrom": {"fieldRef": {}}}], "ns", get)
    assert waiting["reason"] == "CreateContainerConfigError"


def test_the_exec_streams_tls_is_read_once_per_configuration(tmp_path):
    """
    Over https, an exec's TLS options (the authority's file read) are made
    once, not at each exec on the reactor thread; a new configuration
    (a kubeconfig read again) makes them anew.
    """
    import shutil

    import kubernetes.client
    import twisted.test
    from twisted.internet.testing import MemoryReactorClock

    from capsule.engine.kubernetes import KubernetesAPI

    authority = tmp_path / "ca.pem"
    shutil.copy(twisted.test.__path__[0] + "/server.pem", authority)
    configuration = kubernetes.client.Configuration()
    configuration.host = "https://cluster.example:6443"
    configuration.ssl_ca_cert = str(authority)
    api = KubernetesAPI(MemoryReactorClock(), configuration)
    first = api._tls_options("cluster.example")
    authority.unlink()
    assert api._tls_options("cluster.example") is first
    api._endpoint()
    again = kubernetes.client.Configuration()
    again.host = configuration.host
    api._configured(again)
    assert api._tls_options("cluster.example") is not first
